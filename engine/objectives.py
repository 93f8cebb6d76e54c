"""Training objectives: what a step computes from (images, indices, labels).

Every objective is an `nn.Module` whose trainable parameters (a projector, a classifier) sit in the
trainer's `_Joint` module, so DeepSpeed owns, all-reduces and checkpoints them with the backbone;
the DIET head never does. The trainer calls

    loss = objective.loss(engine, x, index, labels, t, head)

where `engine(x)` runs the DietModel (backbone → projector → normalise) under DeepSpeed.

* `DietObjective`: z = model(x); loss = head.loss(z, index, t) (full or batch CE on the DIET head).
* `SimclrObjective`: the memory baseline of the s-DIET paper. x is two views (B, 2, C, H, W);
  z = g(model(views)) (2B, p) with a 2-layer projector g; NT-Xent at τ = train.simclr_temperature
  over the rank's local batch (negatives are not gathered across ranks).
* `SupervisedObjective`: the memory floor. A linear classifier on model(x) against the loader's labels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diet_engine.engine.simclr import SimclrProjector, nt_xent, stack_views


class DietObjective(nn.Module):
    """DIET: classify every sample as its own class through the head."""

    def loss(self, engine, x: torch.Tensor, index: np.ndarray, labels, t: int, head) -> torch.Tensor:
        z = engine(x)  # (B, d)
        z = z if z.dtype == torch.float64 else z.float()  # the head and its loss stay fp32 under autocast
        return head.loss(z, index, t)


class SimclrObjective(nn.Module):
    """SimCLR: NT-Xent between the projected embeddings of two views of each sample."""

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 128, temperature: float = 0.2) -> None:
        super().__init__()
        self.projector = SimclrProjector(in_dim, hidden, out_dim)
        self.temperature = temperature

    def loss(self, engine, x: torch.Tensor, index: np.ndarray, labels, t: int, head) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 2:
            raise ValueError(f"SimCLR expects two views per sample (B, 2, C, H, W), got {tuple(x.shape)}; "
                             "is the loader's transform wrapped in engine.simclr.TwoViews?")
        h = engine(stack_views(x))  # (2B, d): the backbone runs on both views in one batch
        z = self.projector(h)  # (2B, p)
        return nt_xent(_loss_precision(z), self.temperature)


class SupervisedObjective(nn.Module):
    """Supervised training of the same backbone: a linear classifier on its features, CE on labels."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(in_dim, num_classes)

    def loss(self, engine, x: torch.Tensor, index: np.ndarray, labels, t: int, head) -> torch.Tensor:
        if labels is None:
            raise ValueError("train.method=supervised needs labels from the loader (with_labels=True)")
        y = torch.as_tensor(labels, device=x.device).long()  # (B,)
        if (y < 0).any():  # host-device sync; cheap next to the backbone step
            raise ValueError("train.method=supervised: some training samples have no label (-1)")
        logits = self.classifier(engine(x))  # (B, classes)
        return F.cross_entropy(_loss_precision(logits), y)


def _loss_precision(t: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 under bf16 autocast; fp64 reference runs (train.precision=fp64) stay fp64."""
    return t if t.dtype == torch.float64 else t.float()


def num_classes_of(manifest, configured: int = 0) -> int:
    """Classes of a labelled manifest: `configured` if > 0, else the manifest's label names."""
    if configured > 0:
        return configured
    for attr in ("label_names", "labels", "classes"):
        names = getattr(manifest, attr, None)
        if names:
            return len(names)
    num = getattr(manifest, "num_classes", 0)
    if num:
        return int(num)
    raise ValueError("train.method=supervised: the manifest has no label names; set train.num_classes")


def build_objective(cfg, model, manifest, device) -> nn.Module:
    method = cfg.train.method
    if method == "diet":
        return DietObjective().to(device)
    if method == "simclr":
        return SimclrObjective(model.out_dim, cfg.train.simclr_projector_hidden, cfg.train.simclr_projector_out,
                               cfg.train.simclr_temperature).to(device)
    if method == "supervised":
        return SupervisedObjective(model.out_dim, num_classes_of(manifest, cfg.train.num_classes)).to(device)
    raise ValueError(f"train.method={method!r} is not available in this build")
