"""Resume on another rank count, the parts without processes (engine/reshard.py): the position rule,
the learning-rate rule, and the memory head's merge of the old ranks' rows."""

from __future__ import annotations

import numpy as np
import torch

from diet_engine.engine.config import RunConfig
from diet_engine.engine.reshard import (
    continued_lrs,
    continued_position,
    memory_head_state,
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
    """Rank r's saved state is current only on its own shards' rows: the merge takes each row there."""
    counts, first = np.array([4, 4, 4, 3]), np.array([0, 4, 8, 12])
    n, d = 15, 3
    owners = assign_shards(counts, 2)
    states = []
    for r in range(2):
        store = {"weight": torch.full((n, d), -1.0), "exp_avg": torch.full((n, d), -1.0),
                 "exp_avg_sq": torch.full((n, d), -1.0), "step": torch.zeros(n, dtype=torch.int64), "meta": {}}
        for s in owners[r]:
            rows = slice(first[s], first[s] + counts[s])
            store["weight"][rows] = float(r)
            store["exp_avg"][rows] = 10.0 + r
            store["exp_avg_sq"][rows] = 20.0 + r
            store["step"][rows] = 5 + r
        states.append({"head": {"store": store}})
    torch.save(states[1], tmp_path / "client_state_rank1.pt")
    merged = memory_head_state(tmp_path, 2, states[0]["head"], counts, first)["store"]
    for r in range(2):
        for s in owners[r]:
            rows = slice(first[s], first[s] + counts[s])
            assert (merged["weight"][rows] == r).all() and (merged["exp_avg_sq"][rows] == 20 + r).all()
            assert (merged["step"][rows] == 5 + r).all()
    assert (states[0]["head"]["store"]["weight"] != 1.0).all()  # the saved state itself is not modified
