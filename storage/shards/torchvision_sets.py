"""torchvision classification data sets as a shard source: which class, which split, which files.

Design note. The `torchvision.datasets` class reads the files (idx, CIFAR batches, .mat, JPEG
folders, ImageNet archives); nothing here parses a data-set format. What this module adds around it:

- a registry (`SETS`) mapping a uniform `split` ('train', 'test', 'val', ...) and a `variant`
  (EMNIST's split, DTD's partition) onto each class's constructor;
- the files each class expects, so that a missing one is named with its folder before torchvision
  runs, and, when torchvision fails, which file is truncated or corrupt (torchvision's own idx
  reader run per file, or the checksums the class records);
- idx files of the MNIST family found in a flat folder (Debian's `dataset-fashion-mnist`:
  /usr/share/datasets/fashion-mnist/*.gz) or gzipped inside torchvision's layout: they are arranged
  as `<work>/<Class>/raw/` in a temporary folder, uncompressed files as symlinks and .gz files
  decompressed there by torchvision's `extract_archive`, so the user's folder is never written;
- samples in torchvision's index order: torchvision_samples.py.

Safety: CIFAR-10/100 batches are Python pickles, and torchvision's CIFAR classes unpickle them.
That is torchvision reading a local data set the user chose (as `CIFAR10(root)` would in their
own script); this module never unpickles anything itself, and the shards it writes hold none.
"""

from __future__ import annotations

import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torchvision
from torchvision import datasets as tvd
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import check_integrity, extract_archive

# errors torchvision's readers raise on missing, truncated or corrupt files (not TypeError: that is a bug here)
_READ_ERRORS = (RuntimeError, AssertionError, EOFError, ValueError, OSError, pickle.UnpicklingError, IndexError,
                KeyError, zlib.error)

# ---------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TorchvisionSet:
    """One supported data set: its class and how the uniform options map onto its constructor."""

    name: str
    """the `torchvision.datasets` class name."""
    splits: dict[str, dict[str, Any]]
    """split name → constructor keyword arguments."""
    default_splits: tuple[str, ...]
    """splits written when none are asked for."""
    expected: Callable[[type, str, Any], list[str]]
    """(class, split, variant) → paths relative to the root that the class needs; 'a|b': a or b; 'd/': a folder."""
    checksums: Callable[[type, str], list[tuple[str, str]]] = lambda cls, split: []
    """(class, split) → (path relative to root, md5) the class verifies; used to name a corrupt file."""
    variant: tuple[str, tuple, Any] | None = None
    """(constructor keyword, allowed values, default or None when required) for `--variant`."""
    num_classes: int | None = None
    """class count when the class has no `.classes` (label names are then '0', '1', ...)."""
    unlabeled_splits: tuple[str, ...] = ()
    """splits without labels (torchvision gives -1): written without `cls`."""
    download: bool = True
    """whether the class can download (ImageNet cannot)."""
    idx: bool = False
    """MNIST-family idx files: also found in a flat folder, gzipped or not."""
    archives: tuple[str, ...] = ()
    """archives torchvision's download() verifies and extracts, without the network when present."""

    @property
    def cls(self) -> type:
        return getattr(tvd, self.name)


