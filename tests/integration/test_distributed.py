"""Multi-process DIET on CPU (gloo): global batch CE equals one process, per-rank head rows, uneven
shards, a simulated 2-node launch through `diet launch`, crash + resume, ZeRO-1/2 checkpoints.

Each test spawns ranks (torchrun or `diet launch`) on tiny configs; the heavier ones run their
processes concurrently. Budget on 2 cores: about 2-3 minutes for the file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMEOUT = 600


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    """Wait for all; on a failure or timeout kill the others (no hang) and show the failing log."""
    try:
        for p, log in procs:
            rc = p.wait(timeout=TIMEOUT)
            assert rc == 0, f"{' '.join(map(str, p.args))[:300]}\nexit {rc}; log tail:\n{log.read_text()[-4000:]}"
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _torchrun(nproc: int, script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_port()), str(script), *args]


# --------------------------------------------------------------------------- collectives
def test_global_ce_and_sync_batchnorm_match_one_process(tmp_path):
    """Rank shares of the global batch CE and HostSyncBatchNorm, unequal B_r and M_r, 2 ranks:
    loss, features' and rows' gradients, BN outputs/gradients/running stats equal one process."""
    _wait([(_start(_torchrun(2, HERE / "dist_ops_check.py", str(tmp_path)), tmp_path / "log"), tmp_path / "log")])
    for r in range(2):
        err = json.loads((tmp_path / f"rank{r}.json").read_text())
        # batch CE computes its logits in fp32 (inputs are fp64 here); BN stays in fp64
        for k in ("ce_loss", "ce_dz", "ce_drows"):
            assert err[k] < 1e-5, (r, k, err[k])
        for k in ("bn_out", "bn_dx", "bn_dparams", "bn_running_mean", "bn_running_var", "bn_eval"):
            assert err[k] < 1e-10, (r, k, err[k])


# --------------------------------------------------------------------------- global mode ≡ one process
# What the two runs may differ by (relative to max(1, |x|) for the backbone, to max |head| for the
# head rows), in fp64. Both runs sum the same terms in another order (the all-reduce over ranks, the
# global CE's gathered rows): a seed difference of ~1e-16 on any machine, which training (lr 0.032)
# amplified to 2.4e-9 (backbone) and 3.3e-8 (head) in 50 steps, measured. ZeRO-2 keeps fp32 master
# weights, so its seeds are fp32 roundings (~6e-8) that flip where the fp64 values straddle a
# rounding boundary; measured 6.5e-7 and 6.0e-6. The bars leave ≥ 15x over those figures (2 cores
# of an Intel Xeon, torch 2.14.1, 2026-12-04); an fp32 pair would have seeds of
# ~1e-7 in every step whose growth depends on the CPU's vector units (no bar follows from that).
PAIR_BARS = {0: (1e-6, 1e-6), 2: (1e-5, 1e-4)}  # zero_stage: (backbone, head rows)


@pytest.mark.parametrize("zero_stage", sorted(PAIR_BARS))
def test_two_ranks_global_batch_ce_equal_one_rank(tmp_path, zero_stage):
    """50 steps of the real Trainer in fp64: 2 ranks × B/2 (ZeRO stage 0 or 2, SyncBatchNorm,
    clipping, global batch CE) equal 1 rank × B (ZeRO-0) fed the union of both ranks' batches:
    backbone and head rows, within PAIR_BARS."""
    common = ["--tiny-backbone", "--set", "train.max_steps=50", "--set", "optim.lr=0.032",
              "--set", "optim.grad_clip=1.0", "--set", "train.precision=fp64"]
    one, two = tmp_path / "one", tmp_path / "two"
    procs = [
        (_start(_torchrun(1, HERE / "dist_train_check.py", str(one), "--set", "train.batch_size=16", *common),
                tmp_path / "one.log"), tmp_path / "one.log"),
        (_start(_torchrun(2, HERE / "dist_train_check.py", str(two), "--set", "train.batch_size=8",
                          "--set", f"train.zero_stage={zero_stage}", *common), tmp_path / "two.log"),
         tmp_path / "two.log"),
    ]
    _wait(procs)
    a, b = torch.load(one / "model.pt"), torch.load(two / "model.pt")
    assert a.keys() == b.keys()
    backbone = 0.0
    for k in a:
        if a[k].is_floating_point():
            assert a[k].dtype == b[k].dtype == torch.float64, k
            backbone = max(backbone, float((b[k] - a[k]).abs().max()) / max(1.0, float(a[k].abs().max())))
        else:
            assert torch.equal(a[k], b[k]), k
    ref = torch.load(one / "head_rank0.pt")
    assert ref["steps"] == 50
    owned, head = [], 0.0
    for r in range(2):
        h = torch.load(two / f"head_rank{r}.pt")
        assert h["steps"] == 50
        # rows stay with their owner: a rank only ever stepped rows it owns
        assert set(h["stepped"].tolist()) <= set(h["rows"].tolist())
        head = max(head, float((h["weight"] - ref["weight"][h["rows"]]).abs().max()) / float(ref["weight"].abs().max()))
        owned.append(set(h["rows"].tolist()))
    print(f"\nZeRO-{zero_stage}, 2 ranks vs 1: backbone {backbone:.3g}, head rows {head:.3g} (relative)")
    assert backbone <= PAIR_BARS[zero_stage][0] and head <= PAIR_BARS[zero_stage][1], (backbone, head)
    assert not owned[0] & owned[1] and len(owned[0] | owned[1]) == 128


# --------------------------------------------------------------------------- shards → ranks
def _synthetic(tmp_path: Path, n: int = 300, shard_size: int = 64) -> Path:
    from diet_engine.storage.shards import prepare_synthetic

    out = tmp_path / "syn"
    prepare_synthetic(out, n, shard_size, size=8, channels=1, workers=1)
    return out


def test_uneven_shards_balanced_plans(tmp_path):
    """Shards [64, 64, 64, 64, 44] over 2 and 3 ranks: disjoint whole shards balanced by samples,
    equal step counts, every owned sample read every epoch (exactly once on the longest rank),
    a new order each epoch; too few shards for ranks × workers is refused with a clear message."""
    from diet_engine.storage.shards import Manifest, ShardLoader

    m = Manifest.load(_synthetic(tmp_path))
    for world in (2, 3):
        loaders = [ShardLoader(m, 16, None, seed=3, rank=r, world_size=world) for r in range(world)]
        owned = [set(ld.owned_rows().tolist()) for ld in loaders]
        assert sum(len(o) for o in owned) == m.num_samples and len(set().union(*owned)) == m.num_samples
        sizes = sorted(len(o) for o in owned)
        assert sizes[-1] - sizes[0] <= int(m.shard_counts().max())  # balanced to within one shard
        steps = {ld.steps_per_epoch() for ld in loaders}
        assert len(steps) == 1  # no rank waits on another at the end of an epoch
        for ld, own in zip(loaders, owned, strict=True):
            plans = [np.concatenate(ld.plan(e)) for e in (0, 1)]
            for p in plans:
                assert set(p.tolist()) == own  # only own rows, all of them
                if len(own) == max(sizes):
                    assert len(p) == len(own)  # exactly once
            assert not np.array_equal(plans[0][: len(own)], plans[1][: len(own)])  # reshuffled
    with pytest.raises(ValueError, match="too few shards"):
        ShardLoader(m, 16, None, rank=0, world_size=2, num_workers=3)


# --------------------------------------------------------------------------- 2 nodes, crash, resume
def _train_args(data: Path, run: Path, max_steps: int) -> list[str]:
    return ["train", "--no-eval", f"--data.manifest={data}", "--data.eval_test_manifest=",
            "--data.eval_train_manifest=", "--data.prepare_digits=false", "--data.image_size=8",
            "--data.channels=1", "--model.backbone=shufflenet_v2_x0_5", "--train.batch_size=16",
            "--train.epochs=2", f"--train.max_steps={max_steps}", "--train.checkpoint_every=6",
            f"--train.run_dir={run}", "--train.progress=false", "--train.device=cpu", "--train.log_every=2",
            "--train.zero_stage=1", "--head.store=disk", "--head.memory_budget_mb=16"]


def _launch_two_nodes(tmp_path: Path, name: str, train_args: list[str]) -> None:
    port = _port()
    procs = []
    for node in (1, 0):
        log = tmp_path / f"{name}-node{node}.log"
        cmd = [sys.executable, "-m", "diet_engine.launch.cli", "launch", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), *train_args]
        procs.append((_start(cmd, log), log))
    _wait(procs)


def _head_rows(store: Path, ranges: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    import zarr

    g = zarr.open_group(str(store), mode="r")
    return {name: np.concatenate([np.asarray(g[name][lo:hi]) for lo, hi in ranges])
            for name in ("weight", "exp_avg", "exp_avg_sq", "step")}


def test_two_node_launch_local_rows_crash_and_resume(tmp_path):
    """`diet launch` on two simulated nodes (distinct --node_rank, no ssh) with uneven shards, local
    batch CE, ZeRO-1 and per-rank on-disk head stores: equal steps on both ranks (no hang), each rank
    steps only its own shards' rows and all of them within an epoch; then a crash after the step-12
    checkpoint is simulated (`latest` back to step 6) and the resumed run ends bit-identical."""
    from safetensors.torch import load_file

    from diet_engine.storage.shards import Manifest, assign_shards

    data = _synthetic(tmp_path)
    m = Manifest.load(data)
    run = tmp_path / "run"
    _launch_two_nodes(tmp_path, "first", _train_args(data, run, 12))  # 12 steps: one epoch is 11

    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000012"
    for tag in ("step_00000006", "step_00000012"):
        names = {p.name for p in (ckpts / tag).iterdir()}
        assert {"client_state_rank0.pt", "client_state_rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    first, counts = m.first_indices(), m.shard_counts()
    ranges = [[(int(first[s]), int(first[s] + counts[s])) for s in own] for own in assign_shards(counts, 2)]
    final = {}
    for r in range(2):
        rows = _head_rows(run / f"head-rank{r}.zarr", ranges[r])
        assert (rows["step"] > 0).all()  # one epoch passed: every owned row was trained
        others = _head_rows(run / f"head-rank{r}.zarr", ranges[1 - r])
        assert (others["step"] == 0).all()  # local batch CE: no rank ever stepped another's rows
        final[r] = rows
    assert (run / "metrics.csv").read_text().splitlines()[-1].startswith("12,")
    backbone = load_file(str(run / "backbone.safetensors"))

    # crash after checkpoint 12 was written but before `latest` moved: resume from step 6
    shutil.rmtree(ckpts / "step_00000012")
    (ckpts / "latest").write_text("step_00000006\n")
    (run / "backbone.safetensors").unlink()
    _launch_two_nodes(tmp_path, "resume", [*_train_args(data, run, 12), "--resume"])
    assert (ckpts / "latest").read_text().strip() == "step_00000012"
    again = load_file(str(run / "backbone.safetensors"))
    for k in backbone:
        assert torch.equal(again[k], backbone[k]), k
    for r in range(2):
        rows = _head_rows(run / f"head-rank{r}.zarr", ranges[r])
        for name, v in final[r].items():
            np.testing.assert_array_equal(rows[name], v, err_msg=f"rank {r} {name}")
