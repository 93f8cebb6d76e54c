"""`diet bench`: every program of benchmarks/ as a subcommand.

    diet bench memory [--preset cpu-resnet18|gpu-resnet50|tiny] [...]   # DIET vs s-DIET vs SimCLR vs supervised
    diet bench paper-checks            # grad-cosine, toy and label-smoothing, one after the other
    diet bench gpu [--dry-run] [--stages ...]  # one GPU: all checks in ~8 min → gpu_summary.{md,json}
    diet bench NAME --help             # a benchmark's options; `diet bench --help` lists them all

Each writes a Markdown table (+ CSV/JSON, + PNG where a plot helps) stamped with machine, versions
and config to benchmarks/results/ (or --out). The benchmark programs live in the repository's
`benchmarks/` package (not installed): run from a source checkout. `python -m benchmarks.<group>.<name>`
runs the same program from the repository root.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

# subcommand → (module of the benchmarks package, help). Each module has add_arguments(parser) and run(args).
_BENCHES = {
    # head store (storage/head/)
    "head-gather-scatter": ("benchmarks.head.gather_scatter", "head store: gather + scatter of B rows vs zarr-python"),
    "head-open": ("benchmarks.head.open", "head store: cost of opening and verifying it at ImageNet scale"),
    "head-scale": ("benchmarks.head.scale", "head store at N = 1,281,167, d = 2048: steps/s vs raw disk bandwidth"),
    # kernels (kernels/)
    "batch-ce": ("benchmarks.kernels.batch_ce", "fused batch cross-entropy vs eager and torch.compile"),
    "lazy-optim": ("benchmarks.kernels.lazy_optim", "exact lazy AdamW vs a dense AdamW step; paper-mode drift"),
    # data loading (storage/shards/)
    "loader": ("benchmarks.loader.shards", "shards: encoders, prepare, index and loader throughput"),
    "loader-imagefolder": ("benchmarks.loader.imagefolder", "ShardLoader vs ImageFolder + DataLoader, 224 px JPEG"),
    # in training (real `diet train` runs)
    "train-head-store": ("benchmarks.train.head_store", "in training: disk head vs memory head step time"),
    "train-method": ("benchmarks.train.method", "s-DIET vs supervised step time, same backbone and loader"),
    "train-ranks": ("benchmarks.train.ranks", "diet train throughput with 1 and 2 ranks"),
    "train-scale": ("benchmarks.train.scale", "end to end at ImageNet scale: disk head, SIGKILL and resume"),
    "convergence": ("benchmarks.train.convergence",
                    "faster DIET convergence on Fashion-MNIST: one change at a time, kNN on a validation split"),
    "preset-curve": ("benchmarks.train.preset_curve",
                     "a preset trained longer: online kNN against minutes, what it reaches by 30 and 120 min"),
    "real-data": ("benchmarks.train.real_data",
                  "DIET learning Fashion-MNIST vs raw pixels, random init, SimCLR, supervised; DIET variants"),
    # memory
    "memory": ("benchmarks.memory.harness", "peak memory of DIET / s-DIET / SimCLR / supervised across N"),
    # the s-DIET paper's checks
    "grad-cosine": ("benchmarks.paper.grad_cosine", "s-DIET Table 10: batch vs full CE gradient cosine"),
    "toy": ("benchmarks.paper.toy", "s-DIET §4.2 toy model: normalisation learns both features"),
    "label-smoothing": ("benchmarks.paper.label_smoothing",
                        "s-DIET Fig. 14: label smoothing and convergence speed on digits"),
    # all of the GPU checks in one go
    "gpu": ("benchmarks.gpu", "first minutes on a GPU: gpu tests, batch CE, lazy AdamW, memory, img/s"),
}
_PAPER_CHECKS = ("grad-cosine", "toy", "label-smoothing")


def _module(name: str):
    """Import a module of the `benchmarks` package (a folder of the source checkout, not installed).

    An editable install (the `diet` script has no checkout on sys.path) loads the package from the
    checkout this file belongs to, under the name `benchmarks` only: putting the checkout's root on
    sys.path would also make its `engine`, `kernels`, ... folders importable as top-level packages.
    Otherwise (an installed wheel) `benchmarks` comes from sys.path: the repository root under
    `python -m`, or PYTHONPATH."""
    if "benchmarks" not in sys.modules:
        init = Path(__file__).resolve().parent.parent / "benchmarks" / "__init__.py"
        if init.is_file():
            spec = importlib.util.spec_from_file_location("benchmarks", init,
                                                          submodule_search_locations=[str(init.parent)])
            package = importlib.util.module_from_spec(spec)
            sys.modules["benchmarks"] = package
            spec.loader.exec_module(package)
        elif importlib.util.find_spec("benchmarks") is None:
            raise FileNotFoundError("diet bench runs the programs in a source checkout's benchmarks/ folder: none "
                                    f"next to {init.parent.parent} and none on sys.path; run "
                                    "`python -m diet_engine.launch.cli bench ...` from the checkout's root")
    return importlib.import_module(name)


class _BenchParser(argparse.ArgumentParser):
    """One benchmark's parser: its module is imported, and its arguments added, only when the
    subcommand is parsed. Building `diet`'s parser (every `diet train`) imports no benchmark."""

    module = ""  # benchmarks.<group>.<name>, until loaded

    def parse_known_args(self, args=None, namespace=None):
        if self.module:
            module, self.module = self.module, ""
            try:
                _module(module).add_arguments(self)
            except (ImportError, FileNotFoundError) as e:
                self.error(f"cannot load {module}: {e}")
        return super().parse_known_args(args, namespace)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark (head store, kernels, loader, training, memory, paper checks)",
                       description=__doc__.split("\n\n")[0])
    bench_sub = p.add_subparsers(dest="bench", metavar="BENCHMARK", parser_class=_BenchParser)
    for name, (module, help_text) in _BENCHES.items():
        q = bench_sub.add_parser(name, help=help_text, description=help_text)
        q.module = module
        q.set_defaults(func=run, bench=name)
    q = bench_sub.add_parser("paper-checks", help="grad-cosine, toy and label-smoothing with their defaults")
    q.add_argument("--out", default="", help="results folder (default benchmarks/results)")
    q.set_defaults(func=run, bench="paper-checks")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args: argparse.Namespace) -> int:
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
