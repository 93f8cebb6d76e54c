"""Linear probe: a linear classifier trained on frozen, standardised features.

Features are standardised with the training split's mean and std; a bias-ful nn.Linear is trained
with AdamW + cosine schedule on mini-batches (scales to ImageNet-sized feature banks), and top-1
accuracy on the test split is returned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def linear_probe_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                          test_labels: torch.Tensor, *, epochs: int = 100, batch_size: int = 256,
                          lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0,
                          min_steps: int = 1000) -> float:
    """Top-1 test accuracy in [0, 1]. Runs `epochs` epochs, more if needed to reach `min_steps`."""
    mean = train_feats.float().mean(0, keepdim=True)  # (1, K)
    std = train_feats.float().std(0, keepdim=True).clamp_min(1e-6)  # (1, K)
    xtr = (train_feats.float() - mean) / std
    xte = (test_feats.float() - mean) / std
    ytr, yte = train_labels.long(), test_labels.long()
    c = int(max(ytr.max(), yte.max())) + 1
    g = torch.Generator().manual_seed(seed)
    clf = nn.Linear(xtr.shape[1], c)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))  # small banks: enough updates
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for lo in range(0, len(xtr), batch_size):
            b = perm[lo : lo + batch_size]
            loss = F.cross_entropy(clf(xtr[b]), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float((clf(xte).argmax(1) == yte).double().mean())
