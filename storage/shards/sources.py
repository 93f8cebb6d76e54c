"""Where samples come from: scikit-learn's digits, a folder of images, a synthetic generator.

Each source turns its input into encoded samples `(image bytes, 'png'|'jpg', label | None)` plus
the decoded pixels for statistics; prepare.py writes them into shards. Nothing here writes files.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diet_engine.storage.shards.image_modes import to_8bit

# ---------------------------------------------------------------------------------------- encoding


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(pixels: np.ndarray, level: int = 6) -> bytes:
    """(H, W) or (H, W, C∈{1, 3}) uint8 → 8-bit gray/RGB PNG (no row filters, zlib `level`).

    For tiny synthetic and digit images; ~10–30 µs for 8×8 against 30–70 µs through PIL (whose
    per-call overhead dominates there). Photos go through PIL (`encode_file`), whose adaptive
    row filters compress better.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    h, w, c = pixels.shape
    if c not in (1, 3) or pixels.dtype != np.uint8:
        raise ValueError(f"encode_png takes uint8 images with 1 or 3 channels, got {pixels.dtype} {pixels.shape}")
    raw = np.zeros((h, 1 + w * c), np.uint8)  # each scanline: filter byte 0 + pixels
    raw[:, 1:] = pixels.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
            + _png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------- digits

DIGITS_DESCRIPTION = ("scikit-learn load_digits: UCI ML hand-written digits, 1797 8x8 grayscale images, "
                      "10 classes; pixel values 0..16 stored as 8-bit PNG scaled to 0..255")


@dataclass
class DigitsSplit:
    name: str
    images: np.ndarray  # (n, 8, 8) uint8 in 0..255
    labels: np.ndarray  # (n,) int64
    source_indices: np.ndarray  # (n,) int64 rows of load_digits(), ascending


def digits_splits(test_fraction: float = 0.2, seed: int = 0) -> list[DigitsSplit]:
    """Stratified train/test split of load_digits(); each split in ascending source order."""
    from sklearn.datasets import load_digits  # noqa: PLC0415 (slow import, only needed here)
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = d.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                   random_state=seed)
    return [DigitsSplit(name, images[np.sort(ix)], labels[np.sort(ix)], np.sort(ix))
            for name, ix in (("train", train), ("test", test))]


# ---------------------------------------------------------------------------------------- folder

FOLDER_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class FolderListing:
    files: list[Path]  # every image, in index order: sorted by (class, relative path)
    labels: list[int] | None  # per file, None for a flat folder
    class_names: list[str] | None
    ignored: int  # top-level files ignored in class layout


def list_folder(root: str | os.PathLike) -> FolderListing:
    """ImageFolder layout (class subfolders, searched recursively) or a flat folder of images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    entries = sorted(root.iterdir())
    is_img = lambda p: p.is_file() and p.suffix.lower() in FOLDER_EXTS  # noqa: E731
    classes = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not classes:
        files = [p for p in entries if is_img(p)]
        if not files:
            raise ValueError(f"image folder {root} holds no images ({', '.join(sorted(FOLDER_EXTS))})")
        return FolderListing(files, None, None, 0)
    files, labels = [], []
    for label, cdir in enumerate(classes):
        found = sorted(p for p in cdir.rglob("*") if is_img(p))
        if not found:
            raise ValueError(f"class folder {cdir} holds no images")
        files += found
        labels += [label] * len(found)
    return FolderListing(files, labels, [c.name for c in classes], sum(1 for p in entries if is_img(p)))


@dataclass
class EncodedImage:
    data: bytes
    ext: str  # 'png' | 'jpg'
    stats_pixels: np.ndarray  # (h', w', C) uint8, a strided view of the stored image for statistics
    size: tuple[int, int]  # stored (H, W)


def encode_file(path: Path, channels: int, resize: int | None, image_format: str,
                quality: int = 95) -> EncodedImage:
    """Read, check and (if needed) re-encode one image file. Raises OSError/ValueError if unreadable.

    `image_format`: 'keep' copies JPEG/PNG bytes untouched when no resize or mode change is needed
    (other formats become PNG); 'jpg' / 'png' always re-encode. Cost: one decode (~ms for a photo).
    """
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        im.load()  # full decode: truncated or corrupt files fail here
        src_format = (im.format or "").upper()
        mode = "L" if channels == 1 else "RGB"
        needs_convert = im.mode != mode and not (image_format == "keep" and im.mode in ("L", "RGB"))
        out = to_8bit(im, mode)  # 16-bit images scaled, not clipped at 255
        if resize:
            w, h = out.size
            s = resize / min(w, h)
            if s != 1.0:
                out = out.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        pixels = np.asarray(out)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    step = max(1, min(pixels.shape[:2]) // 64)  # statistics on ≤ ~64×64 strided pixels
    stats = pixels[::step, ::step]
    size = pixels.shape[:2]
    if image_format == "keep" and not resize and not needs_convert and src_format in ("JPEG", "PNG"):
        return EncodedImage(raw, "jpg" if src_format == "JPEG" else "png", stats, size)
    fmt = image_format if image_format != "keep" else ("jpg" if src_format == "JPEG" else "png")
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(buf, format="PNG")
    else:
        Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(buf, format="JPEG", quality=quality)
    return EncodedImage(buf.getvalue(), fmt, stats, size)


# ---------------------------------------------------------------------------------------- synthetic

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a cheap counter-based hash."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def synthetic_images(indices: np.ndarray, size: int, channels: int, num_classes: int,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, size, size, C) uint8 and labels (n,) = index % num_classes, a pure function of
    (seed, index): a blocky 4×4 per-class template (75%) plus per-index hash noise (25%).
    Cost: vectorised, ~10 ns per pixel."""
    idx = np.asarray(indices, np.uint64)
    labels = (idx % np.uint64(num_classes)).astype(np.int64)
    g = min(4, size)
    cell = (np.arange(size) * g) // size  # (size,) pixel → template cell
    cells = (cell[:, None] * g + cell[None, :])[:, :, None] * channels + np.arange(channels)  # (S, S, C)
    cells = cells.astype(np.uint64)
    s = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
    template = _mix(s ^ _mix(labels.astype(np.uint64)[:, None, None, None] * np.uint64(1 << 20) + cells))
    pix = (np.arange(size * size * channels, dtype=np.uint64)).reshape(size, size, channels)
    noise = _mix(s + _mix(idx[:, None, None, None] * np.uint64(1 << 32) + pix + np.uint64(7)))
    img = (template & np.uint64(255)) * np.uint64(3) + (noise & np.uint64(255))
    return (img // np.uint64(4)).astype(np.uint8), labels
