"""Per-sample transforms on decoded (C, H, W) uint8 tensors: DIET's three augmentation strengths.

The training pipeline follows Algorithm 4 of the DIET paper (Balestriero 2023), in
torchvision.transforms.v2::

    strength 1: RandomResizedCrop(size, scale=crop_scale) + RandomHorizontalFlip
    strength 2: + RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.3) + RandomGrayscale(p=0.2)
    strength 3: + RandomApply([GaussianBlur((3, 3), sigma=(1.0, 2.0))], p=0.2)
    then ToDtype(float32, scale=True) + Normalize(mean, std) + RandomErasing(p=erasing)

The paper's listing ends every strength with RandomErasing(0.25); it is kept as the default
(`erasing=0.25`), set `erasing=0` to leave it out.

Channels: `channels=3` on grayscale input repeats the gray plane to RGB first (so the backbone sees
3 channels); `channels=1` on RGB input converts to gray; None keeps the input's channel count.
On 1-channel images ColorJitter's saturation and hue are no-ops (torchvision matches PIL there)
and RandomGrayscale does nothing, so strength 2 reduces to brightness/contrast jitter; on
gray-repeated 3-channel images the same holds in effect. `mean`/`std` may have one value (used for
every channel) or one per output channel.

Cost: ~50–200 µs per small image, ~1–3 ms per 224² image on one core.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


class ToChannels(torch.nn.Module):
    """(C, H, W) → (channels, H, W): repeat a gray plane, or average RGB to gray (ITU-R 601-2)."""

    def __init__(self, channels: int | None):
        super().__init__()
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels}")
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-3]
        if self.channels is None or c == self.channels:
            return x
        if self.channels == 3 and c == 1:
            return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
        if self.channels == 1 and c == 3:
            return v2.functional.rgb_to_grayscale(x, num_output_channels=1)
        raise ValueError(f"cannot map {c} channels to {self.channels}")

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def _norm(values: Sequence[float], channels: int | None, what: str) -> list[float]:
    values = [float(v) for v in values]
    if channels is not None and len(values) == 1:
        return values * channels
    if channels is not None and len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values, expected 1 or {channels}")
    return values


def make_train_transform(size: int, strength: int, mean: Sequence[float], std: Sequence[float],
                         crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True, *,
                         channels: int | None = None, erasing: float = 0.25) -> v2.Compose:
    """DIET training augmentation of the given `strength` (1, 2 or 3) → (C, size, size) float32."""
    if strength not in (1, 2, 3):
        raise ValueError(f"strength must be 1, 2 or 3, got {strength}")
    if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < min ≤ max ≤ 1, got {crop_scale}")
    if not 0.0 <= erasing <= 1.0:
        raise ValueError(f"erasing must be a probability, got {erasing}")
    ts: list[torch.nn.Module] = [ToChannels(channels), v2.RandomResizedCrop(size, scale=crop_scale, antialias=True)]
    if flip:
        ts.append(v2.RandomHorizontalFlip())
    if strength >= 2:
        ts += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.3), v2.RandomGrayscale(p=0.2)]
    if strength >= 3:
        ts.append(v2.RandomApply([v2.GaussianBlur((3, 3), sigma=(1.0, 2.0))], p=0.2))
    ts += [v2.ToDtype(torch.float32, scale=True),
           v2.Normalize(_norm(mean, channels, "mean"), _norm(std, channels, "std"))]
    if erasing > 0:
        ts.append(v2.RandomErasing(p=erasing))
    return v2.Compose(ts)


def make_eval_transform(size: int, mean: Sequence[float], std: Sequence[float], *,
                        channels: int | None = None, crop_ratio: float = 1.0) -> v2.Compose:
    """Deterministic: resize the shorter side to size / crop_ratio, center-crop size×size, normalise.

    crop_ratio=1.0 (default) keeps the whole shorter side; ImageNet's convention is 0.875 (256→224).
    """
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    return v2.Compose([
        ToChannels(channels),
        v2.Resize(round(size / crop_ratio), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(_norm(mean, channels, "mean"), _norm(std, channels, "std")),
    ])
