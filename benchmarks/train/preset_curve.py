"""A preset trained for longer: online kNN against wall-clock minutes, and what it reaches by given
times (the real-data issue's "what it reaches at 30 and at 120 minutes").

    diet bench preset-curve --epochs 150 --eval-every 10                # the fashion-mnist preset, ~100 min
    diet bench preset-curve --run-dir runs/long --collect-only          # report a run trained already

Trains `diet train --preset NAME --train.epochs=E --eval.every_epochs=K` (with its end-of-run
evaluation) unless the run folder already holds a finished run with the same options, then writes
benchmarks/results/NAME.{md,json,csv} and NAME.png: the online kNN (the preset's fixed bank and
query subsets) against epochs and against minutes since the run started (the head store's clock,
so online evaluations are counted; the dense head has none: then the training time from the logged
img/s), the kNN reached by each `--marks` minute, and the end-of-run evaluation (full bank, all test
queries) beside the backbone at random init. Minutes are those of this machine under its load at
the time: the report records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.common import RESULTS, WORK, cli_main, machine_stamp, markdown_table, write_csv, write_report
from benchmarks.train.runs import knn_curve, plot_knn_curves, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--eval-every", type=int, default=10, help="online kNN every K epochs")
    p.add_argument("--marks", type=float, nargs="+", default=[30.0, 120.0], help="minutes to report the kNN at")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="more options of the run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--run-dir", default=None, help="the run folder (default: --work/preset_curve-PRESET)")
    p.add_argument("--collect-only", action="store_true", help="train nothing: report the run in --run-dir")
    p.add_argument("--work", default=str(WORK))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None, help="results file stem (default: PRESET_curve with _ for -)")


def at_minutes(points: list[dict], minutes: float) -> dict | None:
    """The last online evaluation at or before `minutes` (None when the first came later)."""
    return next((p for p in reversed(points) if p["minutes"] <= minutes), None)


def run(a: argparse.Namespace) -> int:
    name = a.name or f"{a.preset.replace('-', '_')}_curve"
    run_dir = Path(a.run_dir) if a.run_dir else Path(a.work) / f"preset_curve-{a.preset}"
    args = [f"--preset={a.preset}", f"--train.epochs={a.epochs}", f"--eval.every_epochs={a.eval_every}",
            *[f"--{kv}" for kv in a.set]]
    load0 = os.getloadavg()[0]
    report_path, used = run_dir / "final_report.json", run_dir / "bench_args.json"
    if not a.collect_only and not (report_path.exists() and used.exists() and json.loads(used.read_text()) == args):
        train(run_dir, ["--overwrite", *args], threads=a.threads, evaluate=True, timeout=12 * 3600)
        used.write_text(json.dumps(args) + "\n")
    if not report_path.exists():
        raise SystemExit(f"{run_dir} holds no finished run (final_report.json): train it without --collect-only")
    report = json.loads(report_path.read_text())
    points = knn_curve(run_dir)
    if not points:
        raise SystemExit(f"{run_dir}/metrics.csv has no online kNN (eval.every_epochs was off)")
    ev = report["eval"]
    trained = next(v for k, v in ev.items() if "trained" in k)
    rand = next((v for k, v in ev.items() if "random init" in k), None)
    marks = []
    for m in a.marks:
        p = at_minutes(points, m)
        marks.append({"minutes": m, "knn": p["knn"] if p else None, "epoch": p["epoch"] if p else None,
                      "at_minutes": p["minutes"] if p else None})
    table = markdown_table([{**p, "knn": f"{100 * p['knn']:.2f}%"} for p in points], ["epoch", "minutes", "knn"],
                           ["epoch", "minutes since start", "online kNN"])
    total_min = report["wall_time_s"]["train"] / 60
    lines = [f"- by {m['minutes']:.0f} min: " + (f"{100 * m['knn']:.2f}% (epoch {m['epoch']:.0f}, at "
                                                  f"{m['at_minutes']:.1f} min)" if m["knn"] is not None else "—")
             + ("" if m["minutes"] <= total_min + 1e-9 else f" (the run trained {total_min:.1f} min in all)")
             for m in marks]
    final = (f"End of run ({report['steps']} steps; training {report['wall_time_s']['train'] / 60:.1f} min, "
             f"evaluation {report['wall_time_s']['eval'] / 60:.1f} min): **kNN {100 * trained['knn']:.2f}%**, "
             f"linear probe {100 * trained['probe']:.2f}%, RankMe {trained['rankme']:.1f}")
    if rand:
        final += (f"; the backbone at random init: kNN {100 * rand['knn']:.2f}%, probe {100 * rand['probe']:.2f}%, "
                  f"RankMe {rand['rankme']:.1f}")
    plot_knn_curves(Path(a.out) / f"{name}.png",
                    {None: ([p["epoch"] for p in points], [p["minutes"] for p in points],
                            [100 * p["knn"] for p in points])},
                    ylabel="online kNN top-1 (%)", time_label="minutes since start (this machine)",
                    titles=(f"{a.preset}: kNN vs epochs", "kNN vs time"), marks=a.marks, height=4.2)
    body = (f"`diet train {' '.join(args)}` (run folder `{run_dir}`). Online kNN: the preset's fixed subsets "
            f"(eval.online_bank / eval.online_queries); the end-of-run evaluation uses the full bank and every "
            f"test image.\n\n{table}\n\n" + "\n".join(lines) + f"\n\n{final}.\n\n![{name}]({name}.png)")
    config = {"preset": a.preset, "options": args, "marks_minutes": a.marks, "torch_threads": a.threads or "default",
              "collect_only": a.collect_only, "load_average_1m_at_report": round(load0, 2)}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_csv(Path(a.out) / f"{name}.csv", points, ["epoch", "minutes", "knn", "step"])
    path = write_report(name, f"`{a.preset}` for {a.epochs} epochs: kNN against time", body, machine_stamp(),
                        config, points, extra={"marks": marks, "final": report}, out_dir=Path(a.out))
    print(path.read_text())
    return 0


main = cli_main(__doc__, add_arguments, run)


if __name__ == "__main__":
    import sys

    sys.exit(main())
