"""Weighted kNN classifier on frozen features (Wu et al. 2018; DINO's protocol).

Cosine similarity to the k nearest training features; each neighbour votes for its label with
weight exp(sim / T). Default k = 20, T = 0.07.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """Predicted labels (n_test,) for test features (n_test, K) given a bank (n_train, K)."""
    if len(train_feats) == 0:
        raise ValueError("kNN needs at least one training feature")
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    k = min(k, len(train_feats))
    bank = F.normalize(train_feats.float(), dim=1)  # (n_train, K)
    preds = []
    for lo in range(0, len(test_feats), chunk):
        q = F.normalize(test_feats[lo : lo + chunk].float(), dim=1)  # (b, K)
        sim, nn_idx = (q @ bank.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(q), c, dtype=torch.float64, device=q.device)
        votes.scatter_add_(1, train_labels[nn_idx].long(), (sim.double() / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of `knn_predict` in [0, 1]."""
    pred = knn_predict(train_feats, train_labels, test_feats, k, temperature,
                       num_classes=int(max(train_labels.max(), test_labels.max())) + 1)
    return float((pred.cpu() == test_labels.cpu()).double().mean())
