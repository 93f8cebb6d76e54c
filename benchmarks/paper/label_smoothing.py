"""s-DIET Fig. 14 / DIET §C.6: label smoothing 0.1 / 0.4 / 0.8 and DIET's convergence speed, on digits.

The paper (CIFAR-100, hundreds of epochs): larger label smoothing ε speeds DIET's convergence up
(linear-probe accuracy vs epoch; 0.4–0.8 best). Here: the engine's embedded digits run (ResNet-18,
small stem, batch CE, lazy head in RAM, AdamW) for a few epochs per ε, the same seed and data order
for every ε, with the kNN accuracy (k = 20, cosine, T = 0.07) of the backbone's features on the test
split after every epoch (epoch 0 = random init). Images are kept at the digits' native 8 px so the
three runs take a few CPU minutes (`--image-size 16` is the `diet train` preset's size).

    diet bench label-smoothing      # or: python -m benchmarks.paper.label_smoothing
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, WORK, cli_main, machine_stamp, markdown_table, write_csv, write_report

FEW_SHOT = 5  # labelled bank samples per class of the few-shot kNN


def few_shot_bank(labels, per_class: int = FEW_SHOT) -> object:
    """Positions of the first `per_class` samples of each class (manifest order: fixed across runs)."""
    import torch  # noqa: PLC0415

    keep = [torch.nonzero(labels == c).flatten()[:per_class] for c in torch.unique(labels)]
    return torch.cat(keep)


def _knn(trainer, cfg, train_m, test_m) -> tuple[float, float]:
    """(kNN accuracy with the full train split as bank, few-shot kNN with FEW_SHOT per class)."""
    from diet_engine.engine.data import build_eval_loader  # noqa: PLC0415
    from diet_engine.engine.evaluation.knn import knn_accuracy  # noqa: PLC0415
    from diet_engine.engine.evaluation.report import extract_features  # noqa: PLC0415

    ftr, ytr = extract_features(trainer.model, build_eval_loader(cfg, train_m, train_m), trainer.device)
    fte, yte = extract_features(trainer.model, build_eval_loader(cfg, test_m, train_m), trainer.device)
    full = knn_accuracy(ftr, ytr, fte, yte, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    bank = few_shot_bank(ytr)
    few = knn_accuracy(ftr[bank], ytr[bank], fte, yte, k=FEW_SHOT, temperature=cfg.eval.knn_temperature)
    return full, few


def train_with_knn(cfg, log=print) -> list[dict]:
    """Train `cfg` with the real Trainer; kNN test accuracy after every epoch (and at init)."""
    from diet_engine.engine.data import load_manifest  # noqa: PLC0415
    from diet_engine.engine.trainer import Trainer  # noqa: PLC0415

    train_m = load_manifest(cfg.data, "manifest")
    test_m = load_manifest(cfg.data, "eval_test_manifest")
    curve: list[dict] = []

    class EpochKnnTrainer(Trainer):
        def train_step(self, batch):
            loss = super().train_step(batch)
            if self.step % self.steps_per_epoch == 0:
                acc, few = _knn(self, cfg, train_m, test_m)
                curve.append({"epoch": self.step // self.steps_per_epoch, "knn": acc, "knn_few": few,
                              "loss": float(loss)})
                log(f"  ε={cfg.head.label_smoothing} epoch {curve[-1]['epoch']}: kNN {100 * acc:.2f}%, "
                    f"{FEW_SHOT}-shot kNN {100 * few:.2f}%, loss {float(loss):.4f}")
            return loss

        def save_checkpoint(self):  # not needed for the curve
            pass

        def export_backbone(self):
            return None

    trainer = EpochKnnTrainer(cfg)
    try:
        acc, few = _knn(trainer, cfg, train_m, test_m)
        curve.insert(0, {"epoch": 0, "knn": acc, "knn_few": few, "loss": float("nan")})
        trainer.train()
    finally:
        trainer.close()
    return curve


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from diet_engine.launch.presets import digits  # noqa: PLC0415

    out = Path(args.out or RESULTS)
    work = Path(args.work or (WORK / "label_smoothing"))
    smoothings = [float(e) for e in args.smoothing.split(",")]
    curves: dict[float, list[dict]] = {}
    t0 = time.perf_counter()
    for eps in smoothings:
        cfg = digits()
        cfg.data.manifest = str(work / "digits" / "train")
        cfg.data.eval_train_manifest = str(work / "digits" / "train")
        cfg.data.eval_test_manifest = str(work / "digits" / "test")
        cfg.data.image_size = args.image_size
        cfg.model.backbone = args.backbone
        cfg.train.epochs = args.epochs
        cfg.train.batch_size = args.batch_size
        cfg.train.progress = False
        cfg.train.run_dir = str(work / f"run-eps{eps}")
        cfg.train.device = "cpu" if not torch.cuda.is_available() else "auto"
        cfg.optim.warmup_epochs = min(cfg.optim.warmup_epochs, max(args.epochs / 10, 0.5))
        cfg.head.label_smoothing = eps
        cfg.eval.enabled = False
        cfg.validate()
        shutil.rmtree(cfg.train.run_dir, ignore_errors=True)
        curves[eps] = train_with_knn(cfg, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    _plot(curves, out / "paper_label_smoothing.png", args)
    tables, rows, verdicts = [], [], []
    for key, what in (("knn", "kNN (k = 20, bank = the whole train split)"),
                      ("knn_few", f"{FEW_SHOT}-shot kNN (k = {FEW_SHOT}, {FEW_SHOT} labelled samples per class)")):
        part = _summary(curves, key)
        rows += [{"metric": key, **r} for r in part]
        epochs = [c["epoch"] for c in next(iter(curves.values()))]
        cols = (["label_smoothing", "init"] + [f"e{e}" for e in epochs[1:]] + ["mean", "epochs_to_90pct_of_gain"])
        pct = [{k: (100 * v if k in ("init", "mean") or (k[0] == "e" and k[1:].isdigit()) else v)
                for k, v in r.items()} for r in part]
        heads = ["ε", "init"] + [f"ep {e}" for e in epochs[1:]] + ["mean over epochs", "epochs to 90% of gain"]
        tables.append(f"**{what}**, top-1 % on the test split:\n\n" + markdown_table(pct, cols, heads))
        order = [r["label_smoothing"] for r in sorted(part, key=lambda r: -r["mean"])]
        same = order == sorted(smoothings, reverse=True)
        verdicts.append(f"- {what}: ranking by mean accuracy over the epochs ε = {', '.join(map(str, order))} "
                        f"(best first) → {'same order as' if same else 'NOT the order of'} the paper "
                        "(larger ε faster).")
    body = (
        f"DIET {args.backbone} at {args.image_size} px on the digits (train split, N = 1,437), B = {args.batch_size}, "
        f"batch CE, lazy head in RAM, AdamW, {args.epochs} epochs per ε; same seed and data order for every ε; "
        f"accuracy on the 360 test images after every epoch (one image = 0.28 points).\n\n"
        + "\n\n".join(tables) + "\n\n" + "\n".join(verdicts) + "\n\n"
        "Paper (Fig. 14, CIFAR-100, linear probe over hundreds of epochs): ε = 0.4–0.8 converge faster than 0.1. "
        "Reading: on digits, random-init ResNet features already give ~92% kNN, so a few CPU epochs move "
        "accuracy by a few test images; differences of ≲ 1 point are within that noise. The few-shot kNN starts "
        "lower and is the more sensitive of the two. A faithful reproduction needs CIFAR-scale data and "
        "hundreds of epochs (a GPU).\n"
        f"Wall time {wall / 60:.1f} min on CPU. Plot: `paper_label_smoothing.png`."
    )
    write_csv(out / "paper_label_smoothing.csv", rows)
    config = {"backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
              "epochs": args.epochs, "smoothing": smoothings, "head": "batch CE, store=memory (lazy)",
              "optimizer": "AdamW lr 1e-3·B/256, wd 0.05, warm-up + cosine",
              "knn": f"k=20 (full bank) and k={FEW_SHOT} ({FEW_SHOT}-shot bank), T=0.07, cosine"}
    path = write_report("paper_label_smoothing", "Label smoothing and DIET's convergence speed (s-DIET Fig. 14)",
                        body, machine_stamp("cpu"), config, rows,
                        extra={"curves": {str(k): v for k, v in curves.items()}}, out_dir=out)
    print(body)
    print(f"wrote {path}")
    return 0


def _summary(curves: dict[float, list[dict]], key: str) -> list[dict]:
    """Per ε: accuracy at init and after each epoch, mean over epochs, epochs to 90% of the best gain."""
    rows = []
    for eps, curve in curves.items():
        accs = np.array([c[key] for c in curve[1:]])
        init = curve[0][key]
        best = float(accs.max()) if len(accs) else float("nan")
        reach = None
        if len(accs) and best > init:
            target = init + 0.9 * (best - init)
            reach = next(c["epoch"] for c in curve[1:] if c[key] >= target)
        rows.append({"label_smoothing": eps, "init": init, **{f"e{c['epoch']}": c[key] for c in curve[1:]},
                     "mean": float(accs.mean()) if len(accs) else float("nan"), "epochs_to_90pct_of_gain": reach})
    return rows


def _plot(curves, path: Path, args) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    shades = plt.cm.Blues(np.linspace(0.4, 0.95, len(curves)))
    for ax, key, title in zip(axes, ("knn", "knn_few"), ("kNN, full bank (k=20)", f"{FEW_SHOT}-shot kNN"),
                                strict=True):
        for (eps, curve), color in zip(sorted(curves.items()), shades, strict=True):
            ax.plot([c["epoch"] for c in curve], [100 * c[key] for c in curve], "o-", color=color,
                    label=f"ε = {eps}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 on digits test (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"DIET {args.backbone} {args.image_size}px on digits: label smoothing vs convergence")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoothing", default="0.1,0.4,0.8", help="comma-separated label smoothing values")
    p.add_argument("--epochs", type=int, default=10, help="epochs per value (default 10)")
    p.add_argument("--image-size", type=int, default=8, help="crop size (default 8: the digits' own)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--out", default="", help="results folder (default benchmarks/results)")
    p.add_argument("--work", default="", help="scratch folder (default benchmarks/_work/label_smoothing)")


main = cli_main(__doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
