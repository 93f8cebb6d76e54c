"""The epoch in progress when the rank count changes (plan.py's design note): counting visits.

A run does b batches of epoch e on K ranks, then the rest of e on K' ranks (possibly a third rank
count after that). Over the epoch every sample is visited at least once and at most the documented
bound (`continued_bound`), which is 2 for balanced shards; every rank runs the same number of
steps, and only its own shards; the loader yields exactly the continued plan."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from diet_engine.storage.shards import Manifest, ShardLoader
from diet_engine.storage.shards.plan import (
    assign_shards,
    continued_bound,
    epoch_plans,
    epoch_visits,
    num_batches,
)


def _layout(counts):
    counts = np.asarray(counts, np.int64)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), counts


def _epoch(counts, history, world, batch, streams=1, shuffle=True, epoch=1, seed=3):
    """Visits over the whole epoch: `history` [(K, b), ...] then the rest on `world` ranks."""
    first, counts = _layout(counts)
    kw = dict(batch_size=batch, epoch=epoch, seed=seed, num_streams=streams, drop_last=False, shuffle=shuffle)
    before = epoch_visits(first, counts, history, **kw)
    plans = epoch_plans(first, counts, world, before, **kw)
    rest = np.bincount(np.concatenate([b for p in plans for b in p.batches] or [np.zeros(0, np.int64)]),
                       minlength=int(counts.sum()))
    owners = assign_shards(counts, world)
    bounds = [continued_bound(first, counts, o, before if before is not None else np.zeros(int(counts.sum()), int),
                              sum(len(b) for b in p.batches)) for o, p in zip(owners, plans, strict=True)]
    return first, counts, owners, plans, (0 if before is None else before) + rest, max(bounds)


@settings(max_examples=80, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=4, max_size=12), k_old=st.integers(1, 4),
       k_new=st.integers(1, 4), batch=st.integers(1, 17), streams=st.integers(1, 2), frac=st.floats(0, 1),
       shuffle=st.booleans())
def test_every_sample_at_least_once_and_within_the_bound(counts, k_old, k_new, batch, streams, frac, shuffle):
    if len(counts) < max(k_old, k_new) * streams:
        return
    first, c = _layout(counts)
    steps_old = max(num_batches(int(c[o].sum()), batch, False) for o in assign_shards(c, k_old))
    b = int(frac * steps_old)
    first, c, owners, plans, visits, bound = _epoch(counts, [(k_old, b)], k_new, batch, streams, shuffle)
    assert visits.min() >= 1  # nothing skipped
    assert visits.max() <= bound
    steps = {len(p.batches) for p in plans}
    assert len(steps) == 1  # equal steps on every rank
    for o, p in zip(owners, plans, strict=True):
        own = set(np.concatenate([np.arange(first[s], first[s] + c[s]) for s in o]).tolist())
        idx = np.concatenate(p.batches) if p.batches else np.zeros(0, np.int64)
        assert set(idx.tolist()) <= own
        assert all(len(x) == batch for x in p.batches[:-1])
        # work items reassemble the batches
        got = {pc.batch: it.indices[pc.lo:pc.hi] for s in p.streams for it in s for pc in it.pieces}
        assert sorted(got) == list(range(len(p.batches)))
        for k, x in got.items():
            np.testing.assert_array_equal(x, p.batches[k])


def test_balanced_shards_visit_at_most_twice():
    """Ten shards of 64 and one of 44, B = 16, every split point: 2→1, 1→2, 4→2, 3→2, and 2→1→3."""
    counts = [64] * 10 + [44]
    _, c = _layout(counts)
    for k_old, k_new in ((2, 1), (1, 2), (4, 2), (3, 2), (2, 3)):
        steps_old = max(num_batches(int(c[o].sum()), 16, False) for o in assign_shards(c, k_old))
        for b in range(steps_old + 1):
            *_, plans, visits, bound = _epoch(counts, [(k_old, b)], k_new, 16)
            assert visits.min() == 1 and visits.max() <= bound <= 2, (k_old, k_new, b)
    first, c, owners, plans, visits, _ = _epoch(counts, [(2, 7), (1, 10)], 3, 16)
    assert visits.min() == 1 and visits.max() <= 2


def test_no_history_is_the_ordinary_plan():
    """With no batch done before the change (b = 0) the epoch is the new rank count's ordinary one."""
    counts = [64] * 10 + [44]
    first, c = _layout(counts)
    kw = dict(batch_size=16, epoch=2, seed=0, num_streams=1, drop_last=False, shuffle=True)
    zero = epoch_visits(first, c, [(2, 0)], **kw)
    assert zero is not None and not zero.any()
    cont = epoch_plans(first, c, 1, zero, **kw)[0]
    ordinary = epoch_plans(first, c, 1, None, **kw)[0]
    np.testing.assert_array_equal(np.concatenate(cont.batches), np.concatenate(ordinary.batches))


def test_loader_continues_the_epoch(uneven):
    """`ShardLoader.continue_epoch`: steps_in_epoch, plan and the yielded batches follow the continued
    plan; the next epoch is ordinary again."""
    m = Manifest.load(uneven)
    history = [(2, 3)]
    loaders = [ShardLoader(m, 16, None, seed=3, rank=r, world_size=3) for r in range(3)]
    for ld in loaders:
        ld.continue_epoch(1, history)
    first, counts = np.asarray(m.first_indices()), np.asarray(m.shard_counts())
    kw = dict(batch_size=16, epoch=1, seed=3, num_streams=1, drop_last=False, shuffle=True)
    plans = epoch_plans(first, counts, 3, epoch_visits(first, counts, history, **kw), **kw)
    seen = epoch_visits(first, counts, history, **kw)
    for ld, p in zip(loaders, plans, strict=True):
        assert ld.steps_in_epoch(1) == len(p.batches) < ld.steps_per_epoch() == ld.steps_in_epoch(2)
        assert 0 < ld.epoch_progress(1) < 1 and ld.epoch_progress(2) == 0
        got = [idx.numpy() for _, idx in ld.epoch(1, start_batch=1)]
        assert len(got) == len(p.batches) - 1
        for a, b in zip(got, p.batches[1:], strict=True):
            np.testing.assert_array_equal(a, b)
        seen = seen + np.bincount(np.concatenate(ld.plan(1)), minlength=m.num_samples)
        assert len(ld.plan(2)) == ld.steps_per_epoch()
    assert seen.min() >= 1 and seen.max() <= 2
