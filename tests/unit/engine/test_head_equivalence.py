"""Out-of-core head equivalence: the lazy head on the Zarr disk store == the dense in-memory head.

300 steps of batch CE with the same seeds, the rows moved exactly as `Trainer.train` moves them
(prefetch `lookahead` batches ahead, read → catch up → loss → step → write-behind, a commit every
50 steps), through a host-memory budget far smaller than the head so rows really go to disk and
back. Index orders: fully random, shard-clustered streaming, batches that ask again for rows
the previous batch is still writing, and the loader's sliding window (rows recur within a few
steps); every order also carries duplicate indices within a batch.
The losses of every step and the exported head (every row materialised to step 300, once from the
live store and once after closing and reopening it read-only) must equal the dense run's to 1e-5
(held here to 1e-10 in fp64); in fp32 the disk run must be bit-for-bit the in-RAM lazy run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diet_engine.engine.config import OptimConfig
from diet_engine.engine.head import DenseHead, LazyHead
from diet_engine.engine.optim import head_optimizer_meta
from diet_engine.engine.schedule import warmup_cosine
from diet_engine.storage.head import HeadMeta, MemoryHeadStore, ZarrHeadStore, ZarrHeadStoreConfig, head_init
from diet_engine.storage.shards.plan import make_epoch_plan

N, D, R, B = 2000, 16, 128, 64  # rows, dim, chunk rows (= shard size; 16 chunks, the last partial), batch
STEPS, LOOKAHEAD, COMMIT_EVERY = 300, 3, 50
BUDGET = 128 << 10  # bytes: ~340 cached + ~340 staged rows of 2,000


def plan(order: str, steps: int, seed: int = 0) -> list[np.ndarray]:
    """Per-step sample indices (unsorted, with duplicates), like a loader would hand them over."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    if order == "random":
        for _ in range(steps):
            out.append(rng.integers(0, N, B))
    elif order == "streaming":  # shard after shard in a random order, samples shuffled inside each
        perm = np.concatenate([c * R + rng.permutation(min(R, N - c * R)) for c in rng.permutation(-(-N // R))])
        pos = 0
        for _ in range(steps):
            if pos + B > perm.size:
                pos = 0
            out.append(perm[pos : pos + B].copy())
            pos += B
    elif order == "window":  # the loader's sliding window: 2 shards (chunks) visited 3 times, reshuffled
        counts = np.array([min(R, N - c * R) for c in range(-(-N // R))], np.int64)
        first = np.arange(len(counts), dtype=np.int64) * R
        epoch = 0
        while len(out) < steps:
            p = make_epoch_plan(first, counts, np.arange(len(counts)), steps=-(-3 * N // B), batch_size=B,
                                epoch=epoch, seed=seed, rank=0, num_streams=1, drop_last=False, shuffle=True,
                                window=2, passes=3)
            out += [b.copy() for b in p.batches if len(b) == B]
            epoch += 1
        out = out[:steps]
    else:  # "in-flight": half of each batch is rows the previous batch just wrote
        prev = rng.integers(0, N, B)
        for _ in range(steps):
            idx = np.concatenate([rng.choice(prev, B // 2, replace=False), rng.integers(0, N, B - B // 2)])
            out.append(idx)
            prev = idx
    for idx in out:  # duplicates within every batch: a sample drawn twice maps to one row
        idx[-4:] = idx[:4]
        rng.shuffle(idx)
    return out


def run(head, batches, zs) -> list[float]:
    losses = []
    head.start_epoch(batches)  # the head prefetches LOOKAHEAD batches ahead, as in training
    for t in range(1, STEPS + 1):
        loss = head.loss(zs[t - 1], batches[t - 1], t)
        loss.backward()
        head.step(t)
        losses.append(float(loss.detach()))
        if t % COMMIT_EVERY == 0:
            head.commit(t)
    return losses


def _setup(order: str, name: str, dtype: torch.dtype):
    lrs = warmup_cosine(2e-2 if name == "adamw" else 0.5, STEPS, 10)
    cfg = OptimConfig(name=name, weight_decay=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(B, D, generator=g, dtype=dtype) for _ in range(STEPS)]
    meta = HeadMeta(num_rows=N, dim=D, dtype=str(dtype).removeprefix("torch."),
                    optimizer=head_optimizer_meta(cfg), chunk_rows=R)
    return lrs, cfg, plan(order, STEPS), zs, meta


def _disk_run(path, meta, lrs, cfg, batches, zs):
    """Train through the disk store; return (losses, live export, export after reopening read-only)."""
    conf = ZarrHeadStoreConfig(memory_budget_bytes=BUDGET)
    lazy = LazyHead(ZarrHeadStore.create(path, meta, seed=3, config=conf), lrs, cfg, lookahead=LOOKAHEAD)
    try:
        losses = run(lazy, batches, zs)
        stats = lazy.stats()
        live = lazy.export(STEPS)
    finally:
        lazy.close()
    reopened = LazyHead(ZarrHeadStore.open(path, meta, mode="r", config=conf), lrs, cfg, lookahead=LOOKAHEAD)
    try:
        on_disk = reopened.export(STEPS)
    finally:
        reopened.close()
    assert stats["rows_gathered"] > 0 and stats["rows_written"] > 0  # rows did go through the disk
    assert stats["cache_rows"] < N / 4
    return losses, live, on_disk


@pytest.mark.parametrize("name", ["adamw", "sgd"])
@pytest.mark.parametrize("order", ["random", "streaming", "in-flight", "window"])
def test_disk_head_equals_dense_head(tmp_path, order, name):
    """fp64, so that the comparison measures the store and the lazy optimizer, not fp32 rounding:
    300 fp32 steps of the dense reference itself drift 2e-5 (relative to max|W|) from its fp64 run."""
    lrs, cfg, batches, zs, meta = _setup(order, name, torch.float64)
    dense = DenseHead(N, D, lrs, cfg, loss="batch", seed=3, dtype=torch.float64, lookahead=LOOKAHEAD)
    losses_dense = run(dense, batches, zs)
    ref = dense.export(STEPS)
    # the run moved the head: the comparison is not between two untouched initialisations
    assert float((ref - head_init(3, 0, N, D, torch.float64)).abs().max()) > 0.05 * float(ref.abs().max())

    losses, live, on_disk = _disk_run(tmp_path / "head.zarr", meta, lrs, cfg, batches, zs)
    np.testing.assert_allclose(losses, losses_dense, rtol=1e-10)
    scale = float(ref.abs().max())
    assert float((live - ref).abs().max()) <= 1e-10 * scale  # the bar is 1e-5; measured ~2e-14
    assert float((on_disk - ref).abs().max()) <= 1e-10 * scale


@pytest.mark.parametrize("order", ["random", "streaming", "in-flight", "window"])
def test_disk_head_fp32_is_bitwise_the_memory_head(tmp_path, order):
    """In fp32 the disk store changes nothing: same bits as the in-RAM lazy head, step for step;
    both within fp32 rounding of the dense fp32 reference."""
    lrs, cfg, batches, zs, meta = _setup(order, "adamw", torch.float32)
    mem = LazyHead(MemoryHeadStore(meta, seed=3), lrs, cfg, lookahead=LOOKAHEAD)
    losses_mem = run(mem, batches, zs)
    ref_mem = mem.export(STEPS)
    losses, live, on_disk = _disk_run(tmp_path / "head.zarr", meta, lrs, cfg, batches, zs)
    assert losses == losses_mem
    assert torch.equal(live, ref_mem) and torch.equal(on_disk, ref_mem)

    dense = DenseHead(N, D, lrs, cfg, loss="batch", seed=3, lookahead=LOOKAHEAD)
    np.testing.assert_allclose(losses, run(dense, batches, zs), rtol=1e-5)
    ref = dense.export(STEPS)
    assert float((live - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
