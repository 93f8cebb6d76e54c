"""Samples out of a constructed torchvision data set, in its index order, encoded for the shards.

Three readers, chosen per data set and checked against `dataset[i]` (pixels and label) on the
first and last sample; when the check fails (a torchvision version that stores its data
differently), every sample goes through `dataset[i]`:

- 'arrays': classes holding `data` + `targets`/`labels` (MNIST family (N, H, W), CIFAR (N, H, W, 3),
  SVHN and STL10 (N, 3, H, W)): pixels straight from the array, PNG-encoded (~25 µs for 28×28);
- 'files': classes holding image paths (`_image_files`, `_images`, `samples`: Food101,
  Flowers102, DTD, OxfordIIITPet, ImageNet): JPEG/PNG bytes kept, one decode per file to check it;
- 'getitem': `dataset[i]` (a PIL image) for each sample, PNG-encoded.

Gray stays one channel; everything else is RGB, as torchvision's loaders return it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diet_engine.storage.shards.sources import encode_png
from diet_engine.storage.shards.torchvision_sets import TorchvisionSet


@dataclass
class Sample:
    data: bytes
    ext: str  # 'png' | 'jpg'
    label: int | None
    stats_pixels: np.ndarray  # (h', w', C) uint8: the image, or a strided view of it for statistics
    size: tuple[int, int]  # stored (H, W)


@dataclass
class SplitReader:
    """A constructed data set and how its samples are read (see the design note)."""

    dataset: Any
    how: str  # 'arrays' | 'files' | 'getitem'
    channels: int
    labels: np.ndarray | None  # (N,) int64; None: unlabeled
    label_names: list[str] | None
    images: np.ndarray | None = None  # 'arrays': (N, H, W, C) uint8
    files: list[Path] | None = None  # 'files': one per sample

    def __len__(self) -> int:
        return len(self.dataset)

    def samples(self, imap: Callable = map) -> Iterator[Sample]:
        """Encoded samples in index order; `imap(fn, items)` may map in parallel (it must keep order)."""
        label = (lambda i: None) if self.labels is None else (lambda i: int(self.labels[i]))
        if self.how == "arrays":
            for i, img in enumerate(self.images):
                yield Sample(encode_png(img), "png", label(i), img, img.shape[:2])
        elif self.how == "files":
            for i, s in enumerate(imap(encode_image_file, self.files)):
                if isinstance(s, str):
                    raise ValueError(f"unreadable image {self.files[i]}: {s}")
                s.label = label(i)
                yield s
        else:
            for i in range(len(self.dataset)):
                img = _pixels(self.dataset[i][0], self.channels, i)
                yield Sample(encode_png(img), "png", label(i), img, img.shape[:2])


def _pixels(img: Any, channels: int, i: int) -> np.ndarray:
    """A PIL image from `dataset[i]` → (H, W, C) uint8, C = `channels`."""
    if not isinstance(img, Image.Image):
        raise ValueError(f"sample {i} is a {type(img).__name__}, not a PIL image")
    if channels == 1 and img.mode != "L":
        raise ValueError(f"sample {i} is a {img.mode} image but sample 0 is gray (L)")
    a = np.asarray(img if img.mode == ("L" if channels == 1 else "RGB") else img.convert("RGB"))
    return a[:, :, None] if a.ndim == 2 else a


def encode_image_file(path: Path) -> Sample | str:
    """Read one image file as torchvision's loaders do (`Image.open(path).convert('RGB')`): JPEG/PNG
    bytes kept when already gray/RGB (the loader converts to RGB the same way), anything else stored
    as the PNG of the converted image. Returns an error string for an unreadable file (for imap).
    Cost: one full decode (~ms for a photo)."""
    try:
        raw = Path(path).read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()  # full decode: a truncated file fails here
            keep = im.format in ("JPEG", "PNG") and im.mode in ("L", "RGB")
            ext = "jpg" if im.format == "JPEG" else "png"
            rgb = np.asarray(im.convert("RGB"))  # (H, W, 3)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: {e}"
    if not keep:
        raw, ext = encode_png(rgb), "png"
    step = max(1, min(rgb.shape[:2]) // 64)  # statistics on ≤ ~64×64 strided pixels
    return Sample(raw, ext, None, rgb[::step, ::step], rgb.shape[:2])


def _as_numpy(x: Any) -> np.ndarray:
    return x.numpy() if torch.is_tensor(x) else np.asarray(x)


def _array_images(ds: Any) -> np.ndarray | None:
    """(N, H, W, C) uint8 view of `ds.data` for the layouts torchvision uses, or None."""
    data = getattr(ds, "data", None)
    if data is None:
        return None
    x = _as_numpy(data)
    if x.dtype != np.uint8 or len(x) != len(ds):
        return None
    if x.ndim == 3:  # (N, H, W): MNIST family
        return x[..., None]
    if x.ndim == 4 and x.shape[-1] == 3:  # (N, H, W, 3): CIFAR
        return x
    if x.ndim == 4 and x.shape[1] == 3:  # (N, 3, H, W): SVHN, STL10
        return x.transpose(0, 2, 3, 1)
    return None


def _labels_of(ds: Any) -> np.ndarray | None:
    for attr in ("targets", "labels", "_labels"):
        v = getattr(ds, attr, None)
        if v is not None and not callable(v):
            return _as_numpy(v).astype(np.int64).reshape(-1)
    return None


def _files_of(ds: Any) -> list[Path] | None:
    for attr in ("_image_files", "_images", "samples", "imgs"):
        v = getattr(ds, attr, None)
        if isinstance(v, list) and len(v) == len(ds):
            return [Path(f[0] if isinstance(f, tuple) else f) for f in v]
    return None


def reader_for(tv: TorchvisionSet, ds: Any, split: str) -> SplitReader:
    """How to read `ds`: arrays, files or `ds[i]`, with the fast paths checked against `ds[i]`."""
    n = len(ds)
    if n == 0:
        raise ValueError(f"torchvision.datasets.{type(ds).__name__} ({split}) holds no samples")
    names = getattr(ds, "classes", None)
    label_names = ([", ".join(c) if isinstance(c, tuple) else str(c) for c in names] if names is not None else
                   [str(i) for i in range(tv.num_classes)] if tv.num_classes else None)
    first = ds[0][0]
    channels = 1 if getattr(first, "mode", "") == "L" else 3
    labels, images, files = _labels_of(ds), _array_images(ds), _files_of(ds)
    if labels is not None and len(labels) != n:
        raise ValueError(f"torchvision.datasets.{type(ds).__name__} ({split}) has {n} images but {len(labels)} "
                         "labels: its image and label files do not belong together")
    r = SplitReader(ds, "getitem", channels, None, label_names)
    if labels is not None:
        if images is not None and images.shape[-1] == channels:
            r.how, r.images = "arrays", images
        elif files is not None and channels == 3:
            r.how, r.files = "files", files
    if r.how != "getitem" and not _agrees(r, labels, [0, n - 1]):
        r.how, r.images, r.files = "getitem", None, None
    if r.how == "getitem":  # labels from ds[i] too: one more pass over the data set (decodes every image)
        labels = np.fromiter((int(ds[i][1]) for i in range(n)), np.int64, n)
    if split in tv.unlabeled_splits or (labels == -1).all():
        r.label_names = None
    elif label_names is None and labels.min() >= 0:  # a class without `.classes` nor a registry count
        r.labels, r.label_names = labels, [str(i) for i in range(int(labels.max()) + 1)]
    elif labels.min() < 0 or (label_names and labels.max() >= len(label_names)):
        raise ValueError(f"{type(ds).__name__} ({split}): labels span {labels.min()}..{labels.max()}, outside "
                         f"0..{len(label_names or []) - 1} (its {len(label_names or [])} classes)")
    else:
        r.labels = labels
    return r


def _agrees(r: SplitReader, labels: np.ndarray | None, at: list[int]) -> bool:
    """Whether the fast path gives `ds[i]`'s pixels and label at the indices `at`."""
    for i in at:
        img, target = r.dataset[i]
        want = _pixels(img, r.channels, i)
        if r.how == "arrays":
            got = r.images[i]
        else:
            s = encode_image_file(r.files[i])
            if isinstance(s, str):
                return False
            got = np.asarray(Image.open(io.BytesIO(s.data)).convert("RGB"))
        if got.shape != want.shape or not np.array_equal(got, want):
            return False
        if labels is not None and int(labels[i]) != int(target):
            return False
    return True
