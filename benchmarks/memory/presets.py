"""Named settings of the memory sweep: backbone, image size, batch size, precision, N values, steps.

* `cpu-resnet18` (default, what this repository's CPU tables were taken with): ResNet-18 with the
  small (CIFAR) stem at 16 px, B = 256, fp32, N ∈ {50k, 100k, 1.28M, 10M}, all six configurations;
  1 warm-up + 2 measured steps each (a CPU step takes 5–20 s). Peak *process* memory (RSS high-water).
* `cpu-resnet18-32px`: the same at 32 px (CIFAR's size), N = 50k, (c) (d) (e) only: at 16 px the
  ~1 GiB of libraries, weights and optimizer state outweigh the activations, at 32 px less so.
* `cpu-resnet18-64px`: the same at 64 px (TinyImageNet's size), N ∈ {50k, 1.28M}, (c) (d) (e):
  the setting of the CPU bars, where activations (not libraries) dominate process memory.
* `gpu-resnet50`: the s-DIET paper's setting, ResNet-50 at 224 px, B = 256, bf16 autocast, same N
  values, 3 warm-up + 10 measured steps; peak accelerator memory (allocated and reserved) plus host
  RSS. One command on a CUDA machine: `diet bench memory --preset gpu-resnet50`.
* `tiny`: seconds-long smoke run (tests, CI).
"""

from __future__ import annotations

import dataclasses

METHODS_ALL = ("a", "b", "b2", "c", "d", "e")


@dataclasses.dataclass
class MemoryPreset:
    name: str
    backbone: str = "resnet18"
    """torchvision backbone; the head's d is its feature width (resnet18: 512, resnet50: 2048)."""
    image_size: int = 16
    """side of the crops fed to the backbone."""
    batch_size: int = 256
    precision: str = "fp32"
    """'fp32' or 'bf16' (autocast)."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    sizes: tuple[int, ...] = (50_000, 100_000, 1_281_167, 10_000_000)
    """data-set sizes N swept (ImageNet-1k: 1,281,167)."""
    methods: tuple[str, ...] = ("a", "b", "c", "d", "e")
    """which configurations of methods.py to run."""
    warmup_steps: int = 1
    """steps before the peak counters are reset (optimizer state, allocator caches settle)."""
    measure_steps: int = 3
    """steps whose peak is reported."""
    shard_size: int = 1000
    """R: samples per (virtual) shard = rows per head-store chunk."""
    base_image_px: int = 16
    """side of the stored synthetic images (the crop resizes them to image_size)."""
    head_memory_budget_mb: int = 64
    """head.memory_budget_mb of the disk store (its row cache + write-behind staging)."""
    timeout_s: int = 900
    """per-configuration wall-clock limit."""
    num_workers: int = 0
    """loader worker processes (0: decode in the training process, counted in its RSS)."""


PRESETS: dict[str, MemoryPreset] = {
    "cpu-resnet18": MemoryPreset(name="cpu-resnet18", methods=("a", "b", "b2", "c", "d", "e"), measure_steps=2),
    # activations dominate only at larger images: the SimCLR / s-DIET / supervised ratios at 32 px
    "cpu-resnet18-32px": MemoryPreset(name="cpu-resnet18-32px", image_size=32, base_image_px=32, sizes=(50_000,),
                                      methods=("c", "d", "e"), measure_steps=2),
    # TinyImageNet's size (where the s-DIET paper's DIET runs out of memory): activations dominate
    "cpu-resnet18-64px": MemoryPreset(name="cpu-resnet18-64px", image_size=64, base_image_px=64,
                                      sizes=(50_000, 1_281_167), methods=("c", "d", "e"), measure_steps=2,
                                      timeout_s=1800),
    "gpu-resnet50": MemoryPreset(
        name="gpu-resnet50", backbone="resnet50", image_size=224, batch_size=256, precision="bf16",
        device="cuda", methods=METHODS_ALL, warmup_steps=3, measure_steps=10, base_image_px=224,
        head_memory_budget_mb=256, timeout_s=1200, num_workers=8,
    ),
    "tiny": MemoryPreset(
        name="tiny", image_size=8, batch_size=16, sizes=(2_000, 8_000), methods=METHODS_ALL,
        warmup_steps=1, measure_steps=1, shard_size=200, base_image_px=8, head_memory_budget_mb=8,
        timeout_s=300,
    ),
}
