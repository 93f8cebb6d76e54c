"""Epoch plans from the manifest alone: coverage, balance, equal steps, work items (no I/O)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from diet_engine.storage.shards.plan import assign_shards, make_epoch_plan, num_batches


def _plans(counts, world, streams, batch, drop_last, shuffle, epoch=0, seed=0, start_batch=0):
    counts = np.asarray(counts, np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    owners = assign_shards(counts, world)
    steps = max(num_batches(int(counts[o].sum()), batch, drop_last) for o in owners)
    plans = [make_epoch_plan(first, counts, owners[r], steps=steps, batch_size=batch, epoch=epoch, seed=seed,
                             rank=r, num_streams=streams, drop_last=drop_last, shuffle=shuffle,
                             start_batch=start_batch) for r in range(world)]
    return first, owners, steps, plans


def test_assign_shards_greedy_largest_first():
    owners = assign_shards([10, 10, 10, 10, 3], 2)
    assert [o.tolist() for o in owners] == [[0, 2, 4], [1, 3]]
    owners = assign_shards([1, 9, 5, 5], 2)  # 9 → r0, 5 → r1, 5 → r1, 1 → r0
    assert [o.tolist() for o in owners] == [[0, 1], [2, 3]]


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=12), world=st.integers(1, 3),
       streams=st.integers(1, 3), batch=st.integers(1, 17), drop_last=st.booleans(), shuffle=st.booleans(),
       epoch=st.integers(0, 3), start=st.integers(0, 8))
def test_plan_properties(counts, world, streams, batch, drop_last, shuffle, epoch, start):
    if len(counts) < world:
        return
    first, owners, steps, plans = _plans(counts, world, streams, batch, drop_last, shuffle, epoch)
    if steps == 0:
        return
    seen_by_rank = []
    for r, plan in enumerate(plans):
        own = np.concatenate([np.arange(first[s], first[s] + counts[s]) for s in owners[r]])
        assert len(plan.batches) == steps  # equal on every rank
        allidx = np.concatenate(plan.batches)
        assert set(allidx.tolist()) <= set(own.tolist())  # only its own shards
        n_r = len(own)
        full = num_batches(n_r, batch, drop_last) == steps
        assert all(len(b) == batch for b in plan.batches[:-1]) and 0 < len(plan.batches[-1]) <= batch
        if full and not drop_last:
            assert sorted(allidx.tolist()) == own.tolist()  # exactly once
        elif full:
            assert len(set(allidx.tolist())) == len(allidx) == steps * batch
        else:  # short rank: every own sample at least once, the rest cycled
            assert set(allidx.tolist()) == set(own.tolist()) and len(allidx) == steps * batch
        seen_by_rank.append(set(allidx.tolist()))
        # work items reassemble the batches exactly (start_batch drops only earlier batches)
        sb = min(start, steps)
        p2 = make_epoch_plan(first, np.asarray(counts), owners[r], steps=steps, batch_size=batch, epoch=epoch,
                             seed=0, rank=r, num_streams=streams, drop_last=drop_last, shuffle=shuffle,
                             start_batch=sb)
        rebuilt = {}
        for items in p2.streams:
            for it in items:
                for p in it.pieces:
                    rebuilt.setdefault(p.batch, {}).update(
                        {p.offset + j: int(v) for j, v in enumerate(it.indices[p.lo:p.hi])})
        assert sorted(rebuilt) == list(range(sb, steps))
        for k, pos in rebuilt.items():
            assert [pos[j] for j in range(len(pos))] == plan.batches[k].tolist()
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen_by_rank[a] & seen_by_rank[b]  # disjoint ranks


def test_shuffle_and_determinism():
    counts = [20] * 6 + [7]
    _, _, _, (p0,) = _plans(counts, 1, 2, 8, False, True, epoch=0)
    _, _, _, (p0b,) = _plans(counts, 1, 2, 8, False, True, epoch=0)
    _, _, _, (p1,) = _plans(counts, 1, 2, 8, False, True, epoch=1)
    _, _, _, (q0,) = _plans(counts, 1, 2, 8, False, True, epoch=0, seed=5)
    flat = lambda p: np.concatenate(p.batches).tolist()  # noqa: E731
    assert flat(p0) == flat(p0b) and flat(p0) != flat(p1) and flat(p0) != flat(q0)
    assert sorted(flat(p0)) == sorted(flat(p1)) == list(range(127))
    # shard-clustered: a batch spans at most 2 shards of its stream
    for b in p0.batches[:-2]:
        assert len(set((b // 20).tolist())) <= 2
    _, _, _, (o,) = _plans(counts, 1, 1, 8, False, False)
    assert flat(o) == list(range(127))  # shuffle=False, one stream: manifest order
