"""`diet prepare`: write shard sets (tars + manifest.json) from digits, a folder, a generator, or a
torchvision data set.

Every entry point builds its output in a staging folder beside `out` and renames it into place at
the end (staging.py), so a failure or Ctrl-C leaves nothing half-written; the manifest is written
last, inside the staging folder.

Costs, measured on 2 cores shared with other jobs (load average 5–12): digits 1.3–2 s, most of
it importing scikit-learn; synthetic 8×8 gray ~30 µs (PNG) + ~35 µs (tar) per sample per core,
N = 1,281,167 in 93 s with 2 workers (3.7 GB: a tar member costs ≥ 1 KB); folder: one decode
(+ re-encode) per file in `workers` processes, tars written by the main process in index order;
torchvision: Fashion-MNIST's 70,000 28×28 images in 11 s (+5 s of imports; load average 6), one
process: zlib in the PNG encoder ~50 µs per image, tar ~40 µs, torchvision's read of the four idx
files ~0.5 s; image-file data sets decode in `workers` processes as `folder` does.
See benchmarks/loader/shards.py (`diet bench loader`).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import tempfile
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
from diet_engine.storage.shards.staging import check_output, staged_output
from diet_engine.storage.shards.stats import StatsAccumulator
from diet_engine.storage.shards.torchvision_samples import SplitReader, reader_for
from diet_engine.storage.shards.torchvision_sets import (
    arrange_idx,
    check_options,
    find_set,
    locate,
    open_split,
    source_record,
)
from diet_engine.storage.shards.writer import ShardSetWriter, write_shard

DIGITS_SHARD_SIZE = 256
DEFAULT_SHARD_SIZE = 1000  # Fashion-MNIST train: 60 shards; a head chunk of 1000 rows × d=512 fp32 is 2 MB


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


# ---------------------------------------------------------------------------------------- torchvision


def prepare_torchvision(name: str, root: str | os.PathLike, out: str | os.PathLike, splits: list[str] | None = None,
                        *, variant: str | int | None = None, download: bool = False,
                        shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False, workers: int | None = None,
                        progress: bool = True, dataset_class: type | None = None) -> dict[str, Manifest]:
    """Shards of a torchvision classification data set read by its own `torchvision.datasets` class,
    one shard set per split: `out/<split>/`, sample n = `dataset[n]` (image and label), label names
    from `.classes`. Returns {split: Manifest}.

    `name` is a registry entry (torchvision_sets.SETS: FashionMNIST, CIFAR10, ...); `splits`
    default to its train and test splits (train/val/test where it has a val split, ImageNet's
    train/val); `variant` is EMNIST's split or DTD's partition; `download` passes through to the
    class. Missing files raise FileNotFoundError naming them and the folder, unreadable ones
    ValueError naming the file where torchvision's readers or checksums tell which. `dataset_class`
    replaces the registry's class (a subclass, e.g. one recording the checksums of test files).
    CIFAR batches are pickles that torchvision unpickles: prepare only files you trust.
    """
    _check_shard_size(shard_size)
    tv = find_set(name)
    cls = dataset_class or tv.cls
    splits, variant = check_options(tv, splits, variant)
    if download and not tv.download:
        raise ValueError(f"torchvision cannot download {tv.name}; place its archives in --root and run without "
                         "--download")
    root = Path(root).absolute()
    if not download and not root.is_dir():
        raise FileNotFoundError(f"data set folder {root} does not exist")
    check_output(Path(out).absolute(), overwrite)  # before reading anything
    located = {sp: locate(tv, cls, root, sp, variant, download) for sp in splits}
    manifests = {}
    with staged_output(out, overwrite) as tmp, tempfile.TemporaryDirectory(prefix=".torchvision-", dir=tmp) as work:
        for sp in splits:  # (the layout in `work` goes before the rename: the with exits in reverse order)
            loc = located[sp]
            tv_root = arrange_idx(loc, cls, Path(work)) if loc.idx_files else loc.root
            ds = open_split(tv, cls, loc, tv_root, sp, variant, download)
            reader = reader_for(tv, ds, sp)
            folder = tmp / sp
            folder.mkdir()
            w, acc, exts = _write_reader(reader, folder, shard_size, _workers(workers),
                                         f"{tv.name} {sp}" if progress else None)
            labelled = reader.labels is not None
            ext = exts.pop() if len(exts) == 1 else None
            m = Manifest(
                num_samples=w.num_samples, shard_size=shard_size, shards=w.shards, image=acc.result(ext or "mixed"),
                label_names=reader.label_names if labelled else None,
                num_classes=len(reader.label_names) if labelled else None,
                source=source_record(tv, cls, loc, sp, variant, reader.how),
                split={"name": sp, "of": f"torchvision.datasets.{cls.__name__}", "num_samples": w.num_samples},
                image_field=ext, label_field="cls" if labelled else None,
                key_width=_key_width(w.num_samples), root=folder)
            m.save()
            manifests[sp] = m
            del ds, reader  # (MNIST-size arrays: tens of MB per split)
    for sp, m in manifests.items():
        m.root = Path(out).absolute() / sp
    return manifests


def _write_reader(reader: SplitReader, folder: Path, shard_size: int, workers: int,
                  desc: str | None) -> tuple[ShardSetWriter, StatsAccumulator, set[str]]:
    """Every sample of `reader` into shards in `folder`, in index order; image files decoded in `workers`."""
    n = len(reader)
    w = ShardSetWriter(folder, shard_size, key_width=_key_width(n))
    acc = StatsAccumulator(reader.channels)
    exts: set[str] = set()
    samples = reader.samples(lambda fn, items: _imap(fn, items, workers, chunksize=16))
    with tqdm(total=n, desc=desc, unit="img", disable=desc is None) as bar, contextlib.closing(samples), \
            contextlib.closing(w):
        for s in samples:
            w.write(s.data, s.ext, s.label)
            acc.add(s.stats_pixels, size=s.size)
            exts.add(s.ext)
            bar.update(1)
    if w.num_samples != n:
        raise ValueError(f"{folder.name}: wrote {w.num_samples} samples of the data set's {n}")
    return w, acc, exts
