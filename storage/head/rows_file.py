"""A head's rows as one file of a checkpoint folder, written and read block by block.

The in-memory head store checkpoints through this module (`MemoryHeadStore.save_files`): its
(N, d) weight and moments and (N,) step stamps go into `<folder>/<name>.safetensors`, and only a
small record (file name, size, crc32c of each array) goes into the checkpoint's client state.

Format: safetensors (an 8-byte little-endian header length, a JSON header naming each array's
dtype, shape and byte range plus string metadata, then the raw little-endian bytes), so
`safetensors.safe_open` or any reader of the format opens the file. The metadata's `format` is
`FORMAT`; the caller may add its own entries.

Memory: the bytes move straight between the arrays and the file, `os.write` from read-only views
on save and `readinto` into the arrays themselves on load, `block_bytes` at a time, the crc32c
taken over the same views. No copy of the rows is made: the extra memory is the JSON header,
whatever N is. Not np.memmap: a mapping's pages count in the process's RSS while mapped, so
writing or reading an N·d file through one adds up to the file's size to the RSS (the copy this
module avoids), where the page cache that `os.write` fills does not count.

Crash consistency: the file is written under a temp name (`.<name>.safetensors.tmp`), fsynced,
then renamed; the checkpoint protocol (engine/checkpoint.py) renames the folder holding it only
after every rank wrote its file. `read_rows_file` refuses a file whose size, layout or checksums
differ from the record with HeadStoreCorruptionError naming the file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from diet_engine.storage.faults import fault_point
from diet_engine.storage.head.errors import HeadStoreCorruptionError

FORMAT = "diet-head-rows/1"
BLOCK_BYTES = 8 << 20  # bytes per os.write / readinto call and crc32c update
_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _raw(a: np.ndarray, writable: bool) -> np.ndarray:
    """(nbytes,) uint8 view of a C-contiguous array, no copy; read-only unless `writable`
    (google-crc32c takes read-only buffers only)."""
    if not a.flags.c_contiguous:
        raise ValueError(f"rows file: arrays must be C-contiguous, got strides {a.strides}")
    if a.dtype not in _SAFETENSORS_DTYPES or a.dtype.byteorder == ">" or sys.byteorder != "little":
        raise ValueError(f"rows file: dtype {a.dtype} is not one of {sorted(str(d) for d in _SAFETENSORS_DTYPES)} "
                         "(little-endian)")
    v = a.reshape(-1).view(np.uint8)  # a view: `a` is contiguous
    if not writable:
        v.flags.writeable = False
    return v


def _layout(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Each array's safetensors entry: dtype, shape, [begin, end) in the data section, in order."""
    out, pos = {}, 0
    for name, a in arrays.items():
        out[name] = {"dtype": _SAFETENSORS_DTYPES[a.dtype], "shape": list(a.shape),
                     "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    return out


def _header(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    text = json.dumps({"__metadata__": {**metadata, "format": FORMAT}, **_layout(arrays)}).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data starts 8-byte aligned (trailing spaces: allowed by the format)
    return len(text).to_bytes(8, "little") + text


def _write_all(fd: int, buf) -> None:
    view, done = memoryview(buf), 0
    while done < len(view):
        done += os.write(fd, view[done:])  # a large write may be partial (Linux: ≤ 2 GiB per call)


def _readinto_all(f, buf: np.ndarray, path: Path) -> None:
    view, done = memoryview(buf), 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise HeadStoreCorruptionError(f"{path}: ends early (truncated)")
        done += n


def write_rows_file(folder: str | Path, name: str, arrays: dict[str, np.ndarray],
                    metadata: dict[str, str] | None = None, block_bytes: int = BLOCK_BYTES) -> dict[str, Any]:
    """Write `arrays` (C-contiguous, in this order) to `folder/<name>.safetensors` block by block;
    temp name, fsync, rename. Returns the record `read_rows_file` checks: {"file", "bytes",
    "crc32c": {array: int}, "format"}. Extra memory: the header (no copy of the arrays).

    Test hook: fault point `rows` (storage/faults.py), reached once per file after its first block.
    """
    path = Path(folder) / f"{name}.safetensors"
    tmp = path.with_name(f".{path.name}.tmp")
    header = _header(arrays, metadata or {})
    crcs: dict[str, int] = {}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, header)
        first = True
        for key, a in arrays.items():
            raw, crc = _raw(a, writable=False), 0
            for lo in range(0, raw.size, block_bytes):
                block = raw[lo : lo + block_bytes]  # view into the array
                crc = google_crc32c.extend(crc, block)
                _write_all(fd, block)
                if first:
                    fault_point("rows")  # tests only: the file half written under its temp name
                    first = False
            crcs[key] = int(crc)
        os.fsync(fd)  # durable before the checkpoint folder that names it is renamed into place
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    tmp.replace(path)
    return {"file": path.name, "bytes": len(header) + sum(a.nbytes for a in arrays.values()), "crc32c": crcs,
            "format": FORMAT}


def read_rows_file(folder: str | Path, record: dict[str, Any], into: dict[str, np.ndarray],
                   block_bytes: int = BLOCK_BYTES) -> dict[str, str]:
    """Read the file `record` (a `write_rows_file` result) names in `folder` into the arrays of
    `into` (same names, order, dtypes and shapes as written), in place, block by block; returns the
    file's metadata. Refuses a missing file (FileNotFoundError), a file of another size or layout
    and one whose bytes fail a checksum (HeadStoreCorruptionError, naming the file and array). After
    a checksum error the arrays hold part of the file's bytes. Extra memory: the header."""
    name = str(record.get("file", ""))
    if not name or Path(name).name != name or name in (".", ".."):
        raise HeadStoreCorruptionError(f"rows file record names {name!r}: expected a file name inside {folder}")
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the head's rows file of this checkpoint is missing")
    size, want = path.stat().st_size, int(record["bytes"])
    if size != want:
        raise HeadStoreCorruptionError(f"{path} has {size} bytes, the checkpoint recorded {want}: the file is "
                                       f"{'truncated' if size < want else 'longer than written'}; resume from an "
                                       "earlier checkpoint (or start the run again)")
    with open(path, "rb", buffering=0) as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise HeadStoreCorruptionError(f"{path}: header length {n} is not valid for a {size}-byte safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeadStoreCorruptionError(f"{path}: the header is not valid JSON ({e})") from e
        metadata = header.pop("__metadata__", {}) if isinstance(header, dict) else {}
        if metadata.get("format") != FORMAT:
            raise HeadStoreCorruptionError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
        expected = _layout(into)
        if header != expected:
            raise HeadStoreCorruptionError(f"{path}: its arrays {header} do not match this head's {expected}")
        if 8 + n + sum(a.nbytes for a in into.values()) != size:
            raise HeadStoreCorruptionError(f"{path}: {size} bytes do not hold the header and the arrays it names")
        for key, a in into.items():  # in file order: the layout matched
            raw, crc = _raw(a, writable=True), 0
            for lo in range(0, raw.size, block_bytes):
                block = raw[lo : lo + block_bytes]  # view into the array: read in place
                _readinto_all(f, block, path)
                ro = block.view()
                ro.flags.writeable = False
                crc = google_crc32c.extend(crc, ro)
            stored = int(record["crc32c"][key])
            if crc != stored:
                raise HeadStoreCorruptionError(f"{path}: array {key!r} fails its checksum (crc32c {crc:#010x}, the "
                                               f"checkpoint recorded {stored:#010x}): the file is corrupt; resume from "
                                               "an earlier checkpoint (or start the run again)")
    return metadata


__all__ = ["BLOCK_BYTES", "FORMAT", "read_rows_file", "write_rows_file"]
