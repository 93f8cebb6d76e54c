"""Optimizers from the `optim` config section: the one place that turns `OptimConfig` into an optimizer.

* `build_optimizer`: torch AdamW / SGD over parameters (the backbone under DeepSpeed, the dense head).
* `build_lazy_optimizer`: the exact lazy AdamW / SGD for head rows (kernels/lazy_optim), same hyper-parameters.
* `head_optimizer_meta`: what a head store records about its optimizer (checked when a store is reopened).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from diet_engine.engine.config import OptimConfig
from diet_engine.kernels import LazyAdamW, LazySGD


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """torch.optim.AdamW (decoupled decay) or SGD (momentum, coupled L2) at learning rate `lr`."""
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_lazy_optimizer(cfg: OptimConfig, lrs: np.ndarray, mode: str = "exact", *, num_rows: int | None = None,
                         batch_size: int | None = None) -> LazyAdamW | LazySGD:
    """The lazy optimizer equal to `build_optimizer`'s applied densely (mode 'exact'), or the s-DIET
    multistep update (mode 'paper', which needs num_rows and batch_size: N/B − 1 skipped steps)."""
    paper = {"num_rows": num_rows, "batch_size": batch_size} if mode == "paper" else {}
    if cfg.name == "adamw":
        return LazyAdamW(lrs, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, mode=mode, **paper)
    return LazySGD(lrs, momentum=cfg.momentum, weight_decay=cfg.weight_decay, mode=mode, **paper)


def head_optimizer_meta(cfg: OptimConfig, mode: str = "exact") -> dict:
    """The optimizer fields a head store keeps in its metadata (`HeadMeta.optimizer`)."""
    return {"kind": cfg.name, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay,
            "momentum": cfg.momentum, "mode": mode}
