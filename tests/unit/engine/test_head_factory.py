"""`build_head`: the one construction of a head (trainer and `diet head export`), with its injected
batch CE and its own prefetch window; a head's state is its store's own."""

import numpy as np
import pytest
import torch

from diet_engine.engine.config import RunConfig
from diet_engine.engine.head import DenseHead, LazyHead, build_head, head_meta
from diet_engine.engine.schedule import warmup_cosine
from diet_engine.kernels import batch_cross_entropy
from diet_engine.storage.head import HeadStore, MemoryHeadStore

N, D = 64, 8


def _cfg(**fields) -> RunConfig:
    cfg = RunConfig()
    for k, v in fields.items():
        cfg.set(k.replace("__", "."), v)
    return cfg


class _Recorder:
    """A batch CE that records what it was called with and delegates to the kernel."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, z, rows, target, label_smoothing, scale):
        self.calls.append((z.shape[0], rows.shape[0]))
        return batch_cross_entropy(z, rows, target, label_smoothing, scale)


@pytest.mark.parametrize("store", ["dense", "memory"])
def test_the_head_calls_the_batch_ce_it_was_built_with(store):
    cfg = _cfg(head__store=store)
    lrs = warmup_cosine(1e-2, 10, 2)
    ce = _Recorder()
    s = None if store == "dense" else MemoryHeadStore(head_meta(cfg, N, D, torch.float32, 16))
    head = build_head(cfg, lrs, num_rows=N, dim=D, store=s, ce=ce)
    assert isinstance(head, DenseHead if store == "dense" else LazyHead)
    z = torch.randn(6, D, requires_grad=True)
    head.loss(z, np.array([1, 5, 5, 9, 20, 3]), 1).backward()
    head.step(1)
    assert ce.calls == [(6, 5)]  # 6 samples, 5 unique rows


def test_global_batch_ce_with_full_ce_is_refused_at_construction():
    cfg = _cfg(head__store="dense", head__loss="full", train__batch_ce="global")
    with pytest.raises(ValueError, match="needs head.loss=batch"):
        build_head(cfg, warmup_cosine(1e-2, 10, 2), num_rows=N, dim=D, ce=_Recorder())


@pytest.mark.parametrize("store", ["dense", "memory"])
def test_extra_negatives_come_from_the_heads_own_window(store):
    """With extra negatives, step k's softmax also covers rows of batches k+1 … k+lookahead of the
    epoch plan the head was given, and a resume mid-epoch starts the window at that batch."""
    cfg = _cfg(head__store=store, head__extra_negatives=100, head__lookahead=2)
    plan = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5]), np.array([6, 7])]
    for start, expect in ((0, [6, 6, 4, 2]), (2, [4, 2])):
        ce = _Recorder()
        s = None if store == "dense" else MemoryHeadStore(head_meta(cfg, N, D, torch.float32, 16))
        head = build_head(cfg, warmup_cosine(1e-2, 10, 2), num_rows=N, dim=D, store=s, ce=ce)
        head.start_epoch(plan, start)
        for t, batch in enumerate(plan[start:], 1):
            head.loss(torch.randn(2, D), batch, t)
            head._block = head._rows = None  # no backward/step needed to see the candidate rows
        assert [m for _, m in ce.calls] == expect


class _Durable(MemoryHeadStore):
    """A store that keeps its rows itself: only its metadata goes into a checkpoint."""

    state_dict = HeadStore.state_dict
    load_state_dict = HeadStore.load_state_dict


def test_head_state_is_its_stores_state():
    cfg = _cfg(head__store="memory")
    meta = head_meta(cfg, N, D, torch.float32, 16)
    mem = build_head(cfg, warmup_cosine(1e-2, 10, 2), num_rows=N, dim=D, store=MemoryHeadStore(meta))
    assert set(mem.state_dict()["store"]) >= {"weight", "exp_avg", "exp_avg_sq", "step", "meta"}
    durable = build_head(cfg, warmup_cosine(1e-2, 10, 2), num_rows=N, dim=D, store=_Durable(meta))
    state = durable.state_dict()
    assert state == {"store": {"meta": meta.to_dict()}}
    durable.load_state_dict(state)
    other = head_meta(_cfg(optim__name="sgd"), N, D, torch.float32, 16)
    with pytest.raises(ValueError, match="optimizer"):
        durable.load_state_dict({"store": {"meta": other.to_dict()}})
