"""Online kNN monitor: kNN top-1 of the backbone on fixed labelled subsets, every K epochs of training.

The DINO-style kNN monitor: a bank subset of the evaluation-train split and a query subset of the
evaluation-test split (a held-out split: pick hyper-parameters on one carved out of the training
set, never on the test split) are decoded once, with the evaluation transform, and kept in memory
as float tensors (Fashion-MNIST at 16 px: 10,000 + 5,000 images, 15 MB). Each evaluation runs the
backbone over them in eval mode (BatchNorm's running statistics are used, not updated), with the
global RNG state saved and restored, so monitoring does not change the training trajectory.
"""

from __future__ import annotations

import numpy as np
import torch

from diet_engine.engine.data import eval_transform
from diet_engine.engine.evaluation.knn import knn_accuracy
from diet_engine.storage.shards.loader import read_shard
from diet_engine.storage.shards.manifest import Manifest
from diet_engine.storage.shards.records import decode


def subset_indices(num_samples: int, size: int, seed: int = 0) -> np.ndarray:
    """(n,) sorted int64: a fixed seeded sample of `size` indices (all of them when size ≤ 0 or ≥ N)."""
    if size <= 0 or size >= num_samples:
        return np.arange(num_samples, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_samples, size, replace=False)).astype(np.int64)


def load_subset(manifest: Manifest, index: np.ndarray, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, C, H, W) float32 after `transform` and labels (n,) of the manifest's samples `index`
    (sorted), reading only the shards that hold them."""
    first, counts, paths = manifest.first_indices(), manifest.shard_counts(), manifest.shard_paths()
    shard = np.searchsorted(first, index, side="right") - 1
    images, labels = [], []
    for s in np.unique(shard):
        want = index[shard == s]
        got = read_shard(str(paths[s]), int(first[s]), int(counts[s]), manifest.index_field, manifest.image_field,
                         manifest.label_field, {int(n) for n in want}, manifest.num_classes)
        for n in want:
            data, label = got[int(n)]
            images.append(transform(decode(data, manifest.image.channels, paths[s], str(n))))
            labels.append(label)
    y = torch.tensor(labels, dtype=torch.int64)
    if (y < 0).any():
        raise ValueError(f"online evaluation needs labelled splits; {manifest.root} has unlabelled samples")
    return torch.stack(images), y


class OnlineKnn:
    """`OnlineKnn(cfg, bank_manifest, query_manifest, device)(model)` → kNN top-1 on the fixed subsets."""

    def __init__(self, cfg, bank: Manifest, queries: Manifest, device: torch.device) -> None:
        transform = eval_transform(cfg, bank)  # normalised with the bank's (training) statistics
        with torch.random.fork_rng(devices=[]):
            self.bank = load_subset(bank, subset_indices(bank.num_samples, cfg.eval.online_bank), transform)
            self.queries = load_subset(queries, subset_indices(queries.num_samples, cfg.eval.online_queries, 1),
                                       transform)
        self.k, self.temperature, self.batch = cfg.eval.knn_k, cfg.eval.knn_temperature, cfg.eval.batch_size
        self.device = device

    @torch.no_grad()
    def _features(self, model, x: torch.Tensor) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        return torch.cat([model.features(x[i : i + self.batch].to(self.device, dtype)).float().cpu()
                          for i in range(0, len(x), self.batch)])

    def __call__(self, model) -> float:
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[] if self.device.type != "cuda" else [self.device]):
                fb = self._features(model, self.bank[0])
                fq = self._features(model, self.queries[0])
        finally:
            model.train(was_training)
        return knn_accuracy(fb, self.bank[1], fq, self.queries[1], k=self.k, temperature=self.temperature)

    @property
    def sizes(self) -> tuple[int, int]:
        return len(self.bank[1]), len(self.queries[1])
