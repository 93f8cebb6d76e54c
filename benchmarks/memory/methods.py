"""The configurations the memory benchmark compares, as `RunConfig` overrides of one shared base.

    a   DIET, full CE over all N rows, head (weight + AdamW state + dense grad) held whole:
        head.store=dense, head.loss=full                                  — the original DIET
    b   DIET, batch CE, dense head (nn.Parameter + torch AdamW, dense grad):
        head.store=dense, head.loss=batch
    b2  DIET, batch CE, lazy optimizer, head rows in host RAM (MemoryHeadStore):
        head.store=memory, head.loss=batch        — on a GPU only B rows reach the device
    c   s-DIET: batch CE, lazy optimizer, head out of core on disk (Zarr):
        head.store=disk, head.loss=batch
    d   SimCLR on the same backbone: two views, 2-layer projector, NT-Xent τ = 0.2
    e   supervised training of the same backbone: linear classifier on labels (the floor)

Every configuration shares backbone, image size, batch size, precision, augmentation (strength 1:
crop + flip), optimizer (AdamW) and loader; no model projector, so the DIET head's d is the
backbone's width. d and e do not depend on N (they run once, at the smallest N).
"""

from __future__ import annotations

from typing import Any

LABELS = {
    "a": "(a) DIET full CE, dense head",
    "b": "(b) DIET batch CE, dense head",
    "b2": "(b') DIET batch CE, lazy head in RAM",
    "c": "(c) s-DIET batch CE, head on disk",
    "d": "(d) SimCLR (2 views, τ=0.2)",
    "e": "(e) supervised (floor)",
}

SHORT = {"a": "DIET full", "b": "DIET batch", "b2": "DIET batch (RAM)", "c": "s-DIET (disk)",
         "d": "SimCLR", "e": "supervised"}

OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "a": {"train": {"method": "diet"}, "head": {"store": "dense", "loss": "full"}},
    "b": {"train": {"method": "diet"}, "head": {"store": "dense", "loss": "batch"}},
    "b2": {"train": {"method": "diet"}, "head": {"store": "memory", "loss": "batch"}},
    "c": {"train": {"method": "diet"}, "head": {"store": "disk", "loss": "batch"}},
    "d": {"train": {"method": "simclr", "simclr_temperature": 0.2}},
    "e": {"train": {"method": "supervised"}},
}

N_INDEPENDENT = ("d", "e")


def uses_head(method: str) -> bool:
    return method in ("a", "b", "b2", "c")


def run_config(preset, method: str, manifest: str, run_dir: str) -> dict[str, dict[str, Any]]:
    """The RunConfig (as a dict of sections) of one configuration."""
    if method not in OVERRIDES:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(OVERRIDES)}")
    cfg: dict[str, dict[str, Any]] = {
        "data": {"manifest": manifest, "eval_train_manifest": "", "eval_test_manifest": "",
                 "image_size": preset.image_size, "channels": 3, "strength": 1, "crop_scale_min": 0.08,
                 "flip": True, "num_workers": preset.num_workers, "prepare_digits": False},
        "model": {"backbone": preset.backbone, "projector": "", "normalize": False},
        "head": {"label_smoothing": 0.8, "memory_budget_mb": preset.head_memory_budget_mb,
                 "store_path": f"{run_dir}/head.zarr", "optimizer_mode": "exact"},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 0.0},
        "train": {"epochs": 1, "max_steps": preset.warmup_steps + preset.measure_steps,
                  "batch_size": preset.batch_size, "run_dir": run_dir, "precision": preset.precision,
                  "device": preset.device, "log_every": 1 << 30, "progress": False, "checkpoint_every": 0,
                  "seed": 0},
        "eval": {"enabled": False},
    }
    for section, values in OVERRIDES[method].items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def head_bytes(method: str, n: int, d: int, itemsize: int = 4) -> int:
    """Analytic bytes of the head's O(N) state held in memory by each configuration."""
    if method in ("a", "b"):
        return 4 * n * d * itemsize  # weight, dense grad, exp_avg, exp_avg_sq
    if method == "b2":
        return 3 * n * d * itemsize + 8 * n  # weight, exp_avg, exp_avg_sq, step stamps
    if method == "c":
        return 8 * n + n // 8  # step stamps + undo bitset (rows live on disk)
    return 0


def store_bytes(n: int, d: int, chunk_rows: int, itemsize: int = 4) -> int:
    """Bytes of a full on-disk head store (chunks padded to whole R-row chunks)."""
    chunks = -(-n // chunk_rows)
    rows = chunks * chunk_rows
    return rows * (3 * d * itemsize + 8 + 12)
