"""Global batch cross-entropy across data-parallel ranks (`train.batch_ce=global`).

Design note
-----------
With local batch CE (the default) each rank's softmax runs over its own batch's rows. The global
mode makes a step of W ranks × B_r samples equal a single process running the global batch of
B = Σ B_r samples against the union of all ranks' candidate rows:

    L = (1/B) Σ_i ℓ_i,   ℓ_i = CE(scale · z_i R_allᵀ, target_i)      R_all = [R_0; R_1; …; R_{W-1}]

Sample i's loss depends only on its own feature z_i and on R_all, so features never travel: each
rank gathers the other ranks' candidate rows (already caught up to t-1 by their owners), computes
the loss of its own samples against R_all, and sends the row gradients back to the owners. Ranks
own disjoint rows (their shards' rows), so R_all has no duplicates and row r's target is just its
owner's local position shifted by the owner's offset in R_all.

Scaling. DeepSpeed *averages* backbone gradients over the W ranks, so rank r returns

    loss_r = (W / B) Σ_{i ∈ r} ℓ_i        (= the local mean when every B_r = B/W)

whose rank average is ∇L exactly. The row gradients that come back are averaged the same way:
Σ_r ∂loss_r/∂R_all = W ∂L/∂R_all, divided by W on the owner. The logged loss of rank 0 is its
share loss_0, an unbiased estimate of L.

Cost per step: one all-gather of the (W,) batch/row counts (a host-device sync on CUDA, needed to
size the padded buffers), one all-gather of W·max(M_r)·d row values, and one reduce of the same
size for their gradients (reduce-scatter on NCCL; all-reduce on gloo, which has no reduce-scatter).
At B=256, d=2048 fp32 that is 2 MB per rank each way. The fused batch-CE kernel is reused unchanged.

Wiring. A head calls the batch CE it was built with (`engine/head.py`, `build_head(..., ce=)`); the
trainer passes a `GlobalBatchCE` bound to the data-parallel group when train.batch_ce=global and
there is more than one rank, the local kernel otherwise. Global batch CE needs head.loss=batch
(`build_head` refuses full CE with it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from diet_engine.kernels import batch_cross_entropy


def _world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


class _GatherRows(torch.autograd.Function):
    """R_all = cat_r R_r (forward); dR_r = mean over ranks of dR_all[slice r] (backward)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, counts: list[int], group) -> torch.Tensor:  # rows (M_r, d)
        world, me = dist.get_world_size(group), dist.get_rank(group)
        m_max, d = max(counts), rows.shape[1]
        padded = rows.new_zeros(m_max, d)  # (M_max, d)
        padded[: rows.shape[0]] = rows.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.counts, ctx.group, ctx.me = counts, group, me
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])  # (M_all, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (M_all, d): this rank's share, every rank's rows
        counts, group, me = ctx.counts, ctx.group, ctx.me
        world, m_max = len(counts), max(counts)
        padded = grad.new_zeros(world, m_max, grad.shape[1])  # (W, M_max, d)
        lo = 0
        for r, c in enumerate(counts):
            padded[r, :c] = grad[lo : lo + c]
            lo += c
        if dist.get_backend(group) == "nccl":
            mine = torch.empty_like(padded[me])
            dist.reduce_scatter(mine, list(padded.unbind(0)), group=group)
        else:  # gloo has no reduce-scatter: reduce everything, keep the own slice
            dist.all_reduce(padded, group=group)
            mine = padded[me]
        return mine[: counts[me]] / world, None, None  # mean over ranks, like DeepSpeed's gradients


def gather_rows(rows: torch.Tensor, counts: list[int], group=None) -> torch.Tensor:
    """Differentiable all-gather of every rank's candidate rows; gradients return to the owner."""
    return _GatherRows.apply(rows, counts, group)


def global_batch_cross_entropy(z: torch.Tensor, rows: torch.Tensor, target: torch.Tensor,
                               label_smoothing: float = 0.8, scale: float = 1.0, group=None) -> torch.Tensor:
    """This rank's share of the global batch CE (see the module note for the scaling).

    z (B_r, d) this rank's features, rows (M_r, d) this rank's candidate rows, target (B_r,)
    positions in `rows`. Collective: every rank of `group` must call it at the same step.
    """
    world = _world(group)
    if world == 1:
        return batch_cross_entropy(z, rows, target, label_smoothing, scale)
    me = dist.get_rank(group)
    sizes = torch.tensor([z.shape[0], rows.shape[0]], dtype=torch.int64, device=z.device)
    every = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(every, sizes, group=group)
    every = torch.stack(every).tolist()  # host-device sync (sizes the padded buffers)
    b_all = sum(b for b, _ in every)
    counts = [m for _, m in every]
    rows_all = gather_rows(rows, counts, group)  # (M_all, d)
    offset = sum(counts[:me])
    mean_local = batch_cross_entropy(z, rows_all, target + offset, label_smoothing, scale)
    return mean_local * (z.shape[0] * world / b_all)


class GlobalBatchCE:
    """`batch_cross_entropy`'s signature, computed over the global batch of all ranks of `group`."""

    def __init__(self, group=None) -> None:
        self.group = group

    def __call__(self, z, rows, target, label_smoothing: float = 0.8, scale: float = 1.0) -> torch.Tensor:
        return global_batch_cross_entropy(z, rows, target, label_smoothing, scale, self.group)
