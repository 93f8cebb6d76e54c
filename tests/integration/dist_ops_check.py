"""Rank script (torchrun, gloo): global batch CE and HostSyncBatchNorm against one process.

Every rank holds a different number of samples and candidate rows. After a backward each rank
"averages" its parameter gradients over ranks the way DeepSpeed does, and compares with the
single-process reference on the concatenated batch (computed on every rank, no communication).
Writes `<out>/rank{r}.json` with the maximum errors.

    torchrun --nproc_per_node 2 tests/integration/dist_ops_check.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from diet_engine.engine.distributed import HostSyncBatchNorm
from diet_engine.engine.global_ce import global_batch_cross_entropy
from diet_engine.kernels import batch_cross_entropy


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def check_global_ce(rank: int, world: int) -> dict[str, float]:
    d, ls, scale = 24, 0.8, 3.0
    b = [5 + 2 * r for r in range(world)]  # unequal samples per rank
    m = [b[r] + 3 for r in range(world)]  # unequal candidate rows (extra negatives)
    g = torch.Generator().manual_seed(0)  # every rank draws the whole global data, keeps its part
    zs = [torch.randn(b[r], d, generator=g, dtype=torch.float64) for r in range(world)]
    rs = [torch.randn(m[r], d, generator=g, dtype=torch.float64) for r in range(world)]
    ts = [torch.randint(0, m[r], (b[r],), generator=g) for r in range(world)]
    # reference: one process, the global batch, the union of the rows
    z_all = torch.cat(zs).requires_grad_(True)
    r_all = torch.cat(rs).requires_grad_(True)
    offsets = [sum(m[:r]) for r in range(world)]
    t_all = torch.cat([t + o for t, o in zip(ts, offsets, strict=True)])
    ref = batch_cross_entropy(z_all, r_all, t_all, ls, scale)
    ref.backward()
    # distributed: this rank's part
    z = zs[rank].clone().requires_grad_(True)
    rows = rs[rank].clone().requires_grad_(True)
    loss = global_batch_cross_entropy(z, rows, ts[rank], ls, scale)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world  # what DeepSpeed's averaging sees
    lo = sum(b[:rank])
    return {
        "ce_loss": abs(float(mean_loss) - float(ref.detach())),
        # a backbone parameter's gradient is DeepSpeed's rank average of ∂loss_r/∂θ, i.e. dz_r / W
        "ce_dz": _err(z.grad / world, z_all.grad[lo : lo + b[rank]]),
        "ce_drows": _err(rows.grad, r_all.grad[offsets[rank] : offsets[rank] + m[rank]]),
    }


def check_sync_bn(rank: int, world: int) -> dict[str, float]:
    c = 6
    b = [3 + r for r in range(world)]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(b[r], c, 5, 4, generator=g, dtype=torch.float64) * 3 + 1 for r in range(world)]
    ws = [torch.randn(b[r], c, 5, 4, generator=g, dtype=torch.float64) for r in range(world)]
    ref_bn = torch.nn.BatchNorm2d(c).double()
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 1.5, generator=g)  # the same on every rank
        ref_bn.bias.uniform_(-0.5, 0.5, generator=g)
    bn = HostSyncBatchNorm(c).double()
    bn.load_state_dict(ref_bn.state_dict())
    x_all = torch.cat(xs).requires_grad_(True)
    y_ref = ref_bn(x_all)
    (y_ref * torch.cat(ws)).sum().div(sum(b)).backward()
    x = xs[rank].clone().requires_grad_(True)
    y = bn(x)
    # rank r's share of the global mean, scaled by W like DeepSpeed expects (see engine/global_ce.py)
    (y * ws[rank]).sum().mul(world / sum(b)).backward()
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    dist.all_reduce(grads)
    grads /= world
    lo = sum(b[:rank])
    bn_plain = HostSyncBatchNorm(c).double().eval()  # eval: running statistics, no communication
    bn_plain.load_state_dict(bn.state_dict())
    return {
        "bn_out": _err(y, y_ref[lo : lo + b[rank]]),
        "bn_dx": _err(x.grad / world, x_all.grad[lo : lo + b[rank]]),
        "bn_dparams": _err(grads, torch.cat([ref_bn.weight.grad, ref_bn.bias.grad])),
        "bn_running_mean": _err(bn.running_mean, ref_bn.running_mean),
        "bn_running_var": _err(bn.running_var, ref_bn.running_var),
        "bn_eval": _err(bn_plain(xs[rank]), ref_bn.eval()(xs[rank])),
    }


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    errors = {**check_global_ce(rank, world), **check_sync_bn(rank, world)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(errors, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
