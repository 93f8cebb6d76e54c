"""In training: s-DIET step time against supervised training of the same backbone on the same loader.

    diet bench train-method       # ResNet-18, 32 px, B = 256: memory head at N = 50,000, disk head at N = 1,281,167
    python -m benchmarks.train.method --steps 60 --rounds 2   # the same without the CLI

Supervised training is the physical limit of s-DIET's speed: same backbone, loader, augmentation and
batch; s-DIET adds a gather of B head rows (caught up by the exact lazy AdamW), a B×B batch CE and a
scatter. Every case is a real `diet train` run on the same synthetic shards with the same seed; per
configuration the rounds alternate supervised and s-DIET so load drift hits both alike. Per run,
the median img/s of the --log-every windows after the first (start-up); per case, the median over
rounds. Bars: s-DIET / supervised step time ≤ 1.05 with the memory head at N = 50,000,
≤ 1.10 with the disk head at N = 1,281,167. Supervised uses a 1,000-class linear classifier
(ImageNet's), labels from the shards. Data: `--base-samples` synthetic images are written once; a
larger N is a *virtual* manifest over them (benchmarks/memory/harness.py: every shard reads the base
shard, indices positional), so the loader, epoch plan and head see N samples without N images being
written. Writes benchmarks/results/train_method.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from benchmarks.common import RESULTS, WORK, cli_main, machine_stamp, markdown_table, write_csv, write_report
from benchmarks.train.runs import ensure_synthetic, median, train, window_img_per_s

BARS = {"memory": 1.05, "disk": 1.10}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", nargs="+", default=["memory:50000", "disk:1281167"],
                   help="HEAD_STORE:N pairs, each measured against supervised on its own shards")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--base-samples", type=int, default=50000,
                   help="synthetic images written; a larger N is a virtual manifest over them")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="loader workers (data.num_workers)")
    p.add_argument("--num-classes", type=int, default=1000, help="supervised classifier width")
    p.add_argument("--work", default=str(WORK))
    p.add_argument("--out", default=str(RESULTS))


def _one(run: Path, args: list[str]) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    r = train(run, args)
    w = window_img_per_s(r["rows"])
    shutil.rmtree(run, ignore_errors=True)  # a disk head store is N·d·3·4 bytes
    return {"img_per_s": median(w), "windows": [round(x, 1) for x in w], "wall_s": r["wall_s"],
            "peak_rss_GB": r["peak_rss_tree_GB"]}


def _virtual(base: Path, n: int, out: Path) -> Path:
    from benchmarks.memory.harness import virtual_manifest  # noqa: PLC0415
    from diet_engine.storage.shards import Manifest  # noqa: PLC0415

    return virtual_manifest(Manifest.load(base), n, out)


def run(a: argparse.Namespace) -> int:
    work = Path(a.work)
    load0 = os.getloadavg()[0]
    rows, prep = [], {}
    for spec in a.configs:
        store, n = spec.split(":")
        n = int(n)
        base = work / f"synth-{min(n, a.base_samples)}-{a.image_size}px"
        prep[spec] = round(ensure_synthetic(base, min(n, a.base_samples), a.image_size), 1)
        data = base if n <= a.base_samples else _virtual(base, n, work / f"virtual-{n}-{a.image_size}px")
        common = [f"--data.manifest={data}", "--data.eval_train_manifest=", "--data.eval_test_manifest=",
                  "--data.prepare_digits=false", f"--data.image_size={a.image_size}",
                  f"--data.num_workers={a.workers}", f"--model.backbone={a.backbone}",
                  f"--train.batch_size={a.batch_size}", "--train.epochs=1", f"--train.max_steps={a.steps}",
                  f"--train.log_every={a.log_every}"]
        cases = {"supervised": [*common, "--train.method=supervised", f"--train.num_classes={a.num_classes}"],
                 "s-DIET": [*common, "--train.method=diet", "--head.loss=batch", f"--head.store={store}"]}
        got: dict[str, list[dict]] = {k: [] for k in cases}
        for _ in range(a.rounds):
            for name, args in cases.items():
                got[name].append(_one(work / f"train_method-{name}", args))
        meds = {}
        for name, rs in got.items():
            rs = sorted(rs, key=lambda x: x["img_per_s"])
            meds[name] = rs[len(rs) // 2] | {"rounds": [round(x["img_per_s"], 1) for x in rs]}
        sup = a.batch_size / meds["supervised"]["img_per_s"]
        for name, m in meds.items():
            s = a.batch_size / m["img_per_s"]
            rows.append({"config": f"{store} head, N = {n:,}", "method": name, "s_per_step": s,
                         "img_per_s": m["img_per_s"], "step_time_vs_supervised": s / sup,
                         "peak_rss_GB": m["peak_rss_GB"], "rounds_img_per_s": m["rounds"],
                         "bar": BARS.get(store) if name == "s-DIET" else None})
    cols = ["config", "method", "s_per_step", "img_per_s", "step_time_vs_supervised", "peak_rss_GB"]
    table = markdown_table(rows, cols, ["config", "method", "s/step", "img/s", "step time vs supervised",
                                        "peak RSS GB (tree)"])
    verdicts = [f"{r['config']}: s-DIET / supervised = {r['step_time_vs_supervised']:.3f}× (bar ≤ {r['bar']}: "
                f"{'PASS' if r['step_time_vs_supervised'] <= r['bar'] else 'MISS'})"
                for r in rows if r["bar"] is not None]
    body = (f"`diet train` with {a.backbone} at {a.image_size} px, B = {a.batch_size}, {a.steps} steps per run, "
            f"{a.rounds} rounds alternating supervised and s-DIET (batch CE, exact lazy AdamW), median of "
            f"{a.log_every}-step windows after the first.\n\n{table}\n\n" + "\n".join(f"- {v}" for v in verdicts)
            + "\n\nimg/s of every round: " + "; ".join(f"{r['config']} {r['method']}: {r['rounds_img_per_s']}"
                                                      for r in rows))
    config = {k: getattr(a, k) for k in ("configs", "image_size", "backbone", "batch_size", "steps", "log_every",
                                         "rounds", "workers", "num_classes", "base_samples")}
    config |= {"prepare_s": prep, "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
               "load_average_1m_at_start": round(load0, 2), "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    out = Path(a.out)
    write_csv(out / "train_method.csv", rows, cols)
    path = write_report("train_method", "In training: s-DIET vs supervised step time", body, machine_stamp(),
                        config, rows, out_dir=out)
    print(path.read_text())
    return 0


main = cli_main(__doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
