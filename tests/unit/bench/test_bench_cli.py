"""`diet bench ...` is registered by launch/bench.py and dispatches to the benchmark programs."""

from __future__ import annotations

import pytest

from diet_engine.launch import bench
from diet_engine.launch.cli import build_parser


@pytest.mark.parametrize("argv,name", [
    (["bench", "memory", "--preset", "gpu-resnet50"], "memory"),
    (["bench", "grad-cosine", "--batch-sizes", "64"], "grad-cosine"),
    (["bench", "toy", "--steps", "10"], "toy"),
    (["bench", "label-smoothing", "--epochs", "2"], "label-smoothing"),
    (["bench", "paper-checks"], "paper-checks"),
])
def test_bench_subcommands_parse(argv, name):
    args, rest = build_parser().parse_known_args(argv)
    assert not rest and args.func is bench.run and args.bench == name
    assert not getattr(args, "import_error", None)


def test_bench_toy_runs_through_the_cli(tmp_path, monkeypatch):
    from diet_engine.launch.cli import main

    assert main(["bench", "toy", "--steps", "20", "--seeds", "1", "--loss", "mse", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "paper_toy_model.md").read_text().startswith("# s-DIET toy model")
    assert (tmp_path / "paper_toy_model.png").stat().st_size > 0
