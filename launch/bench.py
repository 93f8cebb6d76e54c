"""`diet bench`: the reproducible measurements of benchmarks/ as subcommands.

    diet bench memory [--preset cpu-resnet18|gpu-resnet50|tiny] [...]   # DIET vs s-DIET vs SimCLR vs supervised
    diet bench grad-cosine [...]       # s-DIET Table 10: batch-CE vs full-CE backbone gradient cosine
    diet bench toy [...]               # s-DIET §4.2 / D.4 toy model (Fig. 4)
    diet bench label-smoothing [...]   # s-DIET Fig. 14: ε = 0.1 / 0.4 / 0.8 and convergence speed (digits)
    diet bench gpu [--dry-run] [--stages ...]  # one GPU: all checks in ~8 min → gpu_summary.{md,json}
    diet bench train-method            # s-DIET vs supervised step time (CPU or GPU)
    diet bench paper-checks            # the three paper checks above, one after the other

Each writes a Markdown table (+ CSV/JSON, + PNG where a plot helps) stamped with machine, versions
and config to benchmarks/results/ (or --out). The benchmark programs live in the repository's
`benchmarks/` folder: run from a source checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# subcommand → (module under benchmarks/, help)
_BENCHES = {
    "memory": ("benchmarks.memory.harness", "peak memory of DIET / s-DIET / SimCLR / supervised across N"),
    "grad-cosine": ("benchmarks.bench_paper_checks_grad_cosine", "s-DIET Table 10: batch vs full CE gradient cosine"),
    "toy": ("benchmarks.bench_paper_checks_toy", "s-DIET §4.2 toy model: normalisation learns both features"),
    "label-smoothing": ("benchmarks.bench_paper_checks_label_smoothing",
                        "s-DIET Fig. 14: label smoothing and convergence speed on digits"),
    "train-method": ("benchmarks.bench_train_method", "s-DIET vs supervised step time, same backbone and loader"),
    "gpu": ("benchmarks.bench_gpu", "first minutes on a GPU: gpu tests, batch CE, lazy AdamW, memory, img/s"),
}
_PAPER_CHECKS = ("grad-cosine", "toy", "label-smoothing")


def _module(name: str):
    """Import a benchmark module, adding the source checkout's root to sys.path if needed."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", name.rsplit(".", 1)[0]):
            raise
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks").is_dir():
        raise FileNotFoundError(f"diet bench needs the repository's benchmarks/ folder (looked in {root}); "
                                "run from a source checkout")
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (memory profiling, the s-DIET paper's checks)",
                       description=__doc__.split("\n\n")[0])
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name, (module, help_text) in _BENCHES.items():
        q = bench_sub.add_parser(name, help=help_text, description=help_text)
        _add_arguments(q, module)
        q.set_defaults(func=run, bench=name)
    q = bench_sub.add_parser("paper-checks", help="grad-cosine, toy and label-smoothing with their defaults")
    q.add_argument("--out", default="", help="results folder (default benchmarks/results)")
    q.set_defaults(func=run, bench="paper-checks")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _add_arguments(q: argparse.ArgumentParser, module: str) -> None:
    try:
        _module(module).add_arguments(q)
    except Exception as e:  # noqa: BLE001 - never break `diet train`; running the subcommand reports why
        q.set_defaults(import_error=f"{module}: {e}")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "import_error", None):
        raise FileNotFoundError(f"diet bench {args.bench}: cannot load {args.import_error}")
    if args.bench == "paper-checks":
        rc = 0
        for name in _PAPER_CHECKS:
            print(f"== diet bench {name}", flush=True)
            mod = _module(_BENCHES[name][0])
            q = argparse.ArgumentParser()
            mod.add_arguments(q)
            rc |= int(mod.run(q.parse_args(["--out", args.out] if args.out else [])) or 0)
        return rc
    return int(_module(_BENCHES[args.bench][0]).run(args) or 0)