def _idx_names(cls: type, split: str, variant: Any) -> list[str]:
    """The raw idx files torchvision's MNIST-family class checks for (all four: it wants both splits)."""
    if variant is not None:  # EMNIST: per split and variant
        part = "train" if split == "train" else "test"
        return [f"emnist-{variant}-{part}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    return [Path(f).stem for f, _ in cls.resources]


def _idx_expected(cls, split, variant):
    return [f"{cls.__name__}/raw/{n}" for n in _idx_names(cls, split, variant)]


def _cifar_expected(cls, split, variant):
    return [f"{cls.base_folder}/{f}" for f, _ in cls.train_list + cls.test_list + [[cls.meta["filename"], ""]]]


def _cifar_checksums(cls, split):
    files = cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
    return [(f"{cls.base_folder}/{f}", md5) for f, md5 in files]


def _stl10_expected(cls, split, variant):
    return [f"{cls.base_folder}/{f}" for f, _ in cls.train_list + cls.test_list]


def _imagenet_expected(cls, split, variant):
    meta = tvd.imagenet.ARCHIVE_META
    return [f"{tvd.imagenet.META_FILE}|{meta['devkit'][0]}", f"{split}/|{meta[split][0]}"]


_TRAIN_TEST = {"train": {"train": True}, "test": {"train": False}}


def _split_kw(*names: str) -> dict[str, dict[str, Any]]:
    return {n: {"split": n} for n in names}


SETS: dict[str, TorchvisionSet] = {s.name: s for s in [
    TorchvisionSet("MNIST", _TRAIN_TEST, ("train", "test"), _idx_expected, idx=True),
    TorchvisionSet("FashionMNIST", _TRAIN_TEST, ("train", "test"), _idx_expected, idx=True),
    TorchvisionSet("KMNIST", _TRAIN_TEST, ("train", "test"), _idx_expected, idx=True),
    TorchvisionSet("EMNIST", _TRAIN_TEST, ("train", "test"), _idx_expected, idx=True,
                   variant=("split", tvd.EMNIST.splits, None)),
    TorchvisionSet("CIFAR10", _TRAIN_TEST, ("train", "test"), _cifar_expected, _cifar_checksums,
                   archives=(tvd.CIFAR10.filename,)),
    TorchvisionSet("CIFAR100", _TRAIN_TEST, ("train", "test"), _cifar_expected, _cifar_checksums,
                   archives=(tvd.CIFAR100.filename,)),
    TorchvisionSet("SVHN", _split_kw("train", "test", "extra"), ("train", "test"),
                   lambda cls, split, v: [cls.split_list[split][1]],
                   lambda cls, split: [tuple(cls.split_list[split][1:3])], num_classes=10),
    TorchvisionSet("STL10", _split_kw("train", "test", "unlabeled"), ("train", "test"), _stl10_expected,
                   lambda cls, split: [(f"{cls.base_folder}/{f}", m) for f, m in cls.train_list + cls.test_list],
                   unlabeled_splits=("unlabeled",), archives=(tvd.STL10.filename,)),
    TorchvisionSet("Food101", _split_kw("train", "test"), ("train", "test"),
                   lambda cls, split, v: [f"food-101/meta/{split}.json", "food-101/images/"]),
    TorchvisionSet("Flowers102", _split_kw("train", "val", "test"), ("train", "val", "test"),
                   lambda cls, split, v: ["flowers-102/jpg/"] + [f"flowers-102/{cls._file_dict[k][0]}"
                                                                        for k in ("label", "setid")],
                   lambda cls, split: [(f"flowers-102/{f}", m) for k, (f, m) in cls._file_dict.items()
                                       if k != "image"], num_classes=102),
    TorchvisionSet("DTD", _split_kw("train", "val", "test"), ("train", "val", "test"),
                   lambda cls, split, v: [f"dtd/dtd/labels/{split}{v}.txt", "dtd/dtd/images/"],
                   variant=("partition", tuple(range(1, 11)), 1)),
    TorchvisionSet("OxfordIIITPet", _split_kw("trainval", "test"), ("trainval", "test"),
                   lambda cls, split, v: [f"oxford-iiit-pet/annotations/{split}.txt", "oxford-iiit-pet/images/"]),
    TorchvisionSet("ImageNet", _split_kw("train", "val"), ("train", "val"), _imagenet_expected, download=False),
]}


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def find_set(name: str) -> TorchvisionSet:
    """The registry entry for `name`, case-, '-' and '_'-insensitive ('fashion-mnist', 'cifar10')."""
    by_norm = {_norm(k): v for k, v in SETS.items()}
    if _norm(name) not in by_norm:
        raise ValueError(f"unknown torchvision data set {name!r}; supported: {', '.join(SETS)}")
    return by_norm[_norm(name)]


def check_options(tv: TorchvisionSet, splits: list[str] | None, variant: Any) -> tuple[list[str], Any]:
    """Validated (splits, variant): unknown splits and variants name the allowed values."""
    splits = list(dict.fromkeys(splits)) if splits else list(tv.default_splits)
    bad = [s for s in splits if s not in tv.splits]
    if bad:
        raise ValueError(f"{tv.name} has no split {bad[0]!r}; its splits: {', '.join(tv.splits)}")
    if tv.variant is None:
        if variant is not None:
            raise ValueError(f"{tv.name} takes no --variant (EMNIST and DTD do), got {variant!r}")
        return splits, None
    key, allowed, default = tv.variant
    if variant is None:
        variant = default
        if variant is None:
            raise ValueError(f"{tv.name} needs --variant, its {key!r}: one of {', '.join(map(str, allowed))}")
    as_type = type(allowed[0])(variant) if isinstance(allowed[0], int) and str(variant).isdigit() else variant
    if as_type not in allowed:
        raise ValueError(f"{tv.name} --variant ({key}) must be one of {', '.join(map(str, allowed))}, got {variant!r}")
    return splits, as_type


# ---------------------------------------------------------------------------------------- files


@dataclass
class Located:
    """Where a split's files are: the root to hand torchvision and, for idx files, where each one is."""

    root: Path
    idx_files: dict[str, Path] = field(default_factory=dict)  # raw name → the user's file (maybe .gz)
    layout: str = "torchvision"  # or 'flat folder' / 'torchvision (gzipped)' / 'download'


def locate(tv: TorchvisionSet, cls: type, root: Path, split: str, variant: Any, download: bool) -> Located:
    """Find the files `cls` needs for `split` under `root`; FileNotFoundError naming the missing ones."""
    root = Path(root).absolute()
    if tv.idx:
        return _locate_idx(tv, cls, root, split, variant, download)
    if download:
        return Located(root, layout="download")
    missing = []
    for rel in tv.expected(cls, split, variant):
        alternatives = rel.split("|")
        if not any((root / a).is_dir() if a.endswith("/") else (root / a).is_file() for a in alternatives):
            missing.append(" or ".join(alternatives))
    if missing:
        hint = ("; torchvision cannot download it: place the archives there" if not tv.download else
                "; pass --download to let torchvision fetch them (needs internet)")
        present = [a for a in tv.archives if (root / a).is_file()]
        if present and tv.download:
            hint = (f"; {present[0]} is there: pass --download and torchvision verifies its checksum and "
                    "extracts it (no network needed)")
        raise FileNotFoundError(f"{tv.name} ({split}) expects under {root}: {', '.join(missing)}{hint}")
    return Located(root)


def _locate_idx(tv, cls, root, split, variant, download) -> Located:
    raw = root / cls.__name__ / "raw"
    names = _idx_names(cls, split, variant)
    if all((raw / n).is_file() for n in names):
        return Located(root)  # torchvision's own layout, uncompressed: it reads the folder directly
    found: dict[str, Path] = {}
    for n in names:
        for folder in (raw, root, root / "gzip"):  # 'gzip/': the folder inside EMNIST's gzip.zip
            hit = next((folder / f for f in (n, n + ".gz") if (folder / f).is_file()), None)
            if hit is not None:
                found[n] = hit
                break
    if len(found) == len(names):
        flat = any(p.parent != raw for p in found.values())
        return Located(root, found, "flat folder" if flat else "torchvision (gzipped)")
    if download:
        return Located(root, layout="download")
    missing = [f"{n}[.gz]" for n in names if n not in found]
    which = f"{tv.name} ({split})" if tv.variant else tv.name  # (non-EMNIST: torchvision wants both splits' files)
    raise FileNotFoundError(
        f"{which} expects {', '.join(missing)} in {raw} (torchvision's layout) or in {root} (a flat "
        "folder, such as Debian's /usr/share/datasets/fashion-mnist/); pass --download to let torchvision fetch "
        "them (needs internet)")


def arrange_idx(located: Located, cls: type, work: Path) -> Path:
    """`work/<Class>/raw/` holding the idx files: symlinks to uncompressed ones, .gz decompressed there by
    torchvision's extract_archive. Returns the root to hand the class. Cost: one decompression
    (~0.2 s for Fashion-MNIST's 30 MB) and the uncompressed bytes on `work`'s disk (55 MB)."""
    raw = work / cls.__name__ / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in located.idx_files.items():
        if (raw / name).exists():  # arranged for an earlier split
            continue
        if src.suffix != ".gz":
            (raw / name).symlink_to(src.resolve())
            continue
        try:
            extract_archive(str(src), str(raw))
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{src}: cannot decompress ({type(e).__name__}: {e}); the file is truncated or "
                             "not gzip") from e
    return work


