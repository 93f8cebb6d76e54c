"""Shards and manifests that must be refused with an error naming the file and field, never read
as a silent subset: truncated tars, manifests that do not match their shards, malformed JSON."""

from __future__ import annotations

import copy
import json
import shutil
import tarfile

import pytest

from diet_engine.storage.shards import Manifest, ShardLoader, index_shards
from diet_engine.storage.shards.records import ShardReadError, check_complete


def _member_offsets(path):
    with tarfile.open(path) as t:
        return [m.offset for m in t.getmembers()]


@pytest.mark.parametrize("cut", ["member boundary", "inside a header", "inside data"])
def test_index_refuses_a_truncated_tar(digits, tmp_path, cut):
    """A tar cut at a member boundary reads as a valid shorter tar (tarfile ends silently); it once
    indexed as 5 of 8 samples with exit 0."""
    shutil.copytree(digits / "test", tmp_path / "t")
    (tmp_path / "t" / "manifest.json").unlink()
    shard = tmp_path / "t" / "shard-000001.tar"
    raw = shard.read_bytes()
    offs = _member_offsets(shard)
    at = {"member boundary": offs[30], "inside a header": offs[30] + 100, "inside data": offs[30] + 600}[cut]
    shard.write_bytes(raw[:at])
    with pytest.raises(ShardReadError, match="shard-000001.tar"):
        index_shards(tmp_path / "t", progress=False)
    assert not (tmp_path / "t" / "manifest.json").exists()


def test_a_complete_tar_passes_the_end_check(digits):
    for p in Manifest.load(digits / "test").shard_paths():
        check_complete(p)


def _with_manifest(digits, tmp_path, edit):
    shutil.copytree(digits / "test", tmp_path / "t")
    f = tmp_path / "t" / "manifest.json"
    d = json.loads(f.read_text())
    edit(d)
    f.write_text(json.dumps(d))
    return tmp_path / "t"


def test_a_manifest_declaring_fewer_samples_than_the_shard_holds_is_refused_when_read(digits, tmp_path):
    """Shard 1 holds 104 samples; a manifest that gives it 100 once trained on a subset without a word."""

    def shrink(d):
        d["shards"][1]["num_samples"] -= 4
        d["num_samples"] -= 4

    root = _with_manifest(digits, tmp_path, shrink)
    m = Manifest.load(root)
    with pytest.raises(ShardReadError, match="outside the range"):
        for _ in ShardLoader(m, 32, seed=0, cache_mb=0).epoch(0):
            pass
    with pytest.raises(ShardReadError, match="outside the range"):  # the in-memory cache path too
        for _ in ShardLoader(m, 32, seed=0, cache_mb=256).epoch(0):
            pass


def _set(path, value):
    def edit(d):
        obj = d
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return edit


def _drop(path):
    def edit(d):
        obj = d
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]
    return edit


