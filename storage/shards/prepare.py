"""`diet prepare`: write shard sets (tars + manifest.json) from digits, a folder, or a generator.

Every entry point builds its output in a staging folder beside `out` and renames it into place at
the end (staging.py), so a failure or Ctrl-C leaves nothing half-written; the manifest is written
last, inside the staging folder.

Costs, measured on 2 cores shared with other jobs (load average 5–12): digits 1.3–2 s, most of
it importing scikit-learn; synthetic 8×8 gray ~30 µs (PNG) + ~35 µs (tar) per sample per core,
N = 1,281,167 in 93 s with 2 workers (3.7 GB: a tar member costs ≥ 1 KB); folder: one decode
(+ re-encode) per file in `workers` processes, tars written by the main process in index order.
See benchmarks/loader/shards.py (`diet bench loader`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError
from tqdm import tqdm

from diet_engine.storage.shards.manifest import KEY_WIDTH, Manifest, ShardInfo, shard_name
from diet_engine.storage.shards.sources import (
    DIGITS_DESCRIPTION,
    digits_splits,
    encode_file,
    encode_png,
    list_folder,
    synthetic_images,
)
from diet_engine.storage.shards.staging import staged_output
from diet_engine.storage.shards.stats import StatsAccumulator
from diet_engine.storage.shards.writer import ShardSetWriter, write_shard

DIGITS_SHARD_SIZE = 256
DEFAULT_SHARD_SIZE = 1000


def _key_width(n: int) -> int:
    return max(KEY_WIDTH, len(str(max(n - 1, 0))))


def _check_shard_size(shard_size: int) -> None:
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")


def _workers(workers: int | None) -> int:
    return max(1, os.cpu_count() or 1) if workers is None else max(1, int(workers))


# ---------------------------------------------------------------------------------------- digits


def prepare_digits(out: str | os.PathLike, shard_size: int = DIGITS_SHARD_SIZE, overwrite: bool = False,
                   test_fraction: float = 0.2, seed: int = 0) -> dict[str, Manifest]:
    """Write scikit-learn's digits as `out/train/` and `out/test/` shard sets (stratified split).

    Returns {'train': Manifest, 'test': Manifest}. Labels are stored (`cls`) for evaluation only.
    """
    _check_shard_size(shard_size)
    splits = digits_splits(test_fraction, seed)
    manifests = {}
    with staged_output(out, overwrite) as tmp:
        for sp in splits:
            folder = tmp / sp.name
            folder.mkdir()
            w = ShardSetWriter(folder, shard_size)
            acc = StatsAccumulator(channels=1)
            for img, label in zip(sp.images, sp.labels, strict=True):
                w.write(encode_png(img), "png", int(label))
            acc.add(sp.images[:, :, :, None])
            m = Manifest(
                num_samples=w.num_samples, shard_size=shard_size, shards=w.close(), image=acc.result("png"),
                label_names=[str(c) for c in range(10)], num_classes=10,
                source={"kind": "digits", "description": DIGITS_DESCRIPTION},
                split={"name": sp.name, "of": "sklearn.datasets.load_digits", "method": "stratified",
                       "test_fraction": test_fraction, "seed": seed, "num_samples": len(sp.labels),
                       "source_indices": sp.source_indices.tolist()},
                root=folder)
            m.save()
            manifests[sp.name] = m
    for name, m in manifests.items():
        m.root = Path(out).absolute() / name
    return manifests


# ---------------------------------------------------------------------------------------- folder


def _encode_one(path: Path, channels: int, resize: int | None, image_format: str, quality: int):
    try:
        return encode_file(path, channels, resize, image_format, quality)
    except UnidentifiedImageError:
        return "not an image format Pillow recognises (or a truncated header)"
    except Exception as e:  # noqa: BLE001 (any decoder failure means: unreadable image)
        return f"{type(e).__name__}: {e}"


def prepare_folder(root: str | os.PathLike, out: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE, *,
                   channels: int = 3, resize: int | None = None, image_format: str = "keep",
                   quality: int = 95, skip_bad: bool = False, overwrite: bool = False,
                   workers: int | None = None, progress: bool = True) -> Manifest:
    """Shards from an image folder: class subfolders (ImageFolder) → labels, or a flat folder.

    Index order is sorted (class, relative path). `resize` sets the shorter side (re-encodes);
    `image_format` is 'keep' (copy JPEG/PNG bytes when possible), 'jpg' or 'png'. An unreadable
    image raises ValueError naming the file, or with `skip_bad` is skipped and counted in
    `manifest.source['skipped']`.
    """
    _check_shard_size(shard_size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_format not in ("keep", "jpg", "png"):
        raise ValueError(f"image_format must be 'keep', 'jpg' or 'png', got {image_format!r}")
    if resize is not None and resize < 1:
        raise ValueError(f"resize must be a positive shorter-side length, got {resize}")
    listing = list_folder(root)
    n_files = len(listing.files)
    encode = partial(_encode_one, channels=channels, resize=resize, image_format=image_format, quality=quality)
    skipped: list[str] = []
    exts: set[str] = set()
    with staged_output(out, overwrite) as tmp:
        w = ShardSetWriter(tmp, shard_size, key_width=_key_width(n_files))
        acc = StatsAccumulator(channels)
        results = _imap(encode, listing.files, _workers(workers), chunksize=16)
        with tqdm(total=n_files, desc="prepare folder", unit="img", disable=not progress) as bar, \
                contextlib.closing(results), contextlib.closing(w):
            for i, res in enumerate(results):
                bar.update(1)
                if isinstance(res, str):
                    if not skip_bad:
                        raise ValueError(f"unreadable image {listing.files[i]}: {res} (pass --skip-bad to skip it)")
                    skipped.append(str(listing.files[i]))
                    continue
                w.write(res.data, res.ext, listing.labels[i] if listing.labels else None)
                acc.add(res.stats_pixels, size=res.size)
                exts.add(res.ext)
        if w.num_samples == 0:
            raise ValueError(f"no readable images in {root} ({len(skipped)} skipped)")
        m = Manifest(
            num_samples=w.num_samples, shard_size=shard_size, shards=w.shards,
            image=acc.result(exts.pop() if len(exts) == 1 else "mixed"),
            label_names=listing.class_names, num_classes=len(listing.class_names) if listing.class_names else None,
            source={"kind": "folder", "description": f"images from {Path(root).absolute()}",
                    "root": str(Path(root).absolute()), "layout": "classes" if listing.labels else "flat",
                    "resize_shorter_side": resize, "image_format": image_format, "files": n_files,
                    "skipped": len(skipped), "skipped_files": skipped[:100],
                    "ignored_top_level_files": listing.ignored},
            image_field=None, label_field="cls" if listing.labels else None,
            key_width=_key_width(n_files), root=tmp)
        m.save()
    m.root = Path(out).absolute()
    return m


def _imap(fn, items: list, workers: int, chunksize: int) -> Iterator:
    """Ordered map over `items`, in `workers` processes when > 1."""
    if workers <= 1 or len(items) < 2 * chunksize:
        yield from map(fn, items)
        return
    with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None).Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)


# ---------------------------------------------------------------------------------------- synthetic


def _synthetic_shard(j: int, folder: Path, n: int, shard_size: int, size: int, channels: int,
                     num_classes: int, seed: int, key_width: int) -> tuple[int, int, StatsAccumulator]:
    lo, hi = j * shard_size, min(n, (j + 1) * shard_size)
    images, labels = synthetic_images(np.arange(lo, hi), size, channels, num_classes, seed)  # (R, S, S, C)
    acc = StatsAccumulator(channels)
    acc.add(images)
    samples = ((encode_png(img, level=1), "png", int(lab)) for img, lab in zip(images, labels, strict=True))
    count = write_shard(folder / shard_name(j), lo, samples, key_width)
    return j, count, acc


def prepare_synthetic(out: str | os.PathLike, num_samples: int, shard_size: int = DEFAULT_SHARD_SIZE, *,
                      size: int = 8, channels: int = 1, num_classes: int = 10, seed: int = 0,
                      overwrite: bool = False, workers: int | None = None, progress: bool = True) -> Manifest:
    """N deterministic size×size images (PNG), label = index % num_classes; for scale tests.

    Image n is a pure function of (seed, n, size, channels, num_classes). Shards are written in
    parallel by `workers` processes.
    """
    _check_shard_size(shard_size)
    if num_samples < 1 or size < 1 or num_classes < 1 or channels not in (1, 3):
        raise ValueError(f"need num_samples ≥ 1, size ≥ 1, num_classes ≥ 1, channels in (1, 3); got "
                         f"{num_samples}, {size}, {num_classes}, {channels}")
    n_shards = -(-num_samples // shard_size)
    with staged_output(out, overwrite) as tmp:
        task = partial(_synthetic_shard, folder=tmp, n=num_samples, shard_size=shard_size, size=size,
                       channels=channels, num_classes=num_classes, seed=seed, key_width=_key_width(num_samples))
        counts = [0] * n_shards
        acc = StatsAccumulator(channels)
        results = _imap(task, list(range(n_shards)), _workers(workers), chunksize=1)
        with tqdm(total=num_samples, desc="prepare synthetic", unit="img", disable=not progress) as bar, \
                contextlib.closing(results):  # on error: stop the pool before the staging folder goes
            for j, count, part in results:
                counts[j] = count
                acc.merge(part)
                bar.update(count)
        shards = [ShardInfo(shard_name(j), j * shard_size, c) for j, c in enumerate(counts)]
        m = Manifest(
            num_samples=num_samples, shard_size=shard_size, shards=shards, image=acc.result("png"),
            label_names=[str(c) for c in range(num_classes)], num_classes=num_classes,
            source={"kind": "synthetic", "seed": seed, "size": size, "channels": channels,
                    "description": f"synthetic {size}x{size}x{channels} images: per-class 4x4 template "
                                   f"(75%) + per-index hash noise (25%); label = index % {num_classes}"},
            key_width=_key_width(num_samples), root=tmp)
        m.save()
    m.root = Path(out).absolute()
    return m
