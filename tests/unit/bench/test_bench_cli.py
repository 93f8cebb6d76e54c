"""`diet bench ...` is registered by launch/bench.py and dispatches to the benchmark programs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from diet_engine.launch import bench
from diet_engine.launch.cli import build_parser

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("argv,name", [
    (["bench", "memory", "--preset", "gpu-resnet50"], "memory"),
    (["bench", "grad-cosine", "--batch-sizes", "64"], "grad-cosine"),
    (["bench", "toy", "--steps", "10"], "toy"),
    (["bench", "label-smoothing", "--epochs", "2"], "label-smoothing"),
    (["bench", "paper-checks"], "paper-checks"),
    (["bench", "head-scale", "--num-rows", "1000"], "head-scale"),
    (["bench", "lazy-optim", "--reps", "2"], "lazy-optim"),
    (["bench", "loader", "--num-samples", "100"], "loader"),
    (["bench", "train-ranks", "--steps", "4"], "train-ranks"),
])
def test_bench_subcommands_parse(argv, name):
    args, rest = build_parser().parse_known_args(argv)
    assert not rest and args.func is bench.run and args.bench == name
    assert not getattr(args, "import_error", None)


@pytest.mark.parametrize("name", sorted(bench._BENCHES))
def test_every_benchmark_parses_its_defaults(name):
    args, rest = build_parser().parse_known_args(["bench", name])
    assert not rest and args.func is bench.run and args.bench == name


def _programs() -> set[str]:
    """Modules of benchmarks/ that define both add_arguments and run: the benchmark programs."""
    out = set()
    for path in (ROOT / "benchmarks").rglob("*.py"):
        defs = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        if {"add_arguments", "run"} <= defs:
            out.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return out


def test_every_benchmark_program_has_a_diet_bench_command():
    table = {module for module, _ in bench._BENCHES.values()}
    assert _programs() == table
    for path in (ROOT / "benchmarks").rglob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path}: benchmarks import as a package, no sys.path edits"


def test_building_the_cli_imports_no_benchmark():
    code = ("import sys; from diet_engine.launch.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('benchmarks', 'zarr', 'numba', 'webdataset')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_diet_bench_runs_outside_the_repository(tmp_path):
    """The `diet` script of an editable install finds the checkout's benchmarks without sys.path edits."""
    if Path(bench.__file__).resolve().parents[1] != ROOT:
        pytest.skip("diet_engine is not installed from this checkout (editable)")
    code = "import sys; from diet_engine.launch.cli import main; sys.exit(main(['bench', 'toy', '--help']))"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: diet bench toy" in r.stdout and "--seeds" in r.stdout, r.stdout + r.stderr


def test_bench_toy_runs_through_the_cli(tmp_path, monkeypatch):
    from diet_engine.launch.cli import main

    assert main(["bench", "toy", "--steps", "20", "--seeds", "1", "--loss", "mse", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "paper_toy_model.md").read_text().startswith("# s-DIET toy model")
    assert (tmp_path / "paper_toy_model.png").stat().st_size > 0