BAD_MANIFESTS = {
    # name: (edit, words the error must contain)
    "num_samples is text": (_set(["num_samples"], "360"), "num_samples"),
    "num_samples is a bool": (_set(["num_samples"], True), "num_samples"),
    "shard_size missing": (_drop(["shard_size"]), "shard_size"),
    "shards not a list": (_set(["shards"], {"file": "x"}), "shards"),
    "a shard not an object": (_set(["shards", 0], "shard-000000.tar"), "shards[0]"),
    "a shard's file missing": (_drop(["shards", 0, "file"]), "file"),
    "first_index a float": (_set(["shards", 1, "first_index"], 256.5), "first_index"),
    "image missing": (_drop(["image"]), "image"),
    "mean not numbers": (_set(["image", "mean"], ["a"]), "mean"),
    "std is NaN": (_set(["image", "std"], [float("nan")]), "std"),
    "std is zero": (_set(["image", "std"], [0.0]), "std"),
    "mean infinite": (_set(["image", "mean"], [float("inf")]), "mean"),
    "label_names not strings": (_set(["label_names"], [1, 2]), "label_names"),
    "format_version text": (_set(["format_version"], "1"), "format_version"),
    "wrong format": (_set(["format"], "something-else"), "not a diet-shards manifest"),
    "shard counts do not tile": (_set(["shards", 1, "num_samples"], 7), "num_samples"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_malformed_manifest_is_a_clear_error(digits, tmp_path, case):
    edit, words = BAD_MANIFESTS[case]
    root = _with_manifest(digits, tmp_path, edit)
    with pytest.raises(ValueError, match="manifest.json") as e:
        Manifest.load(root)
    assert words in str(e.value)


def test_manifest_that_is_not_an_object(digits, tmp_path):
    shutil.copytree(digits / "test", tmp_path / "t")
    (tmp_path / "t" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a diet-shards manifest"):
        Manifest.load(tmp_path / "t")


def test_unknown_manifest_keys_are_ignored(digits, tmp_path):
    """Written by a newer version: extra keys do not make a manifest unreadable."""
    root = _with_manifest(digits, tmp_path, _set(["written_by"], {"tool": "future"}))
    m = Manifest.load(root)
    assert m.num_samples == 360 and copy.deepcopy(m.to_dict())["num_samples"] == 360


# ---- odd image modes and bit depths, labels out of range ------------------------------------------


def _pixels_of(manifest_root):
    """Decoded (C, H, W) uint8 pixels of every sample, by index."""
    from diet_engine.storage.shards.records import decode, iter_samples

    m = Manifest.load(manifest_root)
    return {int(s["index"]): decode(s[m.image_field or "png"], m.image.channels) for p in m.shard_paths()
            for s in iter_samples(p)}


def _mode_image(mode):
    import numpy as np
    from PIL import Image

    ramp = np.arange(48, dtype=np.uint32).reshape(6, 8)
    if mode == "I;16":  # a 16-bit ramp up to 65535: Pillow's convert('L') clipped all of it above 255 to 255
        im = Image.fromarray((ramp * 65535 // 47).astype(np.uint16))
        assert im.mode == "I;16"
        return im, (ramp * 255 + 23) // 47
    if mode == "I":  # 32-bit integers holding 16-bit values (TIFF; older Pillows decode 16-bit PNGs so)
        im = Image.fromarray((ramp * 65535 // 47).astype(np.int32))
        assert im.mode == "I"
        return im, (ramp * 255 + 23) // 47
    gray = (ramp * 5).astype(np.uint8)
    if mode == "P":
        return Image.fromarray(gray, "L").convert("P"), gray
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(gray), Image.fromarray(np.full_like(gray, 128))]), gray
    if mode == "RGBA":
        rgb = Image.fromarray(np.stack([gray] * 3, -1), "RGB")
        return Image.merge("RGBA", [*rgb.split(), Image.fromarray(np.full_like(gray, 200))]), gray
    if mode == "1":
        bits = (ramp % 2).astype(bool)
        return Image.fromarray(bits), np.where(bits, 255, 0)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "P", "LA", "RGBA", "1"])
def test_odd_image_modes_become_the_right_8bit_gray(tmp_path, mode):
    import numpy as np

    from diet_engine.storage.shards import prepare_folder

    im, want = _mode_image(mode)
    (tmp_path / "src" / "a").mkdir(parents=True)
    im.save(tmp_path / "src" / "a" / ("x.tif" if mode == "I" else "x.png"))
    prepare_folder(tmp_path / "src", tmp_path / "out", channels=1, workers=1, progress=False)
    got = _pixels_of(tmp_path / "out")[0][0].numpy().astype(int)
    assert np.abs(got - want).max() <= 1, f"{mode}: {got[-1]} vs {want[-1]}"


def test_16bit_png_inside_foreign_shards_is_scaled_not_clipped(tmp_path):
    import io

    import numpy as np
    import webdataset as wds

    im, want = _mode_image("I;16")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "a.tar"), encoder=False) as tw:
        tw.write({"__key__": "000000", "png": buf.getvalue(), "cls": b"0"})
    index_shards(tmp_path / "s", progress=False, channels=1)
    x = next(iter(ShardLoader(Manifest.load(tmp_path / "s"), 1, seed=0, cache_mb=0).epoch(0)))[0]
    assert np.abs(np.round(x[0, 0].numpy() * 255).astype(int) - want).max() <= 1


def test_float_images_are_refused_with_the_file_named(tmp_path):
    import numpy as np
    from PIL import Image

    from diet_engine.storage.shards import prepare_folder

    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8), "F").save(tmp_path / "src" / "a" / "f.tif")
    with pytest.raises(ValueError, match="f.tif"):
        prepare_folder(tmp_path / "src", tmp_path / "out", channels=1, workers=1, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("label", [b"-1", b"7"])
def test_labels_out_of_range_are_refused(digits, tmp_path, label):
    """A negative label at indexing; a label ≥ the manifest's classes when read."""
    import numpy as np
    import webdataset as wds

    from diet_engine.storage.shards.sources import encode_png

    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "a.tar"), encoder=False) as tw:
        for n in range(6):
            tw.write({"__key__": f"{n:06d}", "png": encode_png(np.full((4, 4), n, np.uint8)),
                      "cls": label if n == 5 else str(n % 3).encode()})
    if label == b"-1":
        with pytest.raises(ShardReadError, match="negative label"):
            index_shards(tmp_path / "s", progress=False)
        return
    index_shards(tmp_path / "s", progress=False)  # num_classes = 8 from the largest label
    f = tmp_path / "s" / "manifest.json"
    d = json.loads(f.read_text())
    d["num_classes"] = 3  # what the data set says it has
    f.write_text(json.dumps(d))
    with pytest.raises(ShardReadError, match="label 7, outside"):
        list(ShardLoader(Manifest.load(tmp_path / "s"), 2, seed=0, with_labels=True, cache_mb=0).epoch(0))
