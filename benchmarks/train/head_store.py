"""In training: `diet train` step time with the head on disk (Zarr store) vs in memory, same config.

    diet bench train-head-store                      # N = 1,281,167 synthetic, resnet18, B = 256
    diet bench train-head-store --num-samples 100000 --steps 100
    python -m benchmarks.train.head_store ...        # the same without the CLI

Both cases are real `diet train` runs (batch CE, exact lazy AdamW, no evaluation) on the same
synthetic shards (prepared with `diet prepare synthetic` if missing), with the same seed, backbone,
batch and image size; only `--head.store` differs (`memory`: rows in RAM; `disk`: a Zarr store with
asynchronous gather ahead / scatter behind, default memory budget). Rounds alternate the two cases so
that load drift hits both alike; per run, the median img/s of the --log-every windows after the first
(start-up) is taken, per case the median over rounds. Bar: disk ≤ 5% slower per step.

Peak RSS of the run's process tree is also split at its last logged step: before it (the steps)
and after it (the final checkpoint and the backbone export), and set against the size of the head's
rows (N·(3·d·itemsize + 8) bytes: weight, both moments, step stamps). Bar for the memory head:
peak RSS at the checkpoint ≤ 1.1 × rows (`--stores memory` measures only that case).
Writes benchmarks/results/<--name>.{md,csv,json} (default train_head_store).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchmarks.common import GB, RESULTS, WORK, cli_main, machine_stamp, markdown_table, write_csv, write_report
from benchmarks.train.runs import ensure_synthetic, median, train, window_img_per_s


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--num-samples", type=int, default=1_281_167)
    ap.add_argument("--image-size", type=int, default=8)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="loader workers (data.num_workers)")
    ap.add_argument("--stores", default="memory,disk", help="head stores to run, comma-separated (memory, disk)")
    ap.add_argument("--name", default="train_head_store", help="results file name (without extension)")
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--out", default=str(RESULTS))


def run(a: argparse.Namespace) -> int:
    work = Path(a.work)
    data = work / f"synth-{a.num_samples}-{a.image_size}px"
    prep_s = ensure_synthetic(data, a.num_samples, a.image_size)
    load0 = os.getloadavg()[0]
    common = [f"--data.manifest={data}", "--data.eval_train_manifest=", "--data.eval_test_manifest=",
              "--data.prepare_digits=false", f"--data.image_size={a.image_size}", f"--data.num_workers={a.workers}",
              f"--model.backbone={a.backbone}", f"--train.batch_size={a.batch_size}", "--train.epochs=1",
              f"--train.max_steps={a.steps}", f"--train.log_every={a.log_every}", "--head.loss=batch"]
    stores = [s.strip() for s in a.stores.split(",") if s.strip()]
    if not stores or set(stores) - {"memory", "disk"}:
        raise SystemExit(f"--stores={a.stores!r}: expected a comma-separated subset of memory, disk")
    d = {"resnet18": 512, "resnet34": 512}.get(a.backbone)
    rows_gb = a.num_samples * (3 * d * 4 + 8) / GB if d else float("nan")  # weight, exp_avg, exp_avg_sq fp32 + step
    runs: dict[str, list[dict]] = {s: [] for s in stores}
    for _ in range(a.rounds):
        for store in stores:
            run_dir = work / f"train_head_store-{store}"
            shutil.rmtree(run_dir, ignore_errors=True)
            r = train(run_dir, [*common, f"--head.store={store}"], mark_at_step=a.steps)
            w = window_img_per_s(r["rows"])
            last = r["rows"][-1]
            runs[store].append({"img_per_s": median(w), "windows": [round(x, 1) for x in w], "wall_s": r["wall_s"],
                                "peak_rss_GB": r["peak_rss_tree_GB"],
                                "peak_rss_steps_GB": r["peak_rss_tree_before_mark_GB"],
                                "peak_rss_checkpoint_GB": r["peak_rss_tree_after_mark_GB"],
                                "read_stall_s": last.get("head/read_stall_s", 0.0),
                                "write_stall_s": last.get("head/write_stall_s", 0.0)})
            shutil.rmtree(run_dir, ignore_errors=True)  # the disk case's store: N·d·3·4 bytes
    rows = []
    for store, rs in runs.items():
        rs = sorted(rs, key=lambda x: x["img_per_s"])
        med = rs[len(rs) // 2]
        rows.append({"head": store, "img_per_s": med["img_per_s"], "s_per_step": a.batch_size / med["img_per_s"],
                     "read_stall_s": med["read_stall_s"], "write_stall_s": med["write_stall_s"],
                     "peak_rss_GB": med["peak_rss_GB"], "peak_rss_steps_GB": med["peak_rss_steps_GB"],
                     "peak_rss_checkpoint_GB": med["peak_rss_checkpoint_GB"], "rows_GB": rows_gb,
                     "peak_rss_over_rows": med["peak_rss_GB"] / rows_gb,
                     "checkpoint_extra_over_rows": (med["peak_rss_checkpoint_GB"] - med["peak_rss_steps_GB"]) / rows_gb,
                     "rounds_img_per_s": [round(x["img_per_s"], 1) for x in rs], "windows_img_per_s": med["windows"]})
    base = rows[0]["s_per_step"]
    for r in rows:
        r["step_time_vs_memory"] = r["s_per_step"] / base if stores[0] == "memory" else float("nan")
    cols = ["head", "s_per_step", "img_per_s", "step_time_vs_memory", "read_stall_s", "write_stall_s", "rows_GB",
            "peak_rss_steps_GB", "peak_rss_checkpoint_GB", "peak_rss_GB", "peak_rss_over_rows",
            "checkpoint_extra_over_rows"]
    table = markdown_table(rows, cols, ["head", "s/step", "img/s", "step time vs memory", "read stall s (run)",
                                        "write stall s (run)", "head rows GB", "peak RSS GB steps",
                                        "peak RSS GB final checkpoint", "peak RSS GB (tree)", "peak RSS / rows",
                                        "checkpoint's extra RSS / rows"])
    verdicts = []
    if stores == ["memory", "disk"]:
        slower = rows[1]["step_time_vs_memory"] - 1
        verdicts.append(f"**Disk head vs memory head: {slower * 100:+.1f}% step time** "
                        f"(bar ≤ +5%: {'PASS' if slower <= 0.05 else 'MISS'}).")
    for r in rows:
        if r["head"] == "memory":
            ratio = r["peak_rss_checkpoint_GB"] / rows_gb
            verdicts.append(f"**Memory head at the final checkpoint: peak RSS {ratio:.2f} × rows** (bar ≤ 1.1: "
                            f"{'PASS' if ratio <= 1.1 else 'MISS'}); the checkpoint adds "
                            f"{r['checkpoint_extra_over_rows']:+.2f} × rows over the steps' peak.")
    dim = d or "the backbone's"
    body = (f"`diet train --head.store={{{','.join(stores)}}}` with {a.backbone} (d = {dim}) at "
            f"{a.image_size} px, B = {a.batch_size}, batch CE, exact lazy AdamW, on {a.num_samples:,} synthetic "
            f"samples ({rows_gb:.2f} GB of head rows); {a.steps} steps per run, {a.rounds} round(s) alternating the "
            f"cases, median of {a.log_every}-step windows after the first. Peak RSS of the process tree, split at the "
            f"last logged step: the steps, then the final checkpoint (and the backbone export)."
            f"\n\n{table}\n\n" + "\n\n".join(verdicts) + "\n\n"
            + "img/s of every round: " + "; ".join(f"{r['head']}: {r['rounds_img_per_s']}" for r in rows)
            + "\n\nWindows of the median run: " + "; ".join(f"{r['head']}: {r['windows_img_per_s']}" for r in rows))
    config = {"num_samples": a.num_samples, "image_size": a.image_size, "backbone": a.backbone,
              "batch_size": a.batch_size, "steps": a.steps, "log_every": a.log_every, "rounds": a.rounds,
              "workers": a.workers, "stores": stores, "prepare_s": round(prep_s, 1),
              "load_average_1m_at_start": round(load0, 2), "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    out = Path(a.out)
    write_csv(out / f"{a.name}.csv", rows, cols)
    path = write_report(a.name, "In training: disk head vs memory head step time and peak RSS", body,
                        machine_stamp(), config, rows, out_dir=out)
    print(path.read_text())
    return 0


main = cli_main(__doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
