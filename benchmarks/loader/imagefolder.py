"""ShardLoader vs torchvision ImageFolder + DataLoader on the same JPEGs, 224 px, DIET augmentation.

    diet bench loader-imagefolder                      # 2,000 JPEGs, strengths 2 and 3
    diet bench loader-imagefolder --num-images 5000 --workers 2 --strengths 3
    python -m benchmarks.loader.imagefolder ...        # the same without the CLI

1. Generates N natural-looking JPEGs (300–500 px sides, 1/f² colour noise plus blurred shapes,
   quality 90) into an ImageFolder tree of 10 classes under benchmarks/_work/ (kept for reruns).
2. `diet prepare folder` writes WebDataset shards from it (JPEG bytes copied, not re-encoded).
3. For each augmentation strength, both loaders decode with Pillow and apply the *same* transform
   (`engine.augment.make_train_transform(224, strength, ...)`) with the same batch size and worker
   count; the steady-state images/s of each epoch (after its first 4 batches: worker start-up and
   pipeline fill, timed separately) are measured, interleaved (ours, baseline, ours, ...) so that
   load drift on a shared machine hits both, after one untimed warm-up epoch each; median reported.
   The baseline keeps its workers alive across epochs (`persistent_workers=True`); ShardLoader
   starts its workers every epoch, so its start-up is inside its timing (conservative for ours).
4. CPU cost per image, robust to a shared machine's load: the same two pipelines with
   num_workers=0 (all work in this process, torch on 1 thread), CPU seconds (time.process_time)
   over the first --cpu-images images of an epoch, interleaved, median of --repeats.
5. Two cache states: `warm` (files in the page cache: decode + augment bound, the same CPU work in
   both) and `cold` (this benchmark's own files evicted from the page cache with
   posix_fadvise(DONTNEED) before every timed epoch: 2 sequential tar reads per worker vs one
   random small-file read per image, as on a data set larger than RAM). Nothing else is evicted.

Writes benchmarks/results/loader_vs_imagefolder.{md,csv,json}; ratio = ShardLoader / ImageFolder.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from benchmarks.common import (
    RESULTS,
    ROOT,
    WORK,
    cli_main,
    evict,
    machine_stamp,
    markdown_table,
    write_csv,
    write_report,
)
from diet_engine.engine.augment import make_train_transform
from diet_engine.storage.shards import ShardLoader

SKIP_BATCHES = 4  # worker start-up and pipeline fill, excluded from the steady-state rate
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------- data
def _natural_image(seed: int) -> bytes:
    """A JPEG with natural-image statistics: 1/f² spectrum colour noise plus a few soft shapes."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(300, 501, 2))
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))  # 1/f amplitude → 1/f² power
    mix = rng.normal(size=(3, 3)) * 0.4 + np.eye(3)  # correlated colour channels
    planes = []
    for _ in range(3):
        phase = np.exp(2j * np.pi * rng.random(amp.shape))
        planes.append(np.fft.irfft2(amp * phase, s=(h, w)))
    x = np.tensordot(mix, np.stack(planes), axes=1)  # (3, H, W)
    x = (x - x.mean()) / (x.std() + 1e-8) * 45 + rng.uniform(90, 160, (3, 1, 1))
    img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_one(args: tuple[int, str]) -> int:
    i, path = args
    data = _natural_image(i)
    Path(path).write_bytes(data)
    return len(data)


def make_image_folder(root: Path, n: int, classes: int = 10, workers: int = 2) -> Path:
    """N JPEGs in `classes` class folders (reused when complete)."""
    done = root / ".complete"
    if done.exists() and done.read_text().strip() == str(n):
        return root
    jobs = []
    for i in range(n):
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((i, str(folder / f"img_{i:06d}.jpg")))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_one, jobs, chunksize=32))
    done.write_text(f"{n}\n")
    return root


