"""`diet prepare`: digits, folder, synthetic; round trip, bad input, all-or-nothing output."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from diet_engine.storage.shards import Manifest, prepare_digits, prepare_folder, prepare_synthetic
from diet_engine.storage.shards import prepare as prepare_mod
from diet_engine.storage.shards.records import iter_samples
from diet_engine.storage.shards.sources import encode_png, synthetic_images


def _members(path):
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def test_digits_manifest_split_and_round_trip(digits):
    from sklearn.datasets import load_digits

    train, test = Manifest.load(digits / "train"), Manifest.load(digits / "test")
    assert (train.num_samples, test.num_samples) == (1437, 360)
    assert [s.num_samples for s in train.shards] == [256] * 5 + [157]
    assert [s.first_index for s in train.shards] == [0, 256, 512, 768, 1024, 1280]
    assert train.shard_paths()[0].name == "shard-000000.tar"
    assert train.label_names == [str(i) for i in range(10)] and train.num_classes == 10
    assert (train.image.channels, train.image.height, train.image.width) == (1, 8, 8)
    assert 0.2 < train.mean[0] < 0.4 and 0.3 < train.std[0] < 0.45
    src_train, src_test = train.split["source_indices"], test.split["source_indices"]
    assert sorted(src_train + src_test) == list(range(1797)) and train.split["seed"] == 0
    # stratified: every class is ~20% test
    d = load_digits()
    frac = np.bincount(d.target[src_test], minlength=10) / np.bincount(d.target, minlength=10)
    assert np.all(np.abs(frac - 0.2) < 0.02)
    # round trip of one shard through WebDataset: keys, index field, labels, pixels
    shard = train.shard_paths()[1]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
    assert len(samples) == 256
    for pos, s in enumerate(samples):
        n = 256 + pos
        assert s["__key__"] == f"{n:09d}" and "." not in s["__key__"]
        assert int(s["index"]) == n
        src = src_train[n]
        assert int(s["cls"]) == d.target[src]
        pixels = np.asarray(Image.open(io.BytesIO(s["png"])))
        np.testing.assert_array_equal(pixels, np.round(d.images[src] * 255 / 16).astype(np.uint8))


def test_digits_is_reproducible(tmp_path, digits):
    # (how fast it is belongs to a benchmark, not to an assertion that a loaded machine can fail)
    prepare_digits(tmp_path / "d")
    for split in ("train", "test"):
        a = sorted(p.name for p in (digits / split).iterdir())
        assert a == sorted(p.name for p in (tmp_path / "d" / split).iterdir())
        for name in a:  # byte-identical shards and manifest
            assert (digits / split / name).read_bytes() == (tmp_path / "d" / split / name).read_bytes()


def test_tar_format_is_standard(digits):
    names = [n for n, _ in _members(digits / "test" / "shard-000001.tar")]
    assert names[:3] == ["000000256.cls", "000000256.index", "000000256.png"]
    assert len(names) == 3 * 104


def test_png_encoder_round_trips():
    rng = np.random.default_rng(0)
    for shape in [(8, 8), (5, 7, 1), (9, 4, 3)]:
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        back = np.asarray(Image.open(io.BytesIO(encode_png(x))))
        np.testing.assert_array_equal(back, x.reshape(back.shape))


def test_synthetic_deterministic_from_index(tmp_path):
    m1 = prepare_synthetic(tmp_path / "a", 57, shard_size=10, workers=1, progress=False)
    m2 = prepare_synthetic(tmp_path / "b", 57, shard_size=25, workers=2, progress=False)
    assert m1.num_shards == 6 and m1.shards[-1].num_samples == 7 and m2.num_shards == 3
    a = {int(s["index"]): s for p in m1.shard_paths() for s in iter_samples(p)}
    b = {int(s["index"]): s for p in m2.shard_paths() for s in iter_samples(p)}
    assert sorted(a) == list(range(57))
    for n in range(57):
        assert a[n]["png"] == b[n]["png"] and int(a[n]["cls"]) == n % 10
    imgs, labels = synthetic_images(np.arange(57), 8, 1, 10)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(a[5]["png"]))), imgs[5, :, :, 0])
    rgb = prepare_synthetic(tmp_path / "c", 12, shard_size=5, size=16, channels=3, workers=1, progress=False)
    assert (rgb.image.channels, rgb.image.height) == (3, 16) and len(rgb.mean) == 3


def test_folder_classes_and_flat(tmp_path, write_image):
    root = tmp_path / "imgs"
    px = {}
    for c in ("cat", "dog"):
        for i in range(3):
            px[(c, i)] = write_image(root / c / f"{i}.png", seed=hash((c, i)) % 1000)
    write_image(root / "dog" / "sub" / "9.jpg", size=(20, 16), seed=5)
    m = prepare_folder(root, tmp_path / "out", shard_size=4, workers=1, progress=False)
    assert m.num_samples == 7 and [s.num_samples for s in m.shards] == [4, 3]
    assert m.label_names == ["cat", "dog"] and m.num_classes == 2 and m.image.channels == 3
    assert not m.image.uniform_size and m.image.format == "mixed"
    samples = [s for p in m.shard_paths() for s in iter_samples(p)]
    assert [int(s["cls"]) for s in samples] == [0, 0, 0, 1, 1, 1, 1]
    assert [int(s["index"]) for s in samples] == list(range(7))
    assert samples[0]["png"] == (root / "cat" / "0.png").read_bytes()  # 'keep' copies bytes
    assert "jpg" in samples[6]
    flat = tmp_path / "flat"
    for i in range(3):
        write_image(flat / f"{i}.jpg", seed=i)
    m = prepare_folder(flat, tmp_path / "out2", shard_size=2, resize=5, channels=1, image_format="png",
                       workers=1, progress=False)
    assert m.num_classes is None and m.label_field is None and m.label_names is None
    assert (m.image.channels, m.image.height, m.image.width) == (1, 5, 6)
    s = next(iter_samples(m.shard_paths()[0]))
    assert "cls" not in s and Image.open(io.BytesIO(s["png"])).size == (6, 5)


def _bad_folder(tmp_path, write_image, n=4):
    root = tmp_path / "imgs"
    for i in range(n):
        write_image(root / "a" / f"{i:02d}.png", size=(4, 4), seed=i)
    (root / "a" / "02.png").write_bytes(b"this is not a png")
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image_names_the_file_and_leaves_nothing(tmp_path, write_image, workers):
    root = _bad_folder(tmp_path, write_image, n=40)  # 40 files: the 2-worker run goes through the pool
    with pytest.raises(ValueError, match=r"a/02\.png"):
        prepare_folder(root, tmp_path / "out", shard_size=2, workers=workers, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no output, no staging folder


def test_skip_bad_counts(tmp_path, write_image):
    root = _bad_folder(tmp_path, write_image)
    m = prepare_folder(root, tmp_path / "out", shard_size=2, skip_bad=True, workers=2, progress=False)
    assert m.num_samples == 3 and m.source["skipped"] == 1 and m.source["skipped_files"][0].endswith("02.png")
    assert [int(s["index"]) for p in m.shard_paths() for s in iter_samples(p)] == [0, 1, 2]


def test_existing_output_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    prepare_synthetic(out, 10, shard_size=4, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_synthetic(out, 30, shard_size=4, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    m = prepare_synthetic(out, 30, shard_size=4, workers=1, progress=False, overwrite=True)
    assert Manifest.load(out).num_samples == 30 == m.num_samples
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    prepare_synthetic(tmp_path / "empty", 3, shard_size=4, workers=1, progress=False)


def test_injected_failure_leaves_old_output_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare_synthetic(out, 10, shard_size=4, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = prepare_mod.write_shard
    calls = []

    def flaky(path, *a, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return real(path, *a, **kw)

    monkeypatch.setattr(prepare_mod, "write_shard", flaky)
    with pytest.raises(OSError, match="injected"):
        prepare_synthetic(out, 40, shard_size=4, workers=1, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    calls.clear()
    with pytest.raises(OSError, match="injected"):
        prepare_synthetic(tmp_path / "new", 40, shard_size=4, workers=1, progress=False)
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_manifest_names_missing_shard(digits, tmp_path):
    d = json.loads((digits / "test" / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    (tmp_path / "shard-000000.tar").write_bytes((digits / "test" / "shard-000000.tar").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"shard-000001\.tar"):
        Manifest.load(tmp_path)
    d["shards"][1]["first_index"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="shard-000001.tar starts at index 7"):
        Manifest.load(tmp_path / "manifest.json", check_files=False)
    with pytest.raises(FileNotFoundError, match="diet prepare"):
        Manifest.load(tmp_path / "nowhere")
