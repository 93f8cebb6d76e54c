"""Head options of the convergence study: a separate head learning rate / weight decay
(`head.lr_scale`, `head.weight_decay`) and rows initialised from features (`head.init=feature`).

Each is held to the dense reference: the lazy head (exact lazy optimizer, rows in a store) must
equal the dense head trained with a dense torch optimizer, in fp64 to 1e-10, step for step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diet_engine.engine.config import RunConfig
from diet_engine.engine.head import build_head, head_meta
from diet_engine.engine.schedule import warmup_cosine
from diet_engine.storage.head import MemoryHeadStore, head_init

N, D, B, STEPS = 300, 8, 32, 60


def _cfg(**head) -> RunConfig:
    cfg = RunConfig()
    for k, v in head.items():
        cfg.set(f"head.{k}", v)
    cfg.head.label_smoothing = 0.8
    cfg.validate()
    return cfg


def _batches(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [rng.integers(0, N, B) for _ in range(STEPS)]
    for idx in out:
        idx[-3:] = idx[:3]  # duplicates within a batch map to one row
    return out


def _run(head, batches, zs) -> list[float]:
    head.start_epoch(batches)
    losses = []
    for t in range(1, STEPS + 1):
        loss = head.loss(zs[t - 1], batches[t - 1], t)
        loss.backward()
        head.step(t)
        losses.append(float(loss.detach()))
    return losses


def _pair(cfg: RunConfig):
    lrs = warmup_cosine(2e-2, STEPS, 5)
    dense_cfg = RunConfig.from_dict({"head": {"store": "dense"}}, base=_cfg(**vars(cfg.head)))
    dense = build_head(dense_cfg, lrs, num_rows=N, dim=D, dtype=torch.float64)
    store = MemoryHeadStore(head_meta(cfg, N, D, torch.float64, 64), seed=cfg.head.seed)
    lazy = build_head(cfg, lrs, num_rows=N, dim=D, store=store, dtype=torch.float64)
    return dense, lazy, lrs


def _features(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(STEPS)]


@pytest.mark.parametrize("options", [
    {"lr_scale": 10.0},
    {"lr_scale": 5.0, "weight_decay": 0.0},
    {"init": "feature"},
    {"init": "feature", "lr_scale": 10.0, "logit_scale": 10.0},
])
def test_lazy_head_equals_dense_head(options):
    cfg = _cfg(store="memory", **options)
    dense, lazy, _ = _pair(cfg)
    batches, zs = _batches(), _features()
    losses_dense, losses_lazy = _run(dense, batches, zs), _run(lazy, batches, zs)
    np.testing.assert_allclose(losses_lazy, losses_dense, rtol=1e-10)
    ref = dense.export(STEPS)
    assert float((lazy.export(STEPS) - ref).abs().max()) <= 1e-10 * float(ref.abs().max())


def test_lr_scale_scales_the_head_only():
    """lr_scale multiplies the schedule the head's optimizer sees; the run's schedule is untouched."""
    cfg = _cfg(store="memory", lr_scale=10.0)
    _, lazy, lrs = _pair(cfg)
    np.testing.assert_allclose(lazy.lrs, 10.0 * lrs)
    assert float(lrs[-1]) == float(warmup_cosine(2e-2, STEPS, 5)[-1])


def test_head_weight_decay_is_recorded_in_the_store():
    """The store's metadata carries the head's own weight decay, so a resume with another is refused."""
    assert head_meta(_cfg(weight_decay=0.0), N, D, torch.float32, 64).optimizer["weight_decay"] == 0.0
    assert head_meta(_cfg(), N, D, torch.float32, 64).optimizer["weight_decay"] == RunConfig().optim.weight_decay


@pytest.mark.parametrize("store", ["dense", "memory"])
def test_feature_init_sets_a_row_at_its_first_visit_only(store):
    cfg = _cfg(store=store, init="feature")
    lrs = warmup_cosine(1e-3, 10, 0)
    s = None if store == "dense" else MemoryHeadStore(head_meta(cfg, N, D, torch.float64, 64), seed=0)
    head = build_head(cfg, lrs, num_rows=N, dim=D, store=s, dtype=torch.float64)
    index = np.array([5, 7, 5, 9])  # sample 5 twice: its first occurrence gives the row
    z = torch.randn(4, D, dtype=torch.float64)
    head.start_epoch([index, index])
    rows_seen = []

    def capture(zz, rows, target, *args):
        rows_seen.append(rows.detach().clone())
        return rows.square().sum() + 0 * zz.sum()

    head.ce = capture
    head.loss(z, index, 1).backward()
    torch.testing.assert_close(rows_seen[0][:3], z[[0, 1, 3]])  # rows 5, 7, 9 (sorted) ← samples 0, 1, 3
    head.step(1)
    z2 = torch.randn(4, D, dtype=torch.float64)
    head.loss(z2, index, 2).backward()  # second visit: the rows are trained rows, not z2
    assert not torch.allclose(rows_seen[1][:3], z2[[0, 1, 3]])
    untouched, _ = head.rows_at(np.array([0]), 2)
    # a row never visited keeps its random init (up to two steps of weight decay)
    torch.testing.assert_close(untouched[0], head_init(0, 0, 1, D, torch.float64)[0], atol=1e-4, rtol=0)


def test_feature_init_is_undone_by_discard():
    """A skipped (non-finite) step leaves a dense head's rows as they were, fresh again."""
    cfg = _cfg(store="dense", init="feature")
    head = build_head(cfg, warmup_cosine(1e-3, 10, 0), num_rows=N, dim=D, dtype=torch.float64)
    before = head.weight.detach().clone()
    index = np.array([1, 2, 3])
    head.start_epoch([index])
    head.loss(torch.randn(3, D, dtype=torch.float64), index, 1).backward()
    head.discard()
    assert torch.equal(head.weight.detach(), before) and bool(head.fresh[[1, 2, 3]].all())
