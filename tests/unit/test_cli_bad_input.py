"""The bad-input table of the `diet` command line: one row per input a careless or hostile user
may type or hand over, per command. Each must end in one `diet <command>: error:` line naming what
is wrong, exit status 2 (argparse's own usage errors: its usage line and 2), never a traceback,
and nothing half-written. Inputs of the training loop proper (manifests, shards, head stores,
backbone files, resumes) have their own tables beside their modules' tests."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from diet_engine.launch.cli import main


@pytest.fixture
def files(tmp_path, digits):
    """Bad things on disk to point the commands at."""
    f = {"tmp": tmp_path, "digits": digits}
    (tmp_path / "empty").mkdir()
    imgs = tmp_path / "imgs" / "cat"
    imgs.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(imgs / f"{i}.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "wrongtype.json").write_text(json.dumps({"train": {"batch_size": "many"}}))
    (tmp_path / "unknown.json").write_text(json.dumps({"trian": {"batch_size": 3}}))
    shutil.copytree(digits / "test", tmp_path / "badmanifest")
    (tmp_path / "badmanifest" / "manifest.json").write_text(json.dumps({"format": "diet-shards", "num_samples": "x"}))
    shutil.copytree(digits / "test", tmp_path / "trunc")
    (tmp_path / "trunc" / "manifest.json").unlink()
    shard = tmp_path / "trunc" / "shard-000000.tar"
    with tarfile.open(shard) as t:
        cut = [m.offset for m in t.getmembers()][30]  # a member boundary: reads as a valid, shorter tar
    shard.write_bytes(shard.read_bytes()[:cut])
    (tmp_path / "run_nockpt").mkdir()
    (tmp_path / "run_nockpt" / "config.json").write_text(json.dumps({"head": {"store": "disk"}}))
    (tmp_path / "out_exists").mkdir()
    (tmp_path / "out_exists" / "x").write_text("keep me")
    return f


T = "{tmp}"
CASES = {
    # command: [(argv with {tmp}/{digits} placeholders, words the error names), ...]
    "prepare": [
        (["prepare", "folder", "{tmp}/nope", "--out", "{tmp}/o1"], "nope"),
        (["prepare", "folder", "{tmp}/empty", "--out", "{tmp}/o2"], "empty"),
        (["prepare", "folder", "{tmp}/imgs", "--out", "{tmp}/o3"], "broken.png"),
        (["prepare", "folder", "{tmp}/imgs", "--out", "{tmp}/o4", "--shard-size", "0"], "shard"),
        (["prepare", "folder", "{tmp}/imgs", "--out", "{tmp}/out_exists"], "out_exists"),
        (["prepare", "synthetic", "--out", "{tmp}/o5", "--num-samples", "-3"], "num"),
        (["prepare", "synthetic", "--out", "{tmp}/o6", "--num-samples", "10", "--size", "0"], "size"),
        (["prepare", "index", "{tmp}/nope"], "nope"),
        (["prepare", "index", "{tmp}/empty"], "empty"),
        (["prepare", "index", "{tmp}/trunc"], "truncated"),
        (["prepare", "torchvision", "nosuch", "--root", "{tmp}/empty", "--out", "{tmp}/o7"], "FashionMNIST"),
        (["prepare", "torchvision", "FashionMNIST", "--root", "{tmp}/nope", "--out", "{tmp}/o8"], "nope"),
        (["prepare", "torchvision", "FashionMNIST", "--root", "{tmp}/empty", "--out", "{tmp}/o9"],
         "train-images-idx3-ubyte"),
        (["prepare", "torchvision", "FashionMNIST", "--root", "{tmp}/empty", "--out", "{tmp}/out_exists"],
         "out_exists"),
        (["prepare", "torchvision", "CIFAR10", "--root", "{tmp}/empty", "--out", "{tmp}/o10"], "data_batch_1"),
        (["prepare", "torchvision", "CIFAR10", "--root", "{tmp}/empty", "--out", "{tmp}/o11", "--split", "val"],
         "val"),
        (["prepare", "torchvision", "EMNIST", "--root", "{tmp}/empty", "--out", "{tmp}/o12"], "--variant"),
    ],
    "train": [
        (["train", "--data.manifest={tmp}/nope", "--train.run_dir={tmp}/r1"], "nope"),
        (["train", "--data.manifest={tmp}/badmanifest", "--train.run_dir={tmp}/r2"], "num_samples"),
        (["train", "--optim.lr=abc"], "optim.lr"),
        (["train", "--optim.lr=-1"], "optim.lr"),
        (["train", "--train.batch_size=0"], "train.batch_size"),
        (["train", "--train.epochs=1.5"], "train.epochs"),
        (["train", "--head.store=cloud"], "head.store"),
        (["train", "--data.channels=2"], "data.channels"),
        (["train", "--nosuch=1"], "nosuch"),
        (["train", "positional"], "positional"),
        (["train", "--train.run_dir="], "train.run_dir"),
        (["train", "--config", "{tmp}/nope.json"], "nope.json"),
        (["train", "--config", "{tmp}/bad.json"], "bad.json"),
        (["train", "--config", "{tmp}/list.json"], "mapping"),
        (["train", "--config", "{tmp}/wrongtype.json"], "train.batch_size"),
        (["train", "--config", "{tmp}/unknown.json"], "trian"),
        (["train", "--train.allow_changes=data.nosuch", "--resume",
          "--data.manifest={digits}/train", "--train.run_dir={tmp}/run_nockpt"], "data.nosuch"),
    ],
    "eval": [
        (["eval", "--backbone", "{tmp}/nope.safetensors", "--train", "{digits}/train", "--test", "{digits}/test"],
         "nope.safetensors"),
        (["eval", "--backbone", "{tmp}/bad.json", "--train", "{digits}/train", "--test", "{digits}/test"], "bad.json"),
    ],
    "head": [
        (["head", "export", "--run", "{tmp}/nope", "--out", "{tmp}/h1.zarr"], "nope"),
        (["head", "export", "--run", "{tmp}/run_nockpt", "--out", "{tmp}/h2.zarr"], "checkpoint"),
        (["head", "verify", "--run", "{tmp}/nope"], "nope"),
        (["head", "verify", "--run", "{tmp}/run_nockpt"], "head.zarr"),
    ],
    "bench": [
        (["bench", "nosuch"], "nosuch"),
    ],
    "launch": [
        (["launch", "--nproc_per_node", "0", "--dry-run", "train"], "nproc_per_node"),
        (["launch", "--nnodes", "2", "--node_rank", "5", "--dry-run", "train"], "node_rank"),
        (["launch", "--hostfile", "{tmp}/nope", "--dry-run", "train"], "nope"),
    ],
}
ROWS = [(cmd, i) for cmd, rows in CASES.items() for i in range(len(rows))]


def _fill(argv, files):
    return [a.format(tmp=files["tmp"], digits=files["digits"]) for a in argv]


@pytest.mark.parametrize(("command", "row"), ROWS, ids=[f"{c}-{i}" for c, i in ROWS])
def test_bad_input_is_one_error_line(files, capsys, monkeypatch, command, row):
    monkeypatch.chdir(files["tmp"])
    argv, words = CASES[command][row]
    argv = _fill(argv, files)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    assert rc == 2, f"{argv}: exit status {rc}, stderr {out.err[-800:]}"
    assert "Traceback" not in out.err + out.out, f"{argv}:\n{out.err[-2000:]}"
    assert f"diet {command}: error:" in out.err or "error:" in out.err, f"{argv}: {out.err[-800:]}"
    assert _fill([words], files)[0] in out.err, f"{argv}: the error does not name {words!r}: {out.err[-800:]}"
    assert (files["tmp"] / "out_exists" / "x").read_text() == "keep me"
    for half in files["tmp"].glob("**/*.tmp"):
        pytest.fail(f"{argv} left a half-written {half}")
