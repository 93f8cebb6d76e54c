"""One sample on disk, and reading a shard's samples without ever unpickling.

A sample is a group of tar members sharing the `__key__` prefix (WebDataset convention)::

    000001234.png     image bytes (or .jpg)
    000001234.index   global index as decimal text: b"1234"
    000001234.cls     label as decimal text (only when labels are known)

Reading goes through WebDataset's low-level tar iterators, which return raw bytes per member and
decode nothing. Only the image (PNG/JPEG/WebP, through Pillow, restricted to those three formats) and the decimal-text
fields are ever interpreted; members such as `.pyd`/`.pickle`/`.pth` are never touched.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from webdataset import tariterators

from diet_engine.storage.shards.image_modes import to_8bit

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
INDEX_FIELDS = ("index", "idx", "idx.txt", "index.txt")  # decimal text; first match wins
LABEL_FIELD = "cls"
_PIL_FORMATS = ("PNG", "JPEG", "WEBP")  # the only decoders ever run on shard bytes
_NUMERIC_KEY = re.compile(r"(?:.*/)?(\d+)$")


class ShardReadError(ValueError):
    """A shard or one of its samples could not be read; the message names the file and key."""


def iter_samples(path: str | Path) -> Iterator[dict[str, bytes | str]]:
    """Samples of one tar in stored order: {'__key__': str, ext: raw bytes, ...}.

    Cost: one sequential read of the file; ~25 µs of Python per tar member.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            members = tariterators.tar_file_expander([{"url": path, "stream": f}], eof_value=None)
            for sample in tariterators.group_by_keys(members):
                sample.pop("__url__", None)
                yield sample
    except ShardReadError:
        raise
    except (OSError, ValueError, EOFError, tarfile.TarError) as e:
        raise ShardReadError(f"cannot read shard {path}: {e}") from e


def check_complete(path: str | Path) -> None:
    """Raise ShardReadError unless the tar ends with its end-of-archive block.

    A tar cut at a member boundary (a copy that stopped, a full disk) reads as a shorter, valid
    archive: Python's tarfile ends silently at the missing header. A complete archive has a zero
    block where its members end. Cost: one 512-byte header read per member (data is seeked over).
    """
    try:
        with tarfile.open(str(path), "r:") as t:
            for _ in t:
                pass
            end = t.offset  # where the next header would start
        with open(path, "rb") as f:
            f.seek(end)
            block = f.read(tarfile.BLOCKSIZE)
    except (OSError, tarfile.TarError) as e:
        raise ShardReadError(f"cannot read shard {path}: {e}") from e
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise ShardReadError(f"shard {path} is truncated: its members end at byte {end} without the tar "
                             "end-of-archive block (an interrupted copy or write?); copy or write it again")


def parse_int(data: bytes | str, what: str, path: str | Path, key: str) -> int:
    try:
        return int(data.decode("ascii") if isinstance(data, bytes) else data)
    except (ValueError, UnicodeDecodeError):
        raise ShardReadError(f"{path}: sample {key!r} has a {what} that is not a decimal integer: "
                             f"{bytes(data)[:40]!r}") from None


def find_index_field(sample: dict) -> str | None:
    return next((f for f in INDEX_FIELDS if f in sample), None)


def sample_index(sample: dict, index_field: str | None, position: int, first_index: int,
                 path: str | Path) -> int:
    """Global index of `sample`, the `position`-th sample of a shard starting at `first_index`."""
    key = sample["__key__"]
    if index_field is None:
        return first_index + position
    if index_field == "__key__":
        m = _NUMERIC_KEY.match(key)
        if m is None:
            raise ShardReadError(f"{path}: sample key {key!r} is not numeric")
        return int(m.group(1))
    if index_field not in sample:
        raise ShardReadError(f"{path}: sample {key!r} has no '.{index_field}' member")
    return parse_int(sample[index_field], "index", path, key)


def find_image_field(sample: dict) -> str | None:
    return next((e for e in IMAGE_EXTS if e in sample), None)


def image_bytes(sample: dict, image_field: str | None, path: str | Path) -> bytes:
    field = image_field if image_field in sample else find_image_field(sample)
    if field is None:
        raise ShardReadError(f"{path}: sample {sample['__key__']!r} has no image member "
                             f"(looked for {', '.join(IMAGE_EXTS)})")
    return sample[field]


def decode(data: bytes, channels: int, path: str | Path = "", key: str = "") -> torch.Tensor:
    """Encoded PNG/JPEG/WebP → (C, H, W) uint8 with C = `channels` (1 gray, 3 RGB), via Pillow
    (torchvision.io's decoders are deprecated as of 0.29). ~10 µs for an 8×8 PNG, ~2–5 ms for an
    ImageNet JPEG."""
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            x = np.array(to_8bit(im, "L" if channels == 1 else "RGB"))  # (H, W) or (H, W, 3), writable copy
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ShardReadError(f"{path}: cannot decode the image of sample {key!r}: {e}") from e
    t = torch.from_numpy(x)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)
