"""Rank script: the real `Trainer` on a test-only data source, for the 1-rank vs W-rank comparison.

The data source makes "the same global batch" exact: N samples split into two owner halves
(rows [0, N/2) and [N/2, N)); global batch k of an epoch is half k of owner 0's permutation
followed by half k of owner 1's. With 2 ranks, rank r yields owner r's half (and owns those head
rows); with 1 rank, the process yields both halves concatenated. Images are fixed per index (no
augmentation), so both runs see identical pixels. Everything else is the production path:
DeepSpeed engine (any ZeRO stage), SyncBatchNorm, lazy head in RAM, global batch CE, checkpoints.

`--tiny-backbone` swaps torchvision's model for a 2-conv net with one SyncBatchNorm (8×8 maps):
ResNets on 8 px inputs reach 1×1 maps where BatchNorm normalises 16 nearly equal values, and
their training then amplifies fp32 rounding (summation order) to ~1e-3 within 50 steps even in
one process; the tiny net keeps the comparison at fp32 rounding level and takes milliseconds.

    torchrun --nproc_per_node {1,2} tests/integration/dist_train_check.py OUT --set train.max_steps=50 ...

Writes OUT/model.pt (rank 0: the model's state dict) and OUT/head_rank{r}.pt (the rank's owned rows
of the head at the final step, and which rows the rank ever stepped).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

import diet_engine.engine.trainer as trainer_module
from diet_engine.engine.config import RunConfig
from diet_engine.engine.model import DietModel

NUM_SAMPLES = 128


class UnionLoader:
    """ShardLoader's interface over a fixed in-memory data set (see the module docstring)."""

    def __init__(self, batch_size: int, rank: int, world: int, seed: int, image_size: int) -> None:
        if world not in (1, 2):
            raise ValueError("the comparison data source supports 1 or 2 ranks")
        self.rank, self.world, self.seed = rank, world, seed
        self.global_batch = batch_size * world
        self.halves = np.split(np.arange(NUM_SAMPLES, dtype=np.int64), 2)
        g = torch.Generator().manual_seed(1234)
        self.images = torch.randn(NUM_SAMPLES, 3, image_size, image_size, generator=g)  # (N, 3, S, S)

    def steps_per_epoch(self) -> int:
        return NUM_SAMPLES // self.global_batch

    def steps_in_epoch(self, epoch: int) -> int:
        return self.steps_per_epoch()

    def owned_rows(self) -> np.ndarray:
        return self.halves[self.rank] if self.world == 2 else np.arange(NUM_SAMPLES, dtype=np.int64)

    def plan(self, epoch: int) -> list[np.ndarray]:
        half = self.global_batch // 2
        perms = [np.random.default_rng([self.seed, epoch, h]).permutation(rows) for h, rows in enumerate(self.halves)]
        out = []
        for k in range(self.steps_per_epoch()):
            parts = [p[k * half : (k + 1) * half] for p in perms]
            out.append(parts[self.rank] if self.world == 2 else np.concatenate(parts))
        return out

    def epoch(self, epoch: int, start_batch: int = 0):
        for idx in self.plan(epoch)[start_batch:]:
            yield self.images[torch.from_numpy(idx)], torch.from_numpy(idx)


def tiny_model(cfg_model, image_size: int, channels: int = 3) -> DietModel:
    """Conv-SyncBN-GELU-Conv-GELU-pool-Linear, K = 32 (what `build_model` returns, test-only)."""
    net = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.SyncBatchNorm(16), nn.GELU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(32, 32))
    return DietModel(net, 32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--set", action="append", default=[], help="section.field=value")
    ap.add_argument("--tiny-backbone", action="store_true", help="the tiny SyncBN net instead of torchvision's")
    args = ap.parse_args()
    out = Path(args.out)

    cfg = RunConfig()
    cfg.data.image_size = 8
    cfg.model.backbone = "resnet18"
    cfg.model.sync_batchnorm = True
    cfg.head.store = "memory"
    cfg.train.device = "cpu"
    cfg.train.batch_ce = "global"
    cfg.train.epochs = 8
    cfg.train.progress = False
    cfg.train.log_every = 10
    cfg.optim.warmup_fraction = 0.1
    cfg.optim.lr = 2e-3
    for item in args.set:
        key, value = item.split("=", 1)
        cfg.set(key, value)
    cfg.train.run_dir = str(out / "run")

    def fake_manifest(data_cfg, which="manifest"):
        return SimpleNamespace(num_samples=NUM_SAMPLES, shard_size=NUM_SAMPLES // 2, mean=[0.0] * 3, std=[1.0] * 3)

    def loader(cfg_, manifest, rank=0, world=1):
        return UnionLoader(cfg_.train.batch_size, rank, world, cfg_.train.seed, cfg_.data.image_size)

    trainer_module.load_manifest = fake_manifest  # test-only data source
    trainer_module.build_train_loader = loader
    if args.tiny_backbone:
        trainer_module.build_model = tiny_model
    tr = trainer_module.Trainer(cfg)
    try:
        result = tr.train()
        rows = torch.from_numpy(tr.loader.owned_rows())
        head = tr.head.export(tr.step)  # (N, d) at the final step
        stepped = torch.from_numpy(np.flatnonzero(tr.head.store.step_stamps > 0))
        torch.save({"rows": rows, "weight": head[rows], "stepped": stepped, "steps": tr.step,
                    "loss": result["final_loss"]}, out / f"head_rank{tr.rank}.pt")
        if tr.is_main:
            torch.save({k: v.detach().cpu() for k, v in tr.model.state_dict().items()}, out / "model.pt")
    finally:
        tr.close()


if __name__ == "__main__":
    main()
