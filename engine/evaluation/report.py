"""End-of-run evaluation: kNN, linear probe and RankMe of a backbone on labelled splits."""

from __future__ import annotations

import torch

from diet_engine.engine.data import build_eval_loader
from diet_engine.engine.evaluation.knn import knn_accuracy
from diet_engine.engine.evaluation.linear_probe import linear_probe_accuracy
from diet_engine.engine.evaluation.rankme import rankme


@torch.no_grad()
def extract_features(model, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (n, K) and labels (n,) in manifest order, model in eval mode."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    dtype = next(model.parameters()).dtype
    for x, _index, y in loader.epoch(0):
        feats.append(model.features(x.to(device, dtype, non_blocking=True)).float().cpu())  # device → host sync
        labels.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def evaluate(model, cfg, train_manifest, test_manifest, device: torch.device) -> dict[str, float]:
    """{'knn': acc, 'probe': acc, 'rankme': r} with the train split as bank / probe training set."""
    bank_loader = build_eval_loader(cfg, train_manifest, train_manifest)
    test_loader = build_eval_loader(cfg, test_manifest, train_manifest)
    ftr, ytr = extract_features(model, bank_loader, device)
    fte, yte = extract_features(model, test_loader, device)
    if (ytr < 0).any() or (yte < 0).any():
        raise ValueError("evaluation needs labelled splits (some samples have no label)")
    return {
        "knn": knn_accuracy(ftr, ytr, fte, yte, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature),
        "probe": linear_probe_accuracy(ftr, ytr, fte, yte, epochs=cfg.eval.probe_epochs, seed=cfg.train.seed),
        "rankme": rankme(fte),
    }


def format_table(rows: dict[str, dict[str, float]], wall: dict[str, float]) -> str:
    """Markdown table of evaluation rows plus wall times."""
    lines = ["| backbone | kNN top-1 (k=20) | linear probe top-1 | RankMe |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {100 * r['knn']:.2f}% | {100 * r['probe']:.2f}% | {r['rankme']:.1f} |")
    lines.append("")
    lines.append(", ".join(f"{k}: {v:.1f} s" for k, v in wall.items()))
    return "\n".join(lines)
