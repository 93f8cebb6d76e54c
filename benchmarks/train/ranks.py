"""`diet train` throughput with 1 and 2 ranks on this machine (CPU: gloo; CUDA: nccl), via `diet launch`.

    diet bench train-ranks                         # resnet18 on digits, 16 px
    diet bench train-ranks --backbone resnet50 --image-size 32 --steps 30
    python -m benchmarks.train.ranks ...           # the same without the CLI

Cases, each a real `diet launch --nproc_per_node K train ...` (DeepSpeed launcher, ZeRO-0 unless
--zero-stage, lazy head in RAM, no evaluation):
  * 1 rank,  batch B                  (the baseline; on CPU it gets all cores as threads)
  * 1 rank,  batch B, 1 thread        (CPU: what one rank's process does alone)
  * 2 ranks, batch B/2 each           (same global batch: strong scaling)
  * 2 ranks, batch B each             (same per-rank batch: weak scaling)
  * 2 ranks, batch B/2, global CE     (the all-gather of rows + reduce of row gradients)
On a CPU machine the ranks split the cores (OMP_NUM_THREADS = cores / ranks), so 2 ranks measure the
distributed overhead (gradient all-reduce over gloo, global CE), not a speed-up.

Throughput comes from the run's own metrics (img/s over windows of --log-every steps); the first
window (start-up, allocator warm-up) is dropped and the median of the rest is reported. Writes
benchmarks/results/train_ranks.{md,csv,json}; ratios are against the 1-rank case of the same run.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, WORK, cli_main, machine_stamp, markdown_table, write_csv, write_report


def run_case(work: Path, data: Path, name: str, ranks: int, batch: int, batch_ce: str, threads: int | None,
             a: argparse.Namespace) -> dict:
    run = work / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)  # here, not `train --overwrite`: every rank would delete it
    env_args = ["--env", f"OMP_NUM_THREADS={threads}"] if threads else []
    cmd = [sys.executable, "-m", "diet_engine.launch.cli", "launch", "--nproc_per_node", str(ranks), *env_args,
           "train", "--no-eval",
           f"--data.manifest={data / 'train'}", "--data.eval_test_manifest=",
           "--data.eval_train_manifest=", "--data.prepare_digits=false", f"--data.image_size={a.image_size}",
           f"--model.backbone={a.backbone}", f"--train.batch_size={batch}", "--train.epochs=1000",
           f"--train.max_steps={a.steps}", f"--train.log_every={a.log_every}", f"--train.run_dir={run}",
           "--train.progress=false", f"--train.batch_ce={batch_ce}", f"--train.zero_stage={a.zero_stage}",
           f"--train.precision={a.precision}"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("OMP_NUM_THREADS", None)  # the launcher splits the cores over the ranks
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"case {name} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    with (run / "metrics.csv").open() as f:
        windows = [float(r["img_per_s"]) for r in csv.DictReader(f)]
    img_s = statistics.median(windows[1:] if len(windows) > 1 else windows)
    global_batch = batch * ranks
    return {"case": name, "ranks": ranks, "threads_per_rank": threads or max(1, (os.cpu_count() or 1) // ranks),
            "batch_per_rank": batch, "global_batch": global_batch,
            "batch_ce": batch_ce, "img_per_s": img_s, "steps_per_s": img_s / global_batch,
            "windows_img_per_s": [round(w, 1) for w in windows], "wall_s": round(wall, 1)}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64, help="B: the 1-rank batch")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all cases; the median round is reported")
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--work", default=str(WORK / "train_ranks"))
    ap.add_argument("--out", default=str(RESULTS))


def run(a: argparse.Namespace) -> int:
    if a.batch_size % 2:
        raise ValueError(f"--batch-size {a.batch_size}: must be even (2 ranks get half each)")

    from diet_engine.storage.shards import prepare_digits  # noqa: PLC0415

    work = Path(a.work)
    data = work / "digits"
    if not (data / "train" / "manifest.json").exists():
        prepare_digits(data, overwrite=True)
    load0 = os.getloadavg()[0]
    b = a.batch_size
    cases = [("1 rank", 1, b, "local", None), ("1 rank, 1 thread", 1, b, "local", 1),
             ("2 ranks, same global batch", 2, b // 2, "local", None),
             ("2 ranks, same per-rank batch", 2, b, "local", None),
             ("2 ranks, same global batch, global CE", 2, b // 2, "global", None)]
    rows = []
    for _ in range(a.repeats):  # rounds over all cases: load drift hits every case alike
        for i, (name, r, bb, ce, th) in enumerate(cases):
            rows.append(run_case(work, data, f"{i}", r, bb, ce, th, a) | {"case": name})
    rows = _median_rows(rows, [c[0] for c in cases])
    base = rows[0]
    for r in rows:
        r["img_per_s_vs_1rank"] = r["img_per_s"] / base["img_per_s"]
        r["steps_per_s_vs_1rank"] = r["steps_per_s"] / base["steps_per_s"]
    cols = ["case", "ranks", "threads_per_rank", "batch_per_rank", "global_batch", "batch_ce", "steps_per_s",
            "img_per_s", "steps_per_s_vs_1rank", "img_per_s_vs_1rank"]
    table = markdown_table(rows, cols, ["case", "ranks", "threads/rank", "B/rank", "global B", "batch CE", "steps/s",
                                        "img/s", "steps/s vs 1 rank", "img/s vs 1 rank"], align="lrrrrlrrrr")
    cpu = os.cpu_count() or 1
    body = (f"`diet launch --nproc_per_node K train` with {a.backbone} at {a.image_size} px on the digits shards, "
            f"{a.steps} steps, ZeRO-{a.zero_stage}, {a.precision}, lazy head in RAM. Median img/s of the "
            f"{a.log_every}-step windows after the first.\n\n{table}\n\n"
            + ("This machine has no GPU: every rank is a CPU process and the ranks share "
               f"{cpu} cores (OMP_NUM_THREADS = {cpu} / ranks), so the 2-rank rows show the cost of data "
               "parallelism (gloo all-reduce of the backbone gradients every step, and for global CE the "
               "row all-gather + gradient reduce), not a speed-up.\n\n" if not _cuda() else "")
            + "Per-window img/s of the reported run: "
            + "; ".join(f"{r['case']}: {r['windows_img_per_s']}" for r in rows)
            + "\n\nimg/s of every round: " + "; ".join(f"{r['case']}: {r['runs_img_per_s']}" for r in rows))
    config = {"backbone": a.backbone, "image_size": a.image_size, "batch_size_1rank": b, "steps": a.steps,
              "log_every": a.log_every, "repeats": a.repeats, "zero_stage": a.zero_stage, "precision": a.precision,
              "load_average_1m_at_start": round(load0, 2), "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    out = Path(a.out)
    write_csv(out / "train_ranks.csv", rows, cols)
    path = write_report("train_ranks", "`diet train` steps/s with 1 and 2 ranks", body, machine_stamp(), config,
                        rows, out_dir=out)
    print(path.read_text())
    return 0


def _median_rows(rows: list[dict], names: list[str]) -> list[dict]:
    """Per case, the run with the median img/s (all runs' img/s kept in `runs_img_per_s`)."""
    out = []
    for name in names:
        runs = sorted((r for r in rows if r["case"] == name), key=lambda r: r["img_per_s"])
        med = dict(runs[len(runs) // 2])
        med["runs_img_per_s"] = [round(r["img_per_s"], 1) for r in runs]
        out.append(med)
    return out


def _cuda() -> bool:
    import torch  # noqa: PLC0415 - the launched ranks import it; this process only asks

    return torch.cuda.is_available()


main = cli_main(__doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
