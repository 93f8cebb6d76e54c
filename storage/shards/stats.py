"""Running image statistics for the manifest: per-channel mean/std in [0, 1] units and sizes."""

from __future__ import annotations

from collections import Counter

import numpy as np

from diet_engine.storage.shards.manifest import ImageStats


class StatsAccumulator:
    """Accumulates per-channel Σx, Σx² (float64) and a histogram of (H, W) sizes.

    Cost: one pass over the pixels (~1 ns/px vectorised); memory O(distinct sizes).
    """

    def __init__(self, channels: int):
        self.channels = channels
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)
        self.pixels = 0  # per channel
        self.images = 0
        self.sizes: Counter[tuple[int, int]] = Counter()

    def add(self, images: np.ndarray, size: tuple[int, int] | None = None) -> None:
        """`images`: (n, H, W, C) or (H, W, C) uint8 with C == channels. `size`: the stored (H, W)
        to record when `images` is a strided view of a larger image."""
        if images.ndim == 3:
            images = images[None]
        n, h, w, c = images.shape
        if c != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {c}")
        x = images.reshape(-1, c).astype(np.float64) / 255.0  # (n·H·W, C)
        self.sum += x.sum(0)
        self.sumsq += np.square(x).sum(0)
        self.pixels += n * h * w
        self.images += n
        self.sizes[size or (h, w)] += n

    def merge(self, other: StatsAccumulator) -> None:
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.pixels += other.pixels
        self.images += other.images
        self.sizes.update(other.sizes)

    def result(self, fmt: str) -> ImageStats:
        if self.images == 0:
            raise ValueError("no images to compute statistics on")
        mean = self.sum / self.pixels
        std = np.sqrt(np.maximum(self.sumsq / self.pixels - mean**2, 0.0))
        hs = sorted(self.sizes.elements()) if len(self.sizes) > 1 else list(self.sizes)
        height = int(np.median([h for h, _ in hs]))
        width = int(np.median([w for _, w in hs]))
        return ImageStats(channels=self.channels, height=height, width=width,
                          uniform_size=len(self.sizes) == 1, mean=[round(float(v), 6) for v in mean],
                          std=[round(float(v), 6) for v in std], stats_samples=self.images, format=fmt)
