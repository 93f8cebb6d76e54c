"""Dataset shards: prepare, index and loader throughput, and the two hand-written encoders.

Measures, on synthetic 8×8 gray PNG shards (N samples, shards of 1000):
  * encoders   writing a 3-member sample (png, index, cls) with storage/shards/writer.TarShard vs
               webdataset.TarWriter, and encoding an 8×8 PNG with sources.encode_png vs Pillow
               (the measured reason for both hand-written pieces; ratio = library / ours);
  * prepare    `prepare_digits` and `prepare_synthetic(N)` wall time (all cores);
  * index      `index_shards` on the N-sample set;
  * plan       ShardLoader.plan(epoch) for N samples (no I/O);
  * loader     images/s over a fixed number of batches after the first, for num_workers 0/1/2,
               without a transform and with the DIET strength-3 transform at 32×32 (ratio vs
               num_workers=0 of the same transform).

    diet bench loader                 # N = 100,000 (~1–2 min on 2 cores)
    diet bench loader --full          # N = 1,281,167 (ImageNet-1k size; 3.7 GB)
    python -m benchmarks.loader.shards ...   # the same without the CLI

Writes benchmarks/results/loader.{md,csv,json}. The shards go to a temporary folder (or --work).
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from benchmarks.common import RESULTS, machine_stamp, markdown_table, write_csv, write_report
from diet_engine.engine.augment import make_train_transform
from diet_engine.storage.shards import Manifest, ShardLoader, index_shards, prepare_digits, prepare_synthetic
from diet_engine.storage.shards.sources import encode_png
from diet_engine.storage.shards.writer import TarShard


def _median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_encoders(work: Path, n: int = 5000) -> list[dict]:
    imgs = np.random.default_rng(0).integers(0, 256, (n, 8, 8), dtype=np.uint8)
    pngs = [encode_png(x, level=1) for x in imgs]

    def ours_tar():
        tar = TarShard(work / "ours.tar")
        for i, p in enumerate(pngs):
            tar.add_sample(i, p, "png", i % 10, 9)
        tar.close()

    def wds_tar():
        with open(work / "wds.tar", "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as tw:
            for i, p in enumerate(pngs):
                tw.write({"__key__": f"{i:09d}", "png": p, "index": str(i).encode(), "cls": str(i % 10).encode()})

    def ours_png():
        for x in imgs:
            encode_png(x, level=1)

    def pil_png():
        for x in imgs:
            Image.fromarray(x).save(io.BytesIO(), format="PNG", compress_level=1)

    rows = []
    for what, ours, lib, lib_name in (("tar sample (3 members)", ours_tar, wds_tar, "webdataset.TarWriter"),
                                      ("8×8 PNG encode", ours_png, pil_png, "Pillow")):
        t_ours, t_lib = _median_time(ours) / n * 1e6, _median_time(lib) / n * 1e6
        rows.append({"what": what, "ours_us": t_ours, "library": lib_name, "library_us": t_lib,
                     "speedup": t_lib / t_ours})
    return rows


def bench_loader(manifest: Manifest, batch: int, batches: int) -> list[dict]:
    rows = []
    base = {}
    t3 = make_train_transform(32, 3, manifest.mean, manifest.std, channels=3)
    for tname, transform in (("none", None), ("strength 3 @32", t3)):
        for workers in (0, 1, 2):
            loader = ShardLoader(manifest, batch, transform, seed=0, num_workers=workers, cache_mb=0)
            it = loader.epoch(0)
            next(it)  # start-up: worker fork, first shard read
            t0 = time.perf_counter()
            n = sum(len(b[1]) for b in itertools.islice(it, batches))
            ips = n / (time.perf_counter() - t0)
            del it
            base.setdefault(tname, ips)
            rows.append({"transform": tname, "num_workers": workers, "img_per_s": ips,
                         "vs_workers0": ips / base[tname]})
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="N = 1,281,167")
    p.add_argument("--num-samples", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=40, help="timed batches per loader configuration")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")


def run(args: argparse.Namespace) -> int:
    n = 1_281_167 if args.full else args.num_samples
    load_at_start = round(os.getloadavg()[0], 2)  # other processes on the machine skew every number
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_loader-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        enc = bench_encoders(work)
        t0 = time.perf_counter()
        prepare_digits(work / "digits", overwrite=True)
        t_digits = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = prepare_synthetic(work / "synth", n, overwrite=True, progress=False)
        t_synth = time.perf_counter() - t0
        t0 = time.perf_counter()
        index_shards(work / "synth", work / "index.json", overwrite=True, progress=False)
        t_index = time.perf_counter() - t0
        loader = ShardLoader(m, args.batch_size)
        loader.plan(0)
        t_plan = _median_time(lambda: loader._plans.clear() or loader.plan(1))
        rows = bench_loader(m, args.batch_size, args.batches)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    prep = [{"step": "prepare digits (1,797)", "seconds": t_digits, "samples_per_s": 1797 / t_digits},
            {"step": f"prepare synthetic ({n:,})", "seconds": t_synth, "samples_per_s": n / t_synth},
            {"step": f"index ({n:,})", "seconds": t_index, "samples_per_s": n / t_index},
            {"step": f"plan one epoch ({n:,})", "seconds": t_plan, "samples_per_s": n / t_plan}]
    body = "\n\n".join([
        "## Hand-written encoders vs the library (µs per item, median of 3 × 5,000)",
        markdown_table(enc, ["what", "ours_us", "library", "library_us", "speedup"]),
        "## Prepare, index, plan",
        markdown_table(prep, ["step", "seconds", "samples_per_s"]),
        f"## Loader throughput (8×8 PNG shards, batch {args.batch_size}, {args.batches} batches after the first)",
        markdown_table(rows, ["transform", "num_workers", "img_per_s", "vs_workers0"]),
    ])
    config = {"num_samples": n, "shard_size": 1000, "batch_size": args.batch_size, "batches": args.batches,
              "load_average_1m_at_start": load_at_start}
    stamp = machine_stamp("cpu")
    write_csv(args.out / "loader.csv", rows)
    path = write_report("loader", "Dataset shards: prepare, index and loader throughput", body, stamp, config,
                        rows=rows, extra={"encoders": enc, "prepare": prep}, out_dir=args.out)
    print(path.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
