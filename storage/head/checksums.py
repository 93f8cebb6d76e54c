"""Per-row CRC32C checksums of the head's weight / exp_avg / exp_avg_sq bytes.

The store keeps a `checksum` array (N, 3) uint32 beside the data: column k is crc32c of row n of
data array k (its d·itemsize raw little-endian bytes). Cost: google-crc32c (hardware CRC32C) runs
about 1 µs per 8 KiB row from Python including the copy to `bytes` it needs, i.e. ~0.8 ms per
256-row batch of three arrays each way; measured by `diet bench head-gather-scatter`
(benchmarks/head/gather_scatter.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import google_crc32c
import numpy as np

from diet_engine.storage.head.errors import HeadStoreCorruptionError


def row_crcs(arrays: Sequence[np.ndarray], pos: np.ndarray) -> np.ndarray:
    """crc32c of rows `pos` of each (S, d) array -> (len(pos), len(arrays)) uint32."""
    out = np.empty((len(pos), len(arrays)), dtype=np.uint32)
    value = google_crc32c.value
    for k, a in enumerate(arrays):
        col = out[:, k]
        for i, p in enumerate(pos.tolist()):
            col[i] = value(a[p].tobytes())  # tobytes: the C extension accepts only immutable bytes
    return out


def block_crcs(block: np.ndarray) -> np.ndarray:
    """crc32c of every row of one (M, d) array -> (M,) uint32."""
    value = google_crc32c.value
    return np.fromiter((value(r.tobytes()) for r in block), dtype=np.uint32, count=len(block))


def verify_rows(
    stored: np.ndarray,
    computed: np.ndarray,
    rows: np.ndarray,
    names: Sequence[str],
    chunk_rows: int,
    where: str,
) -> None:
    """Raise HeadStoreCorruptionError naming the first mismatching array, chunk and row."""
    bad = np.argwhere(stored != computed)
    if not bad.size:
        return
    i, k = (int(x) for x in bad[0])
    row = int(rows[i])
    chunk = row // chunk_rows
    raise HeadStoreCorruptionError(
        f"head store {where}: checksum mismatch in array {names[k]!r}, chunk {chunk} "
        f"(file {names[k]}/c/{chunk}/0), row {row} (row {row - chunk * chunk_rows} of the chunk): "
        f"stored crc32c {int(stored[i, k]):#010x}, computed {int(computed[i, k]):#010x}; "
        f"{len(bad)} mismatching field(s) in this read. If the process writing the store crashed, "
        "open it read-write and call recover(<last commit>); otherwise the file is corrupt."
    )
