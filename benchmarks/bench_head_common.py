"""Helpers of the head-store benchmarks: the disk stamp and a raw sequential-bandwidth probe."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

WORK = Path(__file__).resolve().parent / "_work"  # git-ignored scratch space


def disk_stamp(path: str | Path) -> dict[str, Any]:
    """Mount, file system, block device, rotational flag, size and free space of `path`'s disk."""
    path = os.path.abspath(path)
    best = ("", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fs = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                best = (mnt, dev, fs)
    mnt, dev, fs = best
    usage = shutil.disk_usage(mnt or path)
    out: dict[str, Any] = {"disk_mount": mnt, "disk_device": dev, "disk_fs": fs,
                           "disk_size_gb": round(usage.total / 1e9, 1), "disk_free_gb": round(usage.free / 1e9, 1)}
    block = Path("/sys/class/block") / Path(dev).name
    for key, rel in (("disk_rotational", "queue/rotational"), ("disk_model", "device/model"),
                     ("disk_read_ahead_kb", "queue/read_ahead_kb")):
        for base in (block, block.parent / block.name.rstrip("0123456789")):
            try:
                out[key] = (base / rel).read_text().strip()
                break
            except OSError:
                continue
    return out


def evict(paths: list[str | Path]) -> None:
    """Write back and drop `paths` (files, or folders searched recursively) from the page cache.

    posix_fadvise(DONTNEED) after fdatasync: targeted and unprivileged (no global drop_caches on a
    shared machine). Reads afterwards come from the disk."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else files.append(p)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_average() -> str:
    """1/5/15-minute load averages: other processes competing for the CPUs during the run."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def raw_sequential_bandwidth(folder: Path, gib: float = 4.0, block_mib: int = 16) -> dict[str, float]:
    """dd-like: write `gib` GiB sequentially + fdatasync, evict it from the page cache, read it back.

    Returns write and read bandwidth in bytes/s (buffered I/O, like the store's)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "raw_bandwidth.bin"
    block = np.random.default_rng(0).integers(0, 255, block_mib << 20, dtype=np.uint8).tobytes()
    n = int(gib * 1024 / block_mib)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, block)
        os.fdatasync(fd)
        t_w = time.perf_counter() - t0
        os.close(fd)
        evict([path])
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(block_mib << 20)
        t0 = time.perf_counter()
        while os.readv(fd, [buf]):
            pass
        t_r = time.perf_counter() - t0
        os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    size = n * (block_mib << 20)
    return {"raw_write_Bps": size / t_w, "raw_read_Bps": size / t_r, "raw_bytes": size}
