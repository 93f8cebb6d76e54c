"""Real data: DIET learning Fashion-MNIST through the engine, beside raw pixels, random init, SimCLR
and supervised training, with the papers' variants of DIET and label smoothing.

    apt-get install -y dataset-fashion-mnist        # Debian's package of the official idx files
    diet bench real-data                            # the study (hours on 2 CPU cores; --runs picks some)
    diet bench real-data --quick                    # smoke test: digits, a few steps per run (CI)

Every run is a real `diet train` of the `fashion-mnist` preset (same backbone, loader, augmentation
and epochs), changed by the run's own options only, and evaluated by the end-of-run evaluation of
`diet train` (kNN k = 20 with the full train split as bank, linear probe, RankMe, on the 10,000 test
images) plus the online kNN monitor every --eval-every epochs (its bank and query subsets of the
same splits) for the curves. The runs:

* `diet`: the preset (batch CE, head on disk, exact lazy AdamW);
* `diet-dense`: the same with `--head.store=dense` (must equal `diet` up to floating point);
* `diet-full`: full CE over all N rows on a dense head (the original DIET);
* `diet-paper`: the paper's approximate catch-up of skipped rows (`--head.optimizer_mode=paper`);
* `diet-papers-defaults`: the papers' DIET (label smoothing 0.8, one AdamW for all, random rows,
  no normalisation): what the preset's convergence options are measured against;
* `ls-0.1`, `ls-0.4`, `ls-0.8`: label smoothing ε (DIET Fig. 6 / s-DIET Fig. 14: larger ε converges faster);
* `simclr`, `supervised`: the engine's SimCLR baseline and supervised training (the upper reference).

Raw pixels (kNN on the normalised pixels) and the backbone at random init come with them. Writes
benchmarks/results/real_data.{md,json,csv} and real_data_{curves,label_smoothing}.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, WORK, cli_main, machine_stamp, markdown_table, write_csv, write_report
from benchmarks.train.runs import plot_knn_curves, read_metrics, train

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# run name → options on top of the preset
RUNS: dict[str, list[str]] = {
    "diet": [],
    "diet-dense": ["--head.store=dense"],
    "diet-full": ["--head.store=dense", "--head.loss=full"],
    "diet-paper": ["--head.optimizer_mode=paper"],
    "diet-papers-defaults": ["--head.label_smoothing=0.8", "--head.lr_scale=1", "--head.weight_decay=-1",
                             "--head.init=random", "--model.normalize=false", "--head.logit_scale=1"],
    "ls-0.1": ["--head.label_smoothing=0.1"],
    "ls-0.4": ["--head.label_smoothing=0.4"],
    "ls-0.8": ["--head.label_smoothing=0.8"],
    "simclr": ["--train.method=simclr"],
    "supervised": ["--train.method=supervised"],
}
QUICK_RUNS = ["diet", "diet-dense", "ls-0.1", "supervised"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/fashion-mnist",
                   help="prepared Fashion-MNIST (train/ and test/); prepared from Debian's idx files if missing")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="runs to do (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the preset's)")
    p.add_argument("--eval-every", type=int, default=1, help="online kNN every K epochs (the curves)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="options added to every run, e.g. data.train_shards=10 (a shorter study)")
    p.add_argument("--quick", action="store_true", help="smoke test: digits, 2 epochs of a few steps, 4 runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every run (default: torch's)")
    p.add_argument("--work", default=str(WORK))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="real_data", help="file name stem of the results")
    p.add_argument("--keep", action="store_true",
                   help="reuse runs already finished under --work with the same options (rerun the rest)")


def _data(a: argparse.Namespace, work: Path) -> Path:
    if a.quick:
        from diet_engine.storage.shards import prepare_digits  # noqa: PLC0415

        out = work / "real_data-digits"
        if not (out / "train" / "manifest.json").exists():
            prepare_digits(out, overwrite=True)
        return out
    data = Path(a.data)
    if not (data / "train" / "manifest.json").exists():
        if not DEBIAN_FASHION_MNIST.is_dir():
            raise SystemExit(f"no prepared data at {data} and no {DEBIAN_FASHION_MNIST}: run "
                             "`apt-get install -y dataset-fashion-mnist` (or `diet prepare torchvision "
                             f"FashionMNIST --root DIR --out {data} --download`)")
        from diet_engine.storage.shards import prepare_torchvision  # noqa: PLC0415

        prepare_torchvision("FashionMNIST", DEBIAN_FASHION_MNIST, data)
    return data


def _options(a: argparse.Namespace, data: Path) -> list[str]:
    opts = ["--preset=fashion-mnist", f"--data.manifest={data / 'train'}",
            f"--data.eval_train_manifest={data / 'train'}", f"--data.eval_test_manifest={data / 'test'}",
            f"--eval.every_epochs={a.eval_every}", "--train.progress=false"]
    if a.quick:  # digits: 8 px images, 2 short epochs, small online subsets
        opts += ["--data.image_size=16", "--data.channels=3", "--data.train_shards=0", "--data.prepare_torchvision=",
                 "--train.epochs=2", "--train.batch_size=64",
                 "--eval.online_bank=500", "--eval.online_queries=200", "--eval.probe_epochs=5"]
    elif a.epochs:
        opts.append(f"--train.epochs={a.epochs}")
    return opts + [f"--{kv}" for kv in a.set]


def _train(run: Path, args: list[str], threads: int | None, keep: bool = False) -> dict:
    """`diet train` with its end-of-run evaluation (benchmarks/train/runs.py); the report, the metrics
    and the wall time. With `keep`, a run that finished here with the same options is reused."""
    done, used = run / "final_report.json", run / "bench_args.json"
    if keep and done.exists() and used.exists() and json.loads(used.read_text()) == args:
        report = json.loads(done.read_text())
        return {"wall_s": report["wall_time_s"]["total"], "report": report, "metrics": read_metrics(run)}
    shutil.rmtree(run, ignore_errors=True)
    r = train(run, args, threads=threads, evaluate=True, timeout=6 * 3600)
    used.write_text(json.dumps(args) + "\n")
    return {"wall_s": r["wall_s"], "report": json.loads(done.read_text()), "metrics": r["rows"]}


def raw_pixels_knn(train_manifest: Path, test_manifest: Path, k: int = 20, temperature: float = 0.07) -> float:
    """kNN top-1 on the images' normalised pixels (cosine, the engine's kNN), full train split as bank."""
    import torch  # noqa: PLC0415

    from diet_engine.engine.evaluation.knn import knn_accuracy  # noqa: PLC0415
    from diet_engine.engine.evaluation.online import load_subset  # noqa: PLC0415
    from diet_engine.storage.shards import Manifest  # noqa: PLC0415

    tr, te = Manifest.load(train_manifest), Manifest.load(test_manifest)
    mean, std = torch.tensor(tr.image.mean).view(-1, 1, 1), torch.tensor(tr.image.std).view(-1, 1, 1)
    norm = lambda x: ((x.float() / 255 - mean) / std).flatten()  # noqa: E731
    xb, yb = load_subset(tr, torch.arange(tr.num_samples).numpy(), norm)
    xq, yq = load_subset(te, torch.arange(te.num_samples).numpy(), norm)
    return knn_accuracy(xb, yb, xq, yq, k=k, temperature=temperature)


def _row(name: str, r: dict, epochs: int) -> dict:
    ev = r["report"]["eval"]
    trained = next(v for k, v in ev.items() if "trained" in k)
    rand = next((v for k, v in ev.items() if "random init" in k), None)
    losses = [m["loss"] for m in r["metrics"] if "loss" in m]
    ips = [m["img_per_s"] for m in r["metrics"] if "img_per_s" in m][1:]
    return {"run": name, "epochs": epochs, "knn": trained["knn"], "probe": trained["probe"],
            "rankme": trained["rankme"], "final_loss": losses[-1] if losses else float("nan"),
            "train_s": r["report"]["wall_time_s"]["train"], "wall_s": r["wall_s"],
            "img_per_s": sorted(ips)[len(ips) // 2] if ips else float("nan"),
            "random_init_knn": rand["knn"] if rand else None, "random_init_probe": rand["probe"] if rand else None,
            "random_init_rankme": rand["rankme"] if rand else None}


def _plots(out: Path, name: str, curves: dict[str, list], times: dict[str, float], epochs: int) -> list[Path]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    shown = {run: pts for run, pts in curves.items() if not run.startswith("ls-") and pts}
    paths = [plot_knn_curves(
        out / f"{name}_curves.png",
        {run: ([p[0] for p in pts], [p[0] * times[run] / max(epochs, 1) / 60 for p in pts], [100 * p[1] for p in pts])
         for run, pts in shown.items()},
        ylabel="online kNN top-1 (%)", time_label="training time (min, this machine)",
        titles=("kNN vs epochs", "kNN vs wall time"))]
    ls = {k: v for k, v in curves.items() if k.startswith("ls-") and v}
    if ls:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for run, pts in sorted(ls.items()):
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", ms=3, label=f"ε = {run[3:]}")
        ax.set(xlabel="epoch", ylabel="online kNN top-1 (%)", title="label smoothing ε and convergence")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(out / f"{name}_label_smoothing.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def run(a: argparse.Namespace) -> int:
    from diet_engine.launch.presets import PRESETS  # noqa: PLC0415

    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    data = _data(a, work)
    names = [r for r in a.runs if r in QUICK_RUNS] if a.quick else a.runs
    opts = _options(a, data)
    preset = PRESETS["fashion-mnist"]()
    epochs = 2 if a.quick else (a.epochs or preset.train.epochs)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    raw = raw_pixels_knn(data / "train", data / "test")
    results, rows, curves = {}, [], {}
    done: dict[tuple, str] = {}  # a run's effective options → the run that trained them
    for i, name in enumerate(names):
        same = done.get(key := _effective(RUNS[name], preset))
        if same is not None:  # e.g. ls-0.8 is the preset itself: reuse, do not train it twice
            print(f"real-data: {name} is {same} (the same options over the preset): reused", flush=True)
            r = results[name] = results[same]
        else:
            print(f"real-data: {name} ...", flush=True)
            once = [] if i == 0 else ["--eval.random_init_baseline=false"]  # the same random init for every run
            results[name] = r = _train(work / f"real_data-{name}", [*opts, *RUNS[name], *once], a.threads, a.keep)
            done[key] = name
        rows.append(_row(name, r, epochs))
        curves[name] = [(m["epoch"], m["eval/knn"]) for m in r["metrics"] if "eval/knn" in m]
        print(f"real-data: {name}: kNN {100 * rows[-1]['knn']:.2f}% in {r['wall_s']:.0f} s", flush=True)
    first = rows[0]
    table_rows = [{"run": "raw pixels", "knn": raw}]
    if first.get("random_init_knn") is not None:
        table_rows.append({"run": "random init", "knn": first["random_init_knn"], "probe": first["random_init_probe"],
                           "rankme": first["random_init_rankme"]})
    table_rows += rows
    cols = ["run", "epochs", "knn", "probe", "rankme", "final_loss", "train_s", "img_per_s"]
    shown = [{**r, "knn": _pct(r.get("knn")), "probe": _pct(r.get("probe"))} for r in table_rows]
    table = markdown_table(shown, cols, ["run", "epochs", "kNN top-1", "linear probe", "RankMe", "final loss",
                                         "train s", "img/s"])
    by = {r["run"]: r for r in rows}
    checks = []
    if "diet" in by and "diet-dense" in by:
        d, e = by["diet"], by["diet-dense"]
        checks.append(f"disk head vs dense head: kNN {100 * (d['knn'] - e['knn']):+.2f} points, final loss "
                      f"{d['final_loss'] - e['final_loss']:+.2e} (bar: within 0.3 points)")
    if "diet" in by and "diet-full" in by:
        checks.append(f"batch CE vs full CE: kNN {100 * (by['diet']['knn'] - by['diet-full']['knn']):+.2f} points "
                      "(s-DIET claim: within 1.5)")
    if "diet" in by and "diet-paper" in by:
        checks.append(f"paper-mode catch-up vs exact: kNN {100 * (by['diet-paper']['knn'] - by['diet']['knn']):+.2f} "
                      "points")
    if "diet" in by:
        checks.append(f"DIET vs raw pixels: {100 * (by['diet']['knn'] - raw):+.2f} points (bar ≥ +3); vs random init: "
                      f"{100 * (by['diet']['knn'] - (first['random_init_knn'] or 0)):+.2f} (bar ≥ +5)")
    out.mkdir(parents=True, exist_ok=True)
    times = {r["run"]: r["train_s"] for r in rows}
    plots = _plots(out, a.name, curves, times, epochs)
    body = (f"Every run: `diet train --preset fashion-mnist` plus its options, {epochs} epochs, evaluated on the "
            f"test split (kNN bank: the full train split). Online kNN every {a.eval_every} epoch(s) for the "
            f"curves. Whole study: {(time.perf_counter() - t0) / 60:.1f} min.\n\n{table}\n\n"
            + "\n".join(f"- {c}" for c in checks)
            + "\n\nOnline kNN per epoch: " + "; ".join(
                f"{k}: {[round(100 * v, 1) for _, v in c]}" for k, c in curves.items())
            + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots))
    config = {"runs": names, "options": opts, "run_options": {n: RUNS[n] for n in names}, "epochs": epochs,
              "quick": a.quick, "torch_threads": a.threads or "default", "load_average_1m_at_start": round(load0, 2),
              "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    write_csv(out / f"{a.name}.csv", table_rows, cols)
    path = write_report(a.name, "Real data: DIET on Fashion-MNIST" if not a.quick else "Real data (quick, digits)",
                        body, machine_stamp(), config, table_rows, extra={"curves": curves}, out_dir=out)
    print(path.read_text())
    return 0


def _effective(options: list[str], preset) -> tuple[str, ...]:
    """A run's options less those that only restate the preset's value (`--head.label_smoothing=0.8`
    over a preset with 0.8): two runs with the same effective options train the same thing."""
    kept = []
    for opt in options:
        key, _, value = opt.removeprefix("--").partition("=")
        section, _, field = key.partition(".")
        current = getattr(getattr(preset, section, None), field, None)
        if current is None or not _same_value(current, value):
            kept.append(opt)
    return tuple(sorted(kept))


def _same_value(current, value: str) -> bool:
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            return float(value) == float(current)
        except ValueError:
            return False
    return str(current).lower() == value.lower()


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


main = cli_main(__doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