def diagnose(tv: TorchvisionSet, cls: type, located: Located, tv_root: Path, split: str, variant: Any) -> str:
    """After torchvision failed: which file is truncated or corrupt, as far as can be told."""
    if tv.idx:
        raw = Path(tv_root) / cls.__name__ / "raw"
        for n in _idx_names(cls, split, variant):
            reader = read_label_file if "labels" in n else read_image_file
            try:
                reader(str(raw / n))
            except _READ_ERRORS as e:
                where = located.idx_files.get(n, raw / n)
                why = str(e) or "its header and size disagree"
                return f"{where} is not a complete idx file ({type(e).__name__}: {why}): truncated?"
        return ""
    bad = []
    for rel, md5 in tv.checksums(cls, split):
        p = Path(tv_root) / rel
        if p.is_file() and not check_integrity(str(p), md5):
            bad.append(f"{p} ({p.stat().st_size:,} bytes)")
    return f"files whose checksum differs from torchvision's record (truncated?): {', '.join(bad)}" if bad else ""


def open_split(tv: TorchvisionSet, cls: type, located: Located, tv_root: Path, split: str, variant: Any,
               download: bool) -> Any:
    """Construct the torchvision data set; a failure raises ValueError naming the class, folder and bad file."""
    kwargs = dict(tv.splits[split])
    if tv.variant is not None:
        kwargs[tv.variant[0]] = variant
    if tv.download:
        kwargs["download"] = download
    try:
        return cls(str(tv_root), **kwargs)
    except _READ_ERRORS as e:
        why = diagnose(tv, cls, located, tv_root, split, variant) or f"{type(e).__name__}: {e}"
        raise ValueError(f"torchvision.datasets.{cls.__name__}({_kw_repr(kwargs)}) could not read "
                         f"{located.root}: {why}") from e


def _kw_repr(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def source_record(tv: TorchvisionSet, cls: type, located: Located, split: str, variant: Any,
                  reader: str) -> dict[str, Any]:
    """The manifest's `source`: data set, split, torchvision version, where the files came from."""
    kwargs = dict(tv.splits[split])
    if tv.variant is not None:
        kwargs[tv.variant[0]] = variant
    files = {n: str(p) for n, p in located.idx_files.items()} or None
    return {"kind": "torchvision", "dataset": tv.name, "class": f"torchvision.datasets.{cls.__name__}",
            "split": split, "variant": variant, "constructor": kwargs,
            "torchvision_version": torchvision.__version__, "root": str(located.root), "layout": located.layout,
            "files": files, "reader": reader,
            "description": f"torchvision.datasets.{cls.__name__}({_kw_repr(kwargs)}) read from {located.root}"}
