"""Faster DIET convergence on Fashion-MNIST: one change at a time against the papers' DIET, kNN on a
validation split carved out of the training set (hyper-parameters are never picked on the test split).

    diet bench convergence                  # the runs below, 10 epochs each (≈ 15 min a run on 2 busy cores)
    diet bench convergence --runs papers cosine cosine+feature-init

Split (written once under --work, PNG bytes copied, labels kept): *fit* = the first 50,000 training
images, *val* = the last 10,000 (re-indexed 0..9,999). Every run trains on the first
`--train-shards` shards of *fit* (10: 10,000 rows, so a row is visited 10 times in 10 epochs on this
machine's budget) through `diet train --preset fashion-mnist` with the run's options, and the online
kNN monitor (k = 20, cosine, T = 0.07) classifies 5,000 *val* images against a 10,000-image bank of
*fit* after every other epoch (epoch 0: random init). Runs, each one change (the first is the reference):

* `papers`: the papers' DIET: label smoothing 0.8, one AdamW for backbone and head, random rows,
  unnormalised features, logit scale 1;
* `head-lr-100`: the head's learning rate × 100, no head weight decay;
* `cosine`: L2-normalised features, logits scaled by 10 (PIC-style cosine softmax, τ = 0.1);
* `cosine+feature-init`: `cosine`, and each row starts as its sample's feature at its first visit;
* `feature-init`: feature init without normalisation (logits z·z: unstable);
* `...+ls-0.1`, `...+lr-3e-3`: label smoothing 0.1, backbone learning rate × 3 on top of `cosine+feature-init`;
* `...+window-2x2`: PIC's sliding window over shards (2 shards visited twice, reshuffled, before the
  next two), half the epochs so the steps are the same: a row is stepped again ~16 steps later;
* `...+projector`: the s-DIET 3-layer MLP projector (2048 hidden, 256 out) between backbone and
  head (kNN on the backbone's features, as always);
* `...+negatives-1024`: 1,024 extra negative rows per step, the rows of the next 8 batches.

Curves are drawn against passes over the data (epochs × data.window_passes), i.e. equal steps.

Writes benchmarks/results/convergence.{md,json,csv} and convergence.png (kNN vs epoch and vs time).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks.common import RESULTS, WORK, cli_main, machine_stamp, markdown_table, write_csv, write_report
from benchmarks.train.runs import knn_curve, plot_knn_curves

PAPERS = ["--head.label_smoothing=0.8", "--head.lr_scale=1", "--head.weight_decay=-1", "--head.init=random",
          "--model.normalize=false", "--head.logit_scale=1"]
COSINE = ["--model.normalize=true", "--head.logit_scale=10"]
RUNS: dict[str, list[str]] = {
    "papers": PAPERS,
    "head-lr-100": [*PAPERS, "--head.lr_scale=100", "--head.weight_decay=0"],
    "cosine": [*PAPERS, *COSINE],
    "cosine+feature-init": [*PAPERS, *COSINE, "--head.init=feature"],
    "feature-init": [*PAPERS, "--head.init=feature", "--head.lr_scale=10"],
    "cosine+feature-init+ls-0.1": [*PAPERS, *COSINE, "--head.init=feature", "--head.label_smoothing=0.1"],
    "cosine+feature-init+lr-3e-3": [*PAPERS, *COSINE, "--head.init=feature", "--optim.lr=3e-3"],
    # half the epochs, each two visits of every sample: the same number of steps as the others
    "cosine+feature-init+window-2x2": [*PAPERS, *COSINE, "--head.init=feature", "--data.window_shards=2",
                                       "--data.window_passes=2", "--train.epochs=EPOCHS/2", "--eval.every_epochs=1"],
    "cosine+feature-init+projector": [*PAPERS, *COSINE, "--head.init=feature", "--model.projector=mlp"],
    "cosine+feature-init+negatives-1024": [*PAPERS, *COSINE, "--head.init=feature", "--head.extra_negatives=1024",
                                           "--head.lookahead=8"],
}


def _passes(options: list[str]) -> int:
    """Visits of every sample per epoch of a run (data.window_passes; 1 for the plain order)."""
    return next((int(o.partition("=")[2]) for o in reversed(options) if o.startswith("--data.window_passes=")), 1)


def _resolve(options: list[str], epochs: int) -> list[str]:
    return [o.replace("EPOCHS/2", str(max(1, epochs // 2))) for o in options]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/fashion-mnist", help="prepared Fashion-MNIST (its train/ is split)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-shards", type=int, default=10, help="rows trained: the first K shards of fit")
    p.add_argument("--val", type=int, default=10000, help="images held out of the train split for validation")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--collect-only", action="store_true",
                   help="train nothing: report the runs found under --work (a stopped run: its curve so far)")
    p.add_argument("--work", default=str(WORK))
    p.add_argument("--out", default=str(RESULTS))


def split_train(train: Path, out: Path, val: int) -> tuple[Path, Path]:
    """out/fit (the first N - val images) and out/val (the last val, re-indexed), bytes copied."""
    import numpy as np  # noqa: PLC0415

    from diet_engine.storage.shards.loader import read_shard  # noqa: PLC0415
    from diet_engine.storage.shards.manifest import Manifest  # noqa: PLC0415
    from diet_engine.storage.shards.prepare import ShardSetWriter, StatsAccumulator, staged_output  # noqa: PLC0415
    from diet_engine.storage.shards.records import decode  # noqa: PLC0415

    if (out / "val" / "manifest.json").exists():
        return out / "fit", out / "val"
    m = Manifest.load(train)
    cut = m.num_samples - val
    first, counts, paths = m.first_indices(), m.shard_counts(), m.shard_paths()
    with staged_output(out, overwrite=True) as tmp:
        for name, lo, hi in (("fit", 0, cut), ("val", cut, m.num_samples)):
            (tmp / name).mkdir()
            w, acc = ShardSetWriter(tmp / name, m.shard_size), StatsAccumulator(channels=m.image.channels)
            for s in range(m.num_shards):
                a, b = max(lo, int(first[s])), min(hi, int(first[s] + counts[s]))
                if a >= b:
                    continue
                got = read_shard(str(paths[s]), int(first[s]), int(counts[s]), m.index_field, m.image_field,
                                 m.label_field, set(range(a, b)), m.num_classes)
                for n in range(a, b):
                    data, label = got[n]
                    w.write(data, m.image_field or "png", label)
                    acc.add(decode(data, m.image.channels).permute(1, 2, 0).numpy()[None].astype(np.uint8))
            sub = Manifest(num_samples=w.num_samples, shard_size=m.shard_size, shards=w.close(),
                           image=acc.result(m.image.format), label_names=m.label_names, num_classes=m.num_classes,
                           source={**m.source, "split_of": str(train), "source_range": [lo, hi]}, root=tmp / name)
            sub.save()
    return out / "fit", out / "val"


def run(a: argparse.Namespace) -> int:
    from benchmarks.train.real_data import _data  # noqa: PLC0415
    from benchmarks.train.runs import train  # noqa: PLC0415

    work, out = Path(a.work), Path(a.out)
    a.quick = False
    data = _data(a, work)
    fit, val = split_train(data / "train", work / "convergence-split", a.val)
    common = ["--preset=fashion-mnist", f"--data.manifest={fit}", f"--data.train_shards={a.train_shards}",
              f"--data.eval_train_manifest={fit}", f"--data.eval_test_manifest={val}", "--eval.every_epochs=2",
              "--eval.online_bank=10000", "--eval.online_queries=5000", f"--train.epochs={a.epochs}",
              "--optim.warmup_epochs=1", "--train.log_every=20"]
    load0 = os.getloadavg()[0]
    curves, rows = {}, []
    for name in a.runs:
        run_dir = work / f"convergence-{name}"
        done = (run_dir / "backbone.safetensors").exists()
        if a.collect_only and not (run_dir / "metrics.csv").exists():
            continue
        if not done and not a.collect_only:  # finished runs are kept: rerun by deleting them
            print(f"convergence: {name} ...", flush=True)
            train(run_dir, [*common, *_resolve(RUNS[name], a.epochs)], threads=a.threads, timeout=6 * 3600)
        c = curves[name] = knn_curve(run_dir)
        for p in c:  # the x axis is passes over the data (= epochs of the plain order)
            p["epoch"] *= _passes(RUNS[name])
        low = min(c, key=lambda p: p["knn"])  # the dip below random init that every run goes through
        change = " ".join(o.removeprefix("--") for o in _resolve(RUNS[name], a.epochs) if o not in PAPERS)
        rows.append({"run": name + ("" if done else " (stopped)"), "options": change,
                     "knn_epoch0": c[0]["knn"], "knn_final": c[-1]["knn"], "final_epoch": c[-1]["epoch"],
                     "low": low["knn"], "low_epoch": low["epoch"], "train_s": c[-1]["train_s"]})
    ref = rows[0]
    for r in rows:  # epochs the run needs to reach the reference's final kNN
        c = curves[r["run"].removesuffix(" (stopped)")]
        hit = next((p["epoch"] for p in c[1:] if p["knn"] >= ref["knn_final"]), None)
        r["epochs_to_ref_final"] = hit
        r["speed_up"] = (ref["final_epoch"] / hit) if hit else None
        r["gain"] = 100 * (r["knn_final"] - ref["knn_final"]) if r["final_epoch"] == ref["final_epoch"] else None
    cols = ["run", "options", "knn_epoch0", "low", "low_epoch", "knn_final", "final_epoch", "gain",
            "epochs_to_ref_final", "speed_up", "train_s"]
    shown = [{**r, **{k: f"{100 * r[k]:.2f}%" for k in ("knn_epoch0", "knn_final", "low")}} for r in rows]
    table = markdown_table(shown, cols, ["run", "change", "kNN epoch 0", "lowest", "at epoch", "kNN last",
                                         "last epoch", "points vs papers (same epoch)",
                                         f"epochs to {100 * ref['knn_final']:.1f}%", "× fewer epochs", "train s"])
    plot_knn_curves(out / "convergence.png",
                    {k: ([p["epoch"] for p in c], [p["train_s"] / 60 for p in c], [100 * p["knn"] for p in c])
                     for k, c in curves.items()},
                    ylabel="val kNN top-1 (%)", time_label="training time (min, 1 thread, shared machine)")
    body = (f"{a.epochs} epochs on the first {a.train_shards} shards of *fit*; online kNN on 5,000 *val* images "
            f"(bank: 10,000 *fit* images) every 2 epochs.\n\n{table}\n\nCurves (epoch: kNN %): "
            + "; ".join(f"{k}: " + ", ".join(f"{p['epoch']:.0f}: {100 * p['knn']:.1f}" for p in c)
                        for k, c in curves.items()) + "\n\n![convergence](convergence.png)")
    config = {"runs": {n: _resolve(RUNS[n], a.epochs) for n in a.runs}, "common": common,
              "torch_threads": a.threads or "default", "load_average_1m_at_start": round(load0, 2)}
    write_csv(out / "convergence.csv", rows, cols)
    path = write_report("convergence", "Faster DIET convergence (Fashion-MNIST, validation split)", body,
                        machine_stamp(), config, rows, extra={"curves": curves}, out_dir=out)
    print(path.read_text())
    return 0


main = cli_main(__doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
