"""Sliding window (PIC's data scheduler over shards): each window of shards is visited `passes`
times before the next, so samples recur within a few steps; the loader yields exactly the plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diet_engine.engine.config import RunConfig
from diet_engine.storage.shards import Manifest, ShardLoader
from diet_engine.storage.shards.plan import assign_shards, make_epoch_plan, num_batches


def _plan(counts, *, window, passes, batch=7, streams=1, world=1, rank=0, epoch=0, shuffle=True, drop_last=False):
    counts = np.asarray(counts, np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    owners = assign_shards(counts, world)
    steps = max(num_batches(passes * int(counts[o].sum()), batch, drop_last) for o in owners)
    plan = make_epoch_plan(first, counts, owners[rank], steps=steps, batch_size=batch, epoch=epoch, seed=5,
                           rank=rank, num_streams=streams, drop_last=drop_last, shuffle=shuffle,
                           window=window, passes=passes)
    return first, owners[rank], plan


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=10), window=st.integers(1, 4),
       passes=st.integers(2, 4), batch=st.integers(1, 13), streams=st.integers(1, 3), shuffle=st.booleans())
def test_every_sample_passes_times_and_windows_stay_together(counts, window, passes, batch, streams, shuffle):
    if len(counts) < streams:
        return
    first, shards, plan = _plan(counts, window=window, passes=passes, batch=batch, streams=streams, shuffle=shuffle)
    flat = np.concatenate(plan.batches)
    visits = np.bincount(flat, minlength=int(sum(counts)))
    assert (visits == passes).all()  # one rank, no drop_last: exactly `passes` visits each
    # each stream's items touch whole windows: one window's shards, read once, before the next window
    shard_of = np.searchsorted(first, np.arange(int(sum(counts))), side="right") - 1
    for items in plan.streams:
        seq = np.concatenate([it.indices for it in items]) if items else np.zeros(0, np.int64)
        sh = shard_of[seq]
        done: set[int] = set()
        current: set[int] = set()
        for s in sh.tolist():  # a shard, once left, never comes back within the stream's full batches
            if s not in current:
                if len(current) == window:
                    done |= current
                    current = set()
                assert s not in done
                current.add(s)


def test_passes_one_is_the_plain_plan():
    counts = [20, 20, 20, 3]
    a = _plan(counts, window=2, passes=1)[2]
    b = _plan(counts, window=0, passes=1)[2]
    for x, y in zip(a.batches, b.batches, strict=True):
        np.testing.assert_array_equal(x, y)


def test_samples_recur_within_the_window_not_the_epoch():
    counts = [100] * 10  # 1,000 samples, batch 10: an epoch of the plain order is 100 steps
    _, _, plan = _plan(counts, window=2, passes=3, batch=10)
    last: dict[int, int] = {}
    gaps = []
    for k, b in enumerate(plan.batches):
        for n in b.tolist():
            if n in last:
                gaps.append(k - last[n])
            last[n] = k
    assert len(gaps) == 2 * 1000  # two recurrences per sample
    assert max(gaps) < 2 * 200 / 10  # within two windows' worth of steps (200 samples per window)
    assert np.mean(gaps) == pytest.approx(20, rel=0.2)  # ~ a window's steps, not an epoch's (300)


def test_window_permutations_differ_by_pass_and_epoch():
    _, _, p0 = _plan([30, 30], window=2, passes=2, batch=60)
    a, b = p0.batches
    assert sorted(a.tolist()) == sorted(b.tolist()) == list(range(60)) and not np.array_equal(a, b)
    _, _, p1 = _plan([30, 30], window=2, passes=2, batch=60, epoch=1)
    assert not np.array_equal(p1.batches[0], a)


@pytest.mark.parametrize(("workers", "cache_mb"), [(0, 0), (2, 0), (0, 256)])
def test_loader_yields_the_windowed_plan(uneven, workers, cache_mb):
    m = Manifest.load(uneven)  # 203 samples in 11 shards
    loader = ShardLoader(m, 16, seed=3, num_workers=workers, with_labels=True, cache_mb=cache_mb,
                         window_shards=3, window_passes=2)
    plan = loader.plan(1)
    assert loader.steps_per_epoch() == len(plan) == -(-2 * 203 // 16)
    got = list(loader.epoch(1))
    for (_, idx, y), want in zip(got, plan, strict=True):
        np.testing.assert_array_equal(idx.numpy(), want)
        assert y.tolist() == (idx % 10).tolist()
    assert (np.bincount(np.concatenate(plan), minlength=203) == 2).all()
    resumed = list(loader.epoch(1, start_batch=9))
    for (x, idx, _), (x0, idx0, _) in zip(resumed, got[9:], strict=True):
        np.testing.assert_array_equal(idx.numpy(), idx0.numpy())
        torch.testing.assert_close(x, x0)


def test_bad_window_options_and_rank_change_are_refused(uneven):
    m = Manifest.load(uneven)
    with pytest.raises(ValueError, match="window_shards"):
        ShardLoader(m, 16, window_shards=0, window_passes=2)
    with pytest.raises(ValueError, match="window_passes"):
        ShardLoader(m, 16, window_shards=2, window_passes=0)
    loader = ShardLoader(m, 16, window_shards=2, window_passes=2)
    with pytest.raises(ValueError, match="plain order only"):
        loader.continue_epoch(0, [(2, 3)])
    cfg = RunConfig()
    cfg.data.window_passes = 2
    with pytest.raises(ValueError, match="data.window_shards"):
        cfg.validate()
