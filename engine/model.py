"""The DIET model: a torchvision backbone with its classifier removed, an optional projector and
optional L2 normalisation (the head lives apart, see `engine/head.py`).

Classifier removal follows the DIET paper's Algorithm 1 (`f.fc = nn.Identity()`), generalised
to every torchvision classification model: the last `nn.Linear` in module order is the
classifier (resnet `fc`, vgg/efficientnet/convnext/mobilenet `classifier[-1]`, vit `heads.head`,
swin `head`, ...). Its `in_features` is the representation width K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def build_backbone(name: str, *, small_stem: bool = False, in_channels: int = 3) -> tuple[nn.Module, int]:
    """Any torchvision classification model by name, classifier removed. Returns (backbone, K)."""
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [m for m in available if name.split("_")[0] in m][:8]
        raise ValueError(f"unknown backbone {name!r}; torchvision classification models include "
                         f"{close or available[:10]}")
    net = torchvision.models.get_model(name, weights=None)
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"backbone {name!r} has no nn.Linear classifier to remove")
    cls_name, cls = linears[-1]
    _set_submodule(net, cls_name, nn.Identity())
    if small_stem:
        _small_stem(net, name)
    if in_channels != 3:
        _adapt_input_channels(net, in_channels)
    return net, cls.in_features


def _small_stem(net: nn.Module, name: str) -> None:
    """CIFAR-style stem for inputs ≤ 64 px: 3×3 stride-1 first conv, no max-pool."""
    conv1 = getattr(net, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and hasattr(net, "maxpool"):  # ResNet, ResNeXt, Wide-ResNet
        net.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        return
    # Generic: make the first strided conv stride 1 (keeps parameter shapes; fewer downsamplings).
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (1, 1)
            return
    raise ValueError(f"don't know how to give {name!r} a small-image stem; set model.small_stem=false")


def _adapt_input_channels(net: nn.Module, in_channels: int) -> None:
    for mod_name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            m.dilation, m.groups, m.bias is not None)
            _set_submodule(net, mod_name, new)
            return


class Projector(nn.Sequential):
    """s-DIET's 3-layer MLP: Linear-BN-ReLU, Linear-BN-ReLU, Linear."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )


class DietModel(nn.Module):
    """x (B, C, H, W) → z (B, d): backbone f, optional projector g, optional L2 normalisation."""

    def __init__(self, backbone: nn.Module, feature_dim: int, projector: nn.Module | None = None,
                 out_dim: int | None = None, normalize: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector if projector is not None else nn.Identity()
        self.feature_dim = feature_dim  # K: the representation evaluated by kNN / probe
        self.out_dim = out_dim or feature_dim  # d: the head's row width
        self.normalize = normalize

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone representation (B, K), the one evaluated downstream."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.backbone(x))  # (B, d)
        return F.normalize(z, dim=1) if self.normalize else z


def build_model(cfg_model, image_size: int, channels: int = 3) -> DietModel:
    """Build the DietModel described by a `ModelConfig`."""
    small = cfg_model.small_stem if cfg_model.small_stem is not None else image_size <= 64
    backbone, k = build_backbone(cfg_model.backbone, small_stem=small, in_channels=channels)
    projector, out = None, k
    if cfg_model.projector == "mlp":
        projector = Projector(k, cfg_model.projector_hidden, cfg_model.projector_out)
        out = cfg_model.projector_out
    model = DietModel(backbone, k, projector, out, cfg_model.normalize)
    if cfg_model.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