def prepare_shards(images: Path, out: Path, shard_size: int) -> Path:
    """`diet prepare folder` (the real command line), reused when the manifest exists."""
    if (out / "manifest.json").exists():
        return out
    cmd = [sys.executable, "-m", "diet_engine.launch.cli", "prepare", "folder", str(images), "--out", str(out),
           "--shard-size", str(shard_size), "--overwrite"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


# --------------------------------------------------------------------------- loaders
def _ours(shards: Path, strength: int, batch: int, workers: int):
    t = make_train_transform(224, strength, IMAGENET_MEAN, IMAGENET_STD, channels=3)
    loader = ShardLoader(shards, batch, t, seed=0, num_workers=workers)
    return lambda epoch: loader.epoch(epoch)


def _imagefolder(images: Path, strength: int, batch: int, workers: int):
    t = v2.Compose([v2.PILToTensor(), make_train_transform(224, strength, IMAGENET_MEAN, IMAGENET_STD, channels=3)])
    ds = ImageFolder(str(images), transform=t)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=False,
                    persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    return lambda epoch: iter(dl)


def _epoch_rate(make_iter, epoch: int, cold: list[Path] | None = None, skip: int = SKIP_BATCHES) -> tuple[float, float]:
    """(steady img/s after the first `skip` batches, seconds until batch `skip` arrived)."""
    if cold:
        evict(cold)
    t_start = time.perf_counter()
    t0, n = None, 0
    for k, batch in enumerate(make_iter(epoch)):
        if k == skip:
            t0 = time.perf_counter()
        elif k > skip:
            n += batch[0].shape[0]
    if t0 is None or n == 0:
        raise ValueError(f"an epoch has no more than {skip + 1} batches: use more images or a smaller batch")
    return n / (time.perf_counter() - t0), t0 - t_start


def cpu_cost(images: Path, shards: Path, strength: int, batch: int, n_images: int, repeats: int) -> dict:
    """CPU ms per image of each pipeline in-process (num_workers=0), interleaved, median."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours, base = _ours(shards, strength, batch, 0), _imagefolder(images, strength, batch, 0)
        res: dict[str, list[float]] = {"ours": [], "base": []}
        for e in range(repeats + 1):  # the first round warms up
            for name, make_iter in (("ours", ours), ("base", base)):
                t0, n = time.process_time(), 0
                for b in make_iter(e):
                    n += b[0].shape[0]
                    if n >= n_images:
                        break
                if e:
                    res[name].append(1000 * (time.process_time() - t0) / n)
    finally:
        torch.set_num_threads(threads)
    o, b = statistics.median(res["ours"]), statistics.median(res["base"])
    return {"strength": strength, "shardloader_cpu_ms": o, "imagefolder_cpu_ms": b, "ratio": b / o}


def measure(images: Path, shards: Path, strength: int, batch: int, workers: int, repeats: int, cache: str) -> dict:
    ours, base = _ours(shards, strength, batch, workers), _imagefolder(images, strength, batch, workers)
    _epoch_rate(ours, 0), _epoch_rate(base, 0)  # warm-up: page cache, worker start, imports
    cold_ours = sorted(shards.glob("*.tar")) if cache == "cold" else None
    cold_base = sorted(images.rglob("*.jpg")) if cache == "cold" else None
    r_ours, r_base, s_ours, s_base = [], [], [], []
    for e in range(1, repeats + 1):
        rate, start = _epoch_rate(ours, e, cold_ours)
        r_ours.append(rate), s_ours.append(start)
        rate, start = _epoch_rate(base, e, cold_base)
        r_base.append(rate), s_base.append(start)
    o, b = statistics.median(r_ours), statistics.median(r_base)
    return {"strength": strength, "cache": cache, "workers": workers, "batch": batch, "shardloader_img_s": o,
            "imagefolder_img_s": b, "ratio": o / b, "shardloader_start_s": statistics.median(s_ours),
            "imagefolder_start_s": statistics.median(s_base), "shardloader_runs": [round(v, 1) for v in r_ours],
            "imagefolder_runs": [round(v, 1) for v in r_base]}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--num-images", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=200, help="samples per shard (≥ 2 shards per worker)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--strengths", default="2,3", help="comma-separated DIET augmentation strengths")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per loader")
    ap.add_argument("--cpu-images", type=int, default=640, help="images per CPU-cost measurement")
    ap.add_argument("--cache", default="warm,cold", help="page-cache states to measure: warm, cold or both")
    ap.add_argument("--work", default=str(WORK / "loader_imagefolder"))
    ap.add_argument("--out", default=str(RESULTS))


def run(a: argparse.Namespace) -> int:

    work = Path(a.work)
    t0 = time.perf_counter()
    images = make_image_folder(work / f"images_{a.num_images}", a.num_images)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    shards = prepare_shards(images, work / f"shards_{a.num_images}_{a.shard_size}", a.shard_size)
    prep_s = time.perf_counter() - t0
    folder_mb = sum(p.stat().st_size for p in images.rglob("*.jpg")) / 2**20
    shard_mb = sum(p.stat().st_size for p in shards.glob("*.tar")) / 2**20

    load0 = os.getloadavg()[0]
    rows = [measure(images, shards, int(s), a.batch_size, a.workers, a.repeats, c)
            for s in a.strengths.split(",") for c in a.cache.split(",")]
    cpu_rows = [cpu_cost(images, shards, int(s), a.batch_size, a.cpu_images, a.repeats) for s in a.strengths.split(",")]
    cpu_cols = ["strength", "shardloader_cpu_ms", "imagefolder_cpu_ms", "ratio"]
    cpu_table = markdown_table(cpu_rows, cpu_cols, ["strength", "ShardLoader CPU ms/img", "ImageFolder CPU ms/img",
                                                    "ratio (ImageFolder / ShardLoader)"])
    cols = ["strength", "cache", "workers", "batch", "shardloader_img_s", "imagefolder_img_s", "ratio",
            "shardloader_start_s", "imagefolder_start_s"]
    table = markdown_table(rows, cols, ["strength", "page cache", "workers", "batch", "ShardLoader img/s",
                                        "ImageFolder+DataLoader img/s", "ratio",
                                        f"ShardLoader s to batch {SKIP_BATCHES}",
                                        f"ImageFolder s to batch {SKIP_BATCHES}"])
    body = (f"{a.num_images} JPEGs (300–500 px, {folder_mb:.0f} MB; shards {shard_mb:.0f} MB in "
            f"{-(-a.num_images // a.shard_size)} tars), RandomResizedCrop to 224 + the DIET augmentation of the "
            f"given strength, Pillow decoding in both. Steady-state img/s of an epoch after its first "
            f"{SKIP_BATCHES} batches (worker start-up and pipeline fill; their time is shown separately: "
            "ShardLoader starts its workers every epoch, the baseline keeps them), median of "
            f"{a.repeats} epochs per loader, interleaved, after a warm-up epoch. Bar: ratio ≥ 1.0.\n\n" + table +
            f"\n\nCPU cost per image (num_workers=0, one thread, first {a.cpu_images} images of an epoch, median of "
            f"{a.repeats}; insensitive to other processes' load):\n\n" + cpu_table +
            "\n\nPer-epoch img/s: " + "; ".join(
                f"strength {r['strength']} {r['cache']}: ours {r['shardloader_runs']}, "
                f"ImageFolder {r['imagefolder_runs']}"
                for r in rows) +
            f"\n\nImage generation {gen_s:.0f} s (cached afterwards), `diet prepare folder` {prep_s:.1f} s.")
    config = {"num_images": a.num_images, "shard_size": a.shard_size, "batch_size": a.batch_size,
              "workers": a.workers, "repeats": a.repeats, "image_size": 224, "cache": a.cache,
              "load_average_1m_at_start": round(load0, 2), "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    out = Path(a.out)
    write_csv(out / "loader_vs_imagefolder.csv", [{**r, "measure": "img_per_s"} for r in rows]
              + [{**r, "measure": "cpu_ms_per_img"} for r in cpu_rows], ["measure", *cols, *cpu_cols[1:3]])
    path = write_report("loader_vs_imagefolder", "Loader throughput: ShardLoader vs ImageFolder + DataLoader",
                        body, machine_stamp("cpu"), config, rows, extra={"cpu_rows": cpu_rows}, out_dir=out)
    print(path.read_text())
    return 0


main = cli_main(__doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
