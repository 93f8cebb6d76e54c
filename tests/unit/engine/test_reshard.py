"""Resume on another rank count, the parts without processes (engine/reshard.py): the position rule,
the learning-rate rule, and the memory head's merge of the old ranks' rows."""

from __future__ import annotations

import numpy as np
import torch

from diet_engine.engine.config import RunConfig
from diet_engine.engine.reshard import (
    continued_lrs,
    continued_position,
    load_memory_head,
    nominal_lrs,
    steps_per_epoch,
)
from diet_engine.engine.schedule import warmup_cosine
from diet_engine.storage.shards.plan import assign_shards


def _cfg(epochs: int = 3) -> RunConfig:
    cfg = RunConfig()
    cfg.train.epochs, cfg.train.batch_size = epochs, 32
    cfg.optim.lr, cfg.optim.warmup_epochs, cfg.optim.final_lr_fraction = 0.1, 0.5, 0.01
    return cfg


def test_nominal_schedule_is_the_trainers():
    """Bit for bit the schedule the trainer computed before rank counts could change."""
    cfg = _cfg()
    for world, spe in ((1, 45), (2, 24), (3, 16)):
        full = cfg.train.epochs * spe
        base = cfg.optim.lr * (cfg.train.batch_size * world) / 256
        want = warmup_cosine(base, full, int(round(cfg.optim.warmup_epochs * spe)), base * cfg.optim.final_lr_fraction)
        np.testing.assert_array_equal(nominal_lrs(cfg, spe, world), want)


def test_continued_schedule_keeps_the_past_and_follows_epoch_progress():
    cfg = _cfg()
    past = nominal_lrs(cfg, 24, 2)
    lrs = continued_lrs(cfg, past, 10, 0, 10 / 24, 25, 45, 1)
    assert len(lrs) == 10 + 25 + 2 * 45
    np.testing.assert_array_equal(lrs[:10], past[:10])  # steps taken keep their lrs
    np.testing.assert_array_equal(lrs[35:], nominal_lrs(cfg, 45, 1)[45:])  # later epochs: the new run's own
    assert lrs[34] == nominal_lrs(cfg, 45, 1)[44]  # the continued epoch ends where the new run's epoch 0 ends
    # on the same rank count at an epoch boundary, the rule gives the nominal schedule back exactly
    nominal = nominal_lrs(cfg, 45, 1)
    np.testing.assert_array_equal(continued_lrs(cfg, nominal, 45, 1, 0.0, 45, 45, 1), nominal)


def test_continued_position():
    state = {"step": 10, "epoch": 1, "batch_in_epoch": 7, "world_size": 2, "epoch_segments": [[4, 3]]}
    assert continued_position(state, 2) == (1, 7, [(4, 3)])  # same rank count: unchanged
    assert continued_position(state, 1) == (1, 0, [(4, 3), (2, 7)])
    assert continued_position({**state, "batch_in_epoch": 0, "epoch_segments": []}, 3) == (1, 0, [])


def test_steps_per_epoch_matches_the_plan():
    counts = np.array([256] * 5 + [157])
    assert steps_per_epoch(counts, 1, 32) == 45 and steps_per_epoch(counts, 2, 32) == 24


def test_memory_head_rows_come_from_their_owner(tmp_path):
    """Rank r's saved rows file is current only on its own shards' rows: the load takes each row there."""
    from types import SimpleNamespace

    from diet_engine.engine.config import OptimConfig
    from diet_engine.engine.optim import head_optimizer_meta
    from diet_engine.storage.head import HeadMeta, MemoryHeadStore

    counts, first = np.array([4, 4, 4, 3]), np.array([0, 4, 8, 12])
    n, d = 15, 3
    meta = HeadMeta(num_rows=n, dim=d, dtype="float32", optimizer=head_optimizer_meta(OptimConfig()), chunk_rows=4)
    owners = assign_shards(counts, 2)
    records = []
    for r in range(2):
        saved = MemoryHeadStore(meta)
        saved.weight.fill_(-1.0)
        for s in owners[r]:
            rows = slice(first[s], first[s] + counts[s])
            saved.weight[rows] = float(r)
            saved.exp_avg[rows] = 10.0 + r
            saved.exp_avg_sq[rows] = 20.0 + r
            saved.step_stamps[rows] = 5 + r
        records.append({"store": saved.save_files(tmp_path, f"head_rank{r}")})
    torch.save({"head": records[1]}, tmp_path / "client_state_rank1.pt")
    store = MemoryHeadStore(meta)
    head = SimpleNamespace(store=store, load_files=lambda folder, state: store.load_files(folder, state["store"]))
    load_memory_head(head, tmp_path, 2, records[0], counts, first)
    for r in range(2):
        for s in owners[r]:
            rows = slice(first[s], first[s] + counts[s])
            assert (store.weight[rows] == r).all() and (store.exp_avg_sq[rows] == 20 + r).all()
            assert (store.step_stamps[rows] == 5 + r).all()

