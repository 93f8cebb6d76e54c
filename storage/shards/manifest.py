"""`manifest.json`: what a shard set holds and where each global index lives.

A shard set is a folder of WebDataset tars `shard-000000.tar`, ... plus `manifest.json`. Shard i
holds the samples with global indices `first_index[i] .. first_index[i] + num_samples[i] - 1`; the
shards tile 0..N-1 without gaps or overlaps and are listed in index order. The global index is the
row of the DIET head, so the manifest is the contract between the data and the head store.

Example (digits train split, abridged)::

    {"format": "diet-shards", "format_version": 1, "num_samples": 1437, "shard_size": 256,
     "key_width": 9, "index_field": "index", "image_field": "png", "label_field": "cls",
     "shards": [{"file": "shard-000000.tar", "first_index": 0, "num_samples": 256}, ...],
     "image": {"channels": 1, "height": 8, "width": 8, "uniform_size": true,
               "mean": [0.3], "std": [0.4], "stats_samples": 1437, "format": "png"},
     "label_names": ["0", ..., "9"], "num_classes": 10,
     "source": {"kind": "digits", ...}, "split": {"name": "train", ...}}

Mean/std are per channel in [0, 1] units (pixel / 255), i.e. what `Normalize` after
`ToDtype(float32, scale=True)` expects.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "diet-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KEY_WIDTH = 9  # __key__ = f"{index:09d}": no dots, sorts like the index, up to 10^9 samples


def _matches_type(value: Any, hint: Any) -> bool:
    """JSON value against a field annotation: int (not bool), float (int too), bool, str, list[X],
    dict, X | None, Any."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:  # (a list of dataclasses: each element is checked field by field later)
        return isinstance(value, list) and (dataclasses.is_dataclass(args[0])
                                            or all(_matches_type(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, dict) if dataclasses.is_dataclass(hint) else True


def _typed_fields(cls, d: Any, where: Path, what: str) -> dict[str, Any]:
    """The fields of dataclass `cls` found in mapping `d`, each checked against its annotation;
    required fields must be present. Unknown keys are ignored (written by newer versions)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: {what} must be a JSON object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "root":
            continue
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: {what} lacks the required field {f.name!r}")
            continue
        if not _matches_type(d[f.name], hints[f.name]):
            raise ValueError(f"{where}: {what}.{f.name} = {d[f.name]!r:.80} is not of type {hints[f.name]}")
        out[f.name] = d[f.name]
    return out


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def key_of(index: int, width: int = KEY_WIDTH) -> str:
    return f"{index:0{width}d}"


@dataclasses.dataclass
class ShardInfo:
    file: str
    """tar path relative to the manifest's folder (absolute if it lives elsewhere)."""
    first_index: int
    """global index of the shard's first sample."""
    num_samples: int
    """samples in the shard; all shards but the last hold `shard_size` when written by prepare."""


@dataclasses.dataclass
class ImageStats:
    channels: int
    """channels the loader decodes to (1: grayscale, 3: RGB)."""
    height: int
    """typical (median) height in pixels; the exact height when `uniform_size`."""
    width: int
    """typical (median) width in pixels."""
    uniform_size: bool
    """whether every measured image has exactly height × width."""
    mean: list[float]
    """per-channel mean in [0, 1] units."""
    std: list[float]
    """per-channel standard deviation in [0, 1] units."""
    stats_samples: int
    """how many images the statistics were computed on."""
    format: str = "png"
    """stored encoding ('png', 'jpg', or 'mixed')."""


@dataclasses.dataclass
class Manifest:
    num_samples: int
    """N: total samples, indices 0..N-1."""
    shard_size: int
    """R: samples per shard (the largest shard's count for indexed foreign shards)."""
    shards: list[ShardInfo]
    """shards in global-index order."""
    image: ImageStats
    """image geometry and normalisation statistics."""
    label_names: list[str] | None = None
    """class names by label id, if known."""
    num_classes: int | None = None
    """number of classes when the samples carry labels (`cls`), else None."""
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    """where the data came from: {'kind': 'digits'|'folder'|'synthetic'|'index', ...}."""
    split: dict[str, Any] | None = None
    """split description (digits: name, seed, test fraction, source indices)."""
    index_field: str | None = "index"
    """sample member holding the index as decimal text; '__key__' for a numeric key; None: position."""
    image_field: str | None = "png"
    """image member extension; None: the first of png/jpg/jpeg/webp present in each sample."""
    label_field: str | None = "cls"
    """label member (decimal text), or None when unlabelled."""
    key_width: int = KEY_WIDTH
    """digits of the zero-padded `__key__`."""
    format_version: int = FORMAT_VERSION
    root: Path = dataclasses.field(default=Path("."), compare=False, repr=False)
    """folder the manifest lives in (not serialised); shard files resolve against it."""

    # ------------------------------------------------------------------ derived views
    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def mean(self) -> list[float]:
        return list(self.image.mean)

    @property
    def std(self) -> list[float]:
        return list(self.image.std)

    @property
    def channels(self) -> int:
        return self.image.channels

    @property
    def has_labels(self) -> bool:
        return self.label_field is not None and self.num_classes is not None

    def first_indices(self) -> np.ndarray:
        """(S,) int64 global index of each shard's first sample."""
        return np.fromiter((s.first_index for s in self.shards), np.int64, len(self.shards))

    def shard_counts(self) -> np.ndarray:
        """(S,) int64 samples per shard."""
        return np.fromiter((s.num_samples for s in self.shards), np.int64, len(self.shards))

    def shard_paths(self) -> list[Path]:
        return [self.root / s.file for s in self.shards]

    def first_shards(self, k: int) -> Manifest:
        """The manifest of the first `k` shards: samples 0..n-1 of this one (a training subset whose
        indices stay contiguous, so its head has n rows). The image statistics stay the full set's."""
        if not 1 <= k <= self.num_shards:
            raise ValueError(f"{self.root}: cannot take the first {k} of {self.num_shards} shards")
        if k == self.num_shards:
            return self
        shards = self.shards[:k]
        return dataclasses.replace(self, shards=shards, num_samples=sum(s.num_samples for s in shards),
                                   source={**self.source, "first_shards": k}, root=self.root)

    def shard_of(self, index: np.ndarray | int) -> np.ndarray | int:
        """Shard id holding each global index. O(log S) per index."""
        return np.searchsorted(self.first_indices(), index, side="right") - 1

    # ------------------------------------------------------------------ validation / IO
    def validate(self, check_files: bool = True) -> None:
        """Raise ValueError (FileNotFoundError for a missing shard) naming what is wrong."""
        where = self.root / MANIFEST_NAME
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"{where}: format_version {self.format_version} is newer than this code "
                             f"reads ({FORMAT_VERSION})")
        if not self.shards:
            raise ValueError(f"{where}: lists no shards")
        expect = 0
        for s in self.shards:
            if s.first_index != expect or s.num_samples <= 0:
                raise ValueError(f"{where}: shard {s.file} starts at index {s.first_index} with "
                                 f"{s.num_samples} samples; expected a non-empty shard starting at {expect}")
            expect += s.num_samples
        if expect != self.num_samples:
            raise ValueError(f"{where}: shards hold {expect} samples but num_samples is {self.num_samples}")
        if len(self.image.mean) != self.image.channels or len(self.image.std) != self.image.channels:
            raise ValueError(f"{where}: image mean/std need {self.image.channels} values")
        if check_files:
            for p in self.shard_paths():
                if not p.is_file():
                    raise FileNotFoundError(f"{where}: shard file {p} is missing")

    def to_dict(self) -> dict[str, Any]:
        d = {"format": FORMAT}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "root"})
        d["shards"] = [dataclasses.asdict(s) for s in self.shards]
        d["image"] = dataclasses.asdict(self.image)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path | str = ".") -> Manifest:
        """Build from parsed JSON; every field is type-checked (ValueError naming the field)."""
        where = Path(root) / MANIFEST_NAME
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{where}: not a {FORMAT} manifest (format={got!r})")
        kw = _typed_fields(cls, d, where, "manifest")
        shards = kw["shards"]
        kw["shards"] = [ShardInfo(**_typed_fields(ShardInfo, s, where, f"shards[{i}]")) for i, s in enumerate(shards)]
        kw["image"] = ImageStats(**_typed_fields(ImageStats, kw["image"], where, "image"))
        im = kw["image"]
        if not all(np.isfinite(x) for x in im.mean + im.std) or min(im.std, default=1.0) <= 0:
            raise ValueError(f"{where}: image mean {im.mean} / std {im.std} must be finite with std > 0 "
                             "(re-run `diet prepare index` to measure them)")
        return cls(**kw, root=Path(root))

    @classmethod
    def load(cls, path: str | os.PathLike, check_files: bool = True) -> Manifest:
        """Load `path` (a manifest file, or a folder holding manifest.json) and validate it."""
        path = Path(path)
        file = path / MANIFEST_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no shard manifest at {file}; create one with `diet prepare`")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
        m = cls.from_dict(d, root=file.parent.resolve())
        m.validate(check_files=check_files)
        return m

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write atomically (temp file + rename) to `path` (default root/manifest.json)."""
        file = Path(path) if path is not None else self.root / MANIFEST_NAME
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=file.parent)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return file
