"""What opening a head store costs at ImageNet-1k scale, and what its verification adds.

Opening a store (`ZarrHeadStore.open`, as `diet train --resume` and `diet head export` do) checks
every chunk file's size (one stat each: 5 arrays × N/R chunks), reads the step stamps (8 B/row)
and checksums (12 B/row), and verifies: missing chunk files hold only zero rows by their checksums
(`check_missing_chunks`: nothing to read when no file is missing), and every stamp lies in
[0, last commit] (`_check_steps`: one pass over the (N,) stamps). Reported, cold (page cache
evicted) and warm: the whole open, and each verification step timed on its own in the same run,
with its share of the open. Plus `diet head verify`'s rate (every row read and its crc32c checked)
on the first `--verify-rows` rows, cold.

    diet bench head-open                               # N = 1,281,167, d = 2048 (31.5 GB of disk)
    diet bench head-open --num-rows 100000 --dim 256   # scaled down
    python -m benchmarks.head.open ...                 # the same without the CLI
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    GB,
    RESULTS,
    WORK,
    disk_stamp,
    evict,
    load_average,
    machine_stamp,
    markdown_table,
    write_csv,
    write_report,
)
from diet_engine.storage.head import HeadMeta, ZarrHeadStore
from diet_engine.storage.head.zarr_layout import check_chunk_files, check_missing_chunks


def _store_files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def measure(path: Path, cold: bool, repeats: int) -> dict:
    """Median over `repeats` opens (read-only and read-write) and of each verification step."""
    times: dict[str, list[float]] = {k: [] for k in ("open_r_s", "open_rw_s", "chunk_sizes_s", "missing_chunks_s",
                                                     "step_range_s")}
    files = _store_files(path) if cold else []
    for _ in range(repeats):
        for mode, key in (("r", "open_r_s"), ("r+", "open_rw_s")):
            if cold:
                evict(files)
            t0 = time.perf_counter()
            s = ZarrHeadStore.open(path, mode=mode)
            times[key].append(time.perf_counter() - t0)
            if mode == "r+":
                chunks = np.flatnonzero(s._owned).tolist()
                if cold:
                    evict(files)
                t0 = time.perf_counter()
                missing = check_chunk_files(s.layout, chunks)
                times["chunk_sizes_s"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                check_missing_chunks(s.layout, missing)
                times["missing_chunks_s"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                s._check_steps(s.commits[-1], "opening it")
                times["step_range_s"].append(time.perf_counter() - t0)
            s.close()
    out = {k: float(np.median(v)) for k, v in times.items()}
    out["verification_s"] = out["chunk_sizes_s"] + out["missing_chunks_s"] + out["step_range_s"]
    out["verification_share"] = out["verification_s"] / out["open_rw_s"]
    return out


def verify_rate(path: Path, rows: int) -> dict:
    evict(_store_files(path))
    s = ZarrHeadStore.open(path, mode="r")
    idx = np.arange(min(rows, s.meta.num_rows), dtype=np.int64)
    t0 = time.perf_counter()
    for lo in range(0, idx.size, 65536):
        s.read_rows(idx[lo : lo + 65536])
    dt = time.perf_counter() - t0
    nbytes = idx.size * 3 * s.meta.dim * s.layout.dtype.itemsize
    s.close()
    return {"verify_rows": int(idx.size), "verify_rows_per_s": idx.size / dt, "verify_GBps": nbytes / dt / GB}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-rows", type=int, default=1_281_167)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--chunk-rows", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--verify-rows", type=int, default=100_000)
    p.add_argument("--dir", type=Path, default=WORK / "head_open")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards (and reuse a kept one)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")


def run(args: argparse.Namespace) -> int:
    n, d = args.num_rows, args.dim
    meta = HeadMeta(num_rows=n, dim=d, optimizer={"kind": "adamw"}, chunk_rows=args.chunk_rows)
    path = args.dir / "head.zarr"
    args.dir.mkdir(parents=True, exist_ok=True)
    need = 0 if (path / "zarr.json").exists() else 3 * n * d * 4 + 20 * n
    if need + 2 * GB > shutil.disk_usage(args.dir).free:
        raise SystemExit(f"not enough free disk at {args.dir} for a {need / GB:.1f} GB store; use --num-rows/--dim")
    stamp = {**machine_stamp("cpu"), **disk_stamp(args.dir)}
    load_start = load_average()
    t0 = time.perf_counter()
    if not (path / "zarr.json").exists():
        ZarrHeadStore.create(path, meta, seed=0).close()
    create_s = time.perf_counter() - t0
    print(f"store N={n} d={d} ready ({create_s:.0f} s to create)")
    rows = []
    for cold in (True, False):
        r = {"cache": "cold" if cold else "warm", **measure(path, cold, args.repeats)}
        rows.append(r)
        print(r)
    rate = verify_rate(path, args.verify_rows)
    print(rate)
    cols = ["cache", "open_r_s", "open_rw_s", "chunk_sizes_s", "missing_chunks_s", "step_range_s", "verification_s",
            "verification_share"]
    table = markdown_table(rows, cols, ["page cache", "open read-only (s)", "open read-write (s)",
                                        "chunk file sizes (s)", "missing chunks (s)", "step stamp range (s)",
                                        "verification total (s)", "verification / open"])
    body = (f"Store: N = {n:,}, d = {d}, chunks of {args.chunk_rows} rows ({n // args.chunk_rows + 1} chunks × 5 "
            f"arrays), {3 * n * d * 4 / GB:.1f} GB. Medians of {args.repeats} opens each.\n\n{table}\n\n"
            f"`diet head verify` rate (first {rate['verify_rows']:,} rows, cold): "
            f"{rate['verify_rows_per_s']:,.0f} rows/s, {rate['verify_GBps']:.2f} GB/s of rows read and checked.\n\n"
            f"Load average at start: {load_start}; at end: {load_average()}.\n")
    config = {"num_rows": n, "dim": d, "chunk_rows": args.chunk_rows, "repeats": args.repeats}
    write_csv(args.out / "head_open.csv", rows + [{"cache": "verify", **rate}])
    write_report("head_open", "Head store: cost of opening and verifying it", body, stamp, config, out_dir=args.out)
    print(body)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
