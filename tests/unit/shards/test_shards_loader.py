"""`ShardLoader`: epochs equal their plans, once-per-epoch coverage, workers, resume, ranks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diet_engine.engine.augment import make_eval_transform, make_train_transform
from diet_engine.storage.shards import Manifest, ShardLoader
from diet_engine.storage.shards.records import iter_samples


def _run(loader, epoch, start_batch=0):
    return list(loader.epoch(epoch, start_batch))


def _indices(batches):
    return [b[1].numpy() for b in batches]


def test_every_sample_once_per_epoch_reshuffled_and_deterministic(digits):
    m = Manifest.load(digits / "train")
    loader = ShardLoader(m, 100, seed=7)
    e0 = _indices(_run(loader, 0))
    assert loader.steps_per_epoch() == len(e0) == 15
    flat = np.concatenate(e0)
    assert sorted(flat.tolist()) == list(range(1437))
    e1 = np.concatenate(_indices(_run(loader, 1)))
    assert sorted(e1.tolist()) == list(range(1437)) and not np.array_equal(flat, e1)
    again = np.concatenate(_indices(_run(ShardLoader(m, 100, seed=7), 0)))
    np.testing.assert_array_equal(flat, again)
    other = np.concatenate(_indices(_run(ShardLoader(m, 100, seed=8), 0)))
    assert not np.array_equal(flat, other)


@pytest.mark.parametrize("cache_mb", [0, 256])
def test_images_labels_and_indices_agree_with_the_shards(digits, cache_mb):
    m = Manifest.load(digits / "test")
    truth = {}
    for p in m.shard_paths():
        for s in iter_samples(p):
            truth[int(s["index"])] = (np.asarray(Image.open(io.BytesIO(s["png"]))), int(s["cls"]))
    for x, idx, y in ShardLoader(m, 64, seed=1, with_labels=True, cache_mb=cache_mb).epoch(2):
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        for i, n in enumerate(idx.tolist()):
            np.testing.assert_allclose(x[i, 0].numpy(), truth[n][0] / 255.0, atol=1e-6)
            assert y[i].item() == truth[n][1]


@pytest.mark.parametrize(("workers", "cache_mb"), [(0, 0), (2, 0), (2, 256)])
def test_epoch_equals_plan_with_workers_and_resume(uneven, workers, cache_mb):
    m = Manifest.load(uneven)
    loader = ShardLoader(m, 16, seed=3, num_workers=workers, with_labels=True, cache_mb=cache_mb)
    plan = loader.plan(4)
    got = _run(loader, 4)
    assert len(got) == len(plan) == loader.steps_per_epoch() == 13
    for (x, idx, y), want in zip(got, plan, strict=True):
        np.testing.assert_array_equal(idx.numpy(), want)
        assert idx.dtype == torch.int64 and y.tolist() == (idx % 10).tolist() and x.shape[0] == len(want)
    assert sorted(np.concatenate(plan).tolist()) == list(range(203))
    for start in (5, 12):  # mid-epoch and inside the tail batches
        resumed = _run(loader, 4, start_batch=start)
        assert len(resumed) == 13 - start
        for (x, idx, _), (x0, idx0, _) in zip(resumed, got[start:], strict=True):
            np.testing.assert_array_equal(idx.numpy(), idx0.numpy())
            torch.testing.assert_close(x, x0)
    assert _run(loader, 4, start_batch=13) == []


def test_resume_reproduces_augmentations(uneven):
    m = Manifest.load(uneven)
    t = make_train_transform(6, 3, m.mean, m.std, channels=3)
    loader = ShardLoader(m, 16, t, seed=1)
    full = _run(loader, 0)
    resumed = _run(ShardLoader(m, 16, t, seed=1), 0, start_batch=7)
    for (x, _), (x0, _) in zip(resumed, full[7:], strict=True):
        assert x.shape == (len(x0), 3, 6, 6)
        torch.testing.assert_close(x, x0)
    state = torch.get_rng_state()
    _run(loader, 1)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_start_batch_skips_shards_without_reading_them(uneven, monkeypatch):
    from diet_engine.storage.shards import loader as loader_mod

    opened = []
    real = loader_mod.iter_samples
    monkeypatch.setattr(loader_mod, "iter_samples", lambda p: (opened.append(p), real(p))[1])
    loader = ShardLoader(Manifest.load(uneven), 20, seed=0, shuffle=False, cache_mb=0)
    _run(loader, 0, start_batch=9)
    assert [p.rsplit("/", 1)[1] for p in opened] == ["shard-000009.tar", "shard-000010.tar"]


def test_memory_cache_matches_streaming(uneven):
    m = Manifest.load(uneven)
    t = make_train_transform(8, 2, m.mean, m.std)
    a = _run(ShardLoader(m, 16, t, seed=5, with_labels=True, cache_mb=0), 2)
    b = _run(ShardLoader(m, 16, t, seed=5, with_labels=True), 2)
    for xa, xb in zip(a, b, strict=True):
        for u, v in zip(xa, xb, strict=True):
            torch.testing.assert_close(u, v)


def test_eval_mode_manifest_order(digits):
    m = Manifest.load(digits / "test")
    t = make_eval_transform(16, m.mean, m.std, channels=3)
    got = _run(ShardLoader(m, 50, t, shuffle=False, with_labels=True), 0)
    assert np.concatenate(_indices(got)).tolist() == list(range(360))
    assert got[0][0].shape == (50, 3, 16, 16)
    again = _run(ShardLoader(m, 50, t, shuffle=False, with_labels=True), 3)
    torch.testing.assert_close(torch.cat([b[0] for b in got]), torch.cat([b[0] for b in again]))


def test_multi_rank_disjoint_cover_equal_steps(uneven):
    m = Manifest.load(uneven)  # 10 shards of 20 + one of 3 → ranks of 3: 63, 60, 80? (greedy)
    world, B = 3, 8
    loaders = [ShardLoader(m, B, seed=2, rank=r, world_size=world, cache_mb=0) for r in range(world)]
    steps = {ld.steps_per_epoch() for ld in loaders}
    assert len(steps) == 1
    steps = steps.pop()
    owned = [set(ld.owned_rows().tolist()) for ld in loaders]
    assert set.union(*owned) == set(range(203)) and sum(len(o) for o in owned) == 203
    counts = sorted(len(o) for o in owned)
    assert counts[-1] - counts[0] <= 20  # balanced to within a shard
    for ld, own in zip(loaders, owned, strict=True):
        got = _run(ld, 1)
        assert len(got) == steps
        flat = np.concatenate(_indices(got))
        assert set(flat.tolist()) == own  # every own sample, nothing else
        if len(own) == max(counts):
            assert len(flat) == len(own)  # the longest rank: exactly once
        else:
            assert len(flat) == steps * B  # shorter ranks cycle their own samples
        for (_, idx), want in zip(got, ld.plan(1), strict=True):
            np.testing.assert_array_equal(idx.numpy(), want)
    shards = [set(ld.shards.tolist()) for ld in loaders]
    assert not (shards[0] & shards[1]) and not (shards[1] & shards[2]) and not (shards[0] & shards[2])
    assert loaders[0].owned_ranges()[0] == (0, 20)


def test_too_few_shards_and_bad_arguments(digits, uneven):
    m = Manifest.load(digits / "test")  # 2 shards
    with pytest.raises(ValueError, match="too few shards.*num_workers=2"):
        ShardLoader(m, 8, rank=0, world_size=2, num_workers=2)
    with pytest.raises(ValueError, match="world_size=3"):
        ShardLoader(m, 8, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        ShardLoader(m, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        ShardLoader(m, 0)
    with pytest.raises(ValueError, match="no batch"):
        ShardLoader(m, 1000, drop_last=True)
    loader = ShardLoader(Manifest.load(uneven), 16, drop_last=True)
    assert loader.steps_per_epoch() == 12 and all(len(i) == 16 for i in _indices(_run(loader, 0)))


def test_unlabelled_data_yields_minus_one(tmp_path, write_image):
    from diet_engine.storage.shards import prepare_folder

    for i in range(5):
        write_image(tmp_path / "flat" / f"{i}.png", size=(6, 6), seed=i)
    m = prepare_folder(tmp_path / "flat", tmp_path / "out", shard_size=5, workers=1, progress=False)
    (x, idx, y), = _run(ShardLoader(m, 5, with_labels=True, shuffle=False), 0)
    assert y.tolist() == [-1] * 5 and x.shape == (5, 3, 6, 6)
