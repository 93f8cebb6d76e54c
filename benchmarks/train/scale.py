"""End to end at ImageNet-1k scale: `diet train` on N = 1,281,167 synthetic samples, d = 2048 head on disk.

    diet bench train-scale                          # ≈ 31.5 GB store; needs ≈ 40 GB free disk
    diet bench train-scale --num-samples 100000 --steps 300 --checkpoint-every 100
    python -m benchmarks.train.scale ...            # the same without the CLI

What it does, as a user would:
  1. `diet prepare synthetic` N images (size × size, 1 channel) unless already there (timed);
  2. checks free disk for the store (N × d × 3 × 4 bytes + step stamps and checksums) and refuses
     to start when it is short;
  3. `diet train` with a small CPU backbone (resnet18, small stem) and the s-DIET 3-layer MLP
     projector to d = 2048 (so the head is ImageNet-1k × ResNet-50 sized: 31.5 GB with its AdamW
     moments), batch CE, exact lazy AdamW, `--head.store=disk` at the default memory budget,
     a checkpoint every K steps; it is SIGKILLed once step `--steps` + K/2 is logged (mid-way
     between checkpoints, head rows in flight);
  4. `diet train --train.resume=true` continues from the last checkpoint (step `--steps`) to the end.
Reported: store creation time, steps/s and img/s (median of the logged windows after the first),
head read and write stall time, rows/s and bytes/s through the store, peak RSS of the training
process and of its process tree (bar: ≤ 6 GB), the resume's start-up time and the step it resumed
at. Writes benchmarks/results/train_scale.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchmarks.common import GB, RESULTS, WORK, cli_main, machine_stamp, markdown_table, write_csv, write_report
from benchmarks.train.runs import ensure_synthetic, median, startup_s, train, window_img_per_s


def _store_bytes(n: int, d: int) -> int:
    return n * d * 3 * 4 + n * (8 + 12)  # weight, exp_avg, exp_avg_sq fp32 + step stamps + checksums


def _summary(case: str, r: dict, batch: int) -> dict:
    rows = r["rows"]
    w = window_img_per_s(rows)
    last = rows[-1] if rows else {}
    ips = median(w)
    return {"case": case, "first_step": int(rows[0]["step"]) if rows else None,
            "last_step": int(last.get("step", 0)), "steps_per_s": ips / batch, "img_per_s": ips,
            "read_stall_s": last.get("head/read_stall_s"), "write_stall_s": last.get("head/write_stall_s"),
            "head_rows_per_s": last.get("head/rows_per_s"), "head_MB_per_s": last.get("head/bytes_per_s", 0) / 1e6,
            "peak_rss_main_GB": r["peak_rss_main_GB"], "peak_rss_tree_GB": r["peak_rss_tree_GB"],
            "wall_s": r["wall_s"], "killed": r["killed"], "windows_img_per_s": [round(x, 1) for x in w]}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--num-samples", type=int, default=1_281_167)
    ap.add_argument("--image-size", type=int, default=8)
    ap.add_argument("--dim", type=int, default=2048, help="head width d (projector output)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1000, help="steps before the kill (a checkpoint lands here)")
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1, help="loader workers (data.num_workers)")
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--keep", action="store_true", help="keep the run folder (and its store) afterwards")
    ap.add_argument("--out", default=str(RESULTS))


def run(a: argparse.Namespace) -> int:
    if a.steps % a.checkpoint_every:
        raise ValueError(f"--steps {a.steps} must be a multiple of --checkpoint-every {a.checkpoint_every} "
                         "(the resume starts there)")

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "train_scale-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    need = _store_bytes(a.num_samples, a.dim)
    free = shutil.disk_usage(work).free
    data = work / f"synth-{a.num_samples}-{a.image_size}px"
    if free < need * 1.1 + (0 if (data / "manifest.json").exists() else 5 * GB):
        print(f"free disk at {work}: {free / GB:.1f} GB; the head store needs {need / GB:.1f} GB "
              f"(+10%, + shards): not enough, not starting", file=sys.stderr)
        return 2
    prep_s = ensure_synthetic(data, a.num_samples, a.image_size)
    end = a.steps + a.checkpoint_every
    kill_at = a.steps + a.checkpoint_every // 2
    args = [f"--data.manifest={data}", "--data.eval_train_manifest=", "--data.eval_test_manifest=",
            "--data.prepare_digits=false", f"--data.image_size={a.image_size}", f"--data.num_workers={a.workers}",
            f"--model.backbone={a.backbone}", "--model.projector=mlp", f"--model.projector_out={a.dim}",
            f"--train.batch_size={a.batch_size}", "--train.epochs=1", f"--train.max_steps={end}",
            f"--train.log_every={a.log_every}", f"--train.checkpoint_every={a.checkpoint_every}",
            "--head.loss=batch", "--head.store=disk"]
    load0 = os.getloadavg()[0]
    first = train(run_dir, args, kill_at_step=kill_at)
    if not first["killed"]:
        raise RuntimeError(f"the run ended before step {kill_at} was logged: no kill landed")
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    second = train(run_dir, [*args, "--train.resume=true"])
    resume_startup_s = startup_s(second, a.log_every, a.batch_size)  # head recovery included
    store_path = run_dir / "head.zarr"
    store_GB = sum(f.stat().st_size for f in store_path.rglob("*") if f.is_file()) / GB if store_path.exists() else None
    create_s = startup_s(first, a.log_every, a.batch_size)  # creating the store: N × d weights written
    rows = [_summary("train (SIGKILLed)", first, a.batch_size), _summary("resume", second, a.batch_size)]
    cols = ["case", "first_step", "last_step", "steps_per_s", "img_per_s", "read_stall_s", "write_stall_s",
            "head_rows_per_s", "head_MB_per_s", "peak_rss_main_GB", "peak_rss_tree_GB", "wall_s"]
    table = markdown_table(rows, cols, ["run", "first logged step", "last step", "steps/s", "img/s",
                                        "head read stall s", "head write stall s", "head rows/s", "head MB/s",
                                        "peak RSS GB (train process)", "peak RSS GB (with loader workers)",
                                        "wall s"])
    peak = max(r["peak_rss_tree_GB"] for r in rows)
    resumed_at = rows[1]["first_step"] - a.log_every if rows[1]["first_step"] else None
    ok_resume = resumed_at == a.steps and rows[1]["last_step"] == end and int(latest.rsplit("_", 1)[1]) == a.steps
    body = (f"`diet train` on {a.num_samples:,} synthetic {a.image_size} px images (`diet prepare synthetic`), "
            f"{a.backbone} (small stem) + 3-layer MLP projector to d = {a.dim}, B = {a.batch_size}, batch CE, "
            f"exact lazy AdamW, head + AdamW moments on disk (`--head.store=disk`, default 1 GiB budget, store "
            f"{need / GB:.1f} GB), checkpoint every {a.checkpoint_every} steps, {a.workers} loader worker(s). "
            f"SIGKILLed after step {kill_at} was logged (last checkpoint `{latest}`), then resumed to step {end}."
            f"\n\n{table}\n\n"
            f"**Peak RSS {peak:.2f} GB** (bar ≤ 6 GB: {'PASS' if peak <= 6 else 'MISS'}); "
            f"**resume** from `{latest}` at step {resumed_at}, finished at step {rows[1]['last_step']}: "
            f"{'PASS' if ok_resume else 'MISS'}; resume start-up (process start → first step, incl. head recovery) "
            f"≈ {resume_startup_s:.0f} s; first start-up incl. creating the store ≈ {create_s:.0f} s; "
            f"store on disk {store_GB:.1f} GB; shards prepared in {prep_s:.0f} s (0: already there)."
            f"\n\nWindows (img/s): " + "; ".join(f"{r['case']}: {r['windows_img_per_s']}" for r in rows))
    config = {"num_samples": a.num_samples, "image_size": a.image_size, "dim": a.dim, "backbone": a.backbone,
              "batch_size": a.batch_size, "steps": a.steps, "checkpoint_every": a.checkpoint_every,
              "kill_at_step": kill_at, "end_step": end, "log_every": a.log_every, "workers": a.workers,
              "store_GB_expected": round(need / GB, 2), "free_disk_GB_at_start": round(free / GB, 1),
              "load_average_1m_at_start": round(load0, 2), "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    out = Path(a.out)
    write_csv(out / "train_scale.csv", rows, cols)
    path = write_report("train_scale", "End to end at ImageNet-1k scale: d = 2048 head on disk, SIGKILL and resume",
                        body, machine_stamp(), config, rows, out_dir=out)
    print(path.read_text())
    if not a.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if peak <= 6 and ok_resume else 1


main = cli_main(__doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
