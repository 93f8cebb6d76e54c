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
