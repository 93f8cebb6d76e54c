"""Run `diet train` as a subprocess the way a user does, sampling the peak RSS of its process tree.

Shared by the training benchmarks (train/head_store.py, train/method.py, train/scale.py) and
`diet bench gpu`: one place that starts the run, watches metrics.csv, optionally SIGKILLs it once a
step is logged, and reads back the per-window throughput and head counters the run logged itself.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import GB, ROOT, TreeRSS


def read_metrics(run: Path) -> list[dict[str, float]]:
    try:
        with (run / "metrics.csv").open() as f:
            return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
    except FileNotFoundError:
        return []


def knn_curve(run: Path) -> list[dict]:
    """[{epoch, knn, step, train_s, minutes}] of every online kNN evaluation (eval.every_epochs) in
    the run's metrics.csv. `train_s`: training time from the logged img/s (steps only); `minutes`:
    time since the run started on the head store's clock (online evaluations included), or train_s
    where the head has no clock (the dense head)."""
    out: list[dict] = []
    train_s, last, clock = 0.0, None, None
    for r in read_metrics(run):
        if "head/elapsed_s" in r:
            clock = r["head/elapsed_s"]
        if "img_per_s" in r and last is not None:  # a logged window: its steps' samples at its rate
            train_s += (r["step"] - last) * r.get("batch", 128) / r["img_per_s"]
        if "loss" in r:
            last = r["step"]
        if "eval/knn" in r:
            since = clock if clock is not None and r["step"] > 0 else train_s
            out.append({"epoch": r["epoch"], "knn": r["eval/knn"], "step": r["step"], "train_s": train_s,
                        "minutes": since / 60})
    return out


def plot_knn_curves(path: Path, series: dict[str | None, tuple[list[float], list[float], list[float]]], *,
                    ylabel: str, time_label: str, titles: tuple[str, str] | None = None,
                    marks: list[float] = (), height: float = 4.4) -> Path:
    """Two panels, kNN (%) against epochs and against minutes: `series` {label: (epochs, minutes,
    kNN %)} (label None: one unlabelled curve, no legend); `marks`: vertical lines at these minutes."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(12, height))
    for label, (epochs, minutes, knn) in series.items():
        axes[0].plot(epochs, knn, marker="o", ms=3, label=label)
        axes[1].plot(minutes, knn, marker="o", ms=3, label=label)
    for m in marks:
        axes[1].axvline(m, color="grey", ls=":", lw=1)
    axes[0].set(xlabel="epoch", ylabel=ylabel, **({"title": titles[0]} if titles else {}))
    axes[1].set(xlabel=time_label, ylabel=ylabel, **({"title": titles[1]} if titles else {}))
    for ax in axes:
        ax.grid(alpha=0.3)
        if any(label is not None for label in series):
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def train(run: Path, args: list[str], *, threads: int | None = None, kill_at_step: int | None = None,
          mark_at_step: int | None = None, log: Path | None = None, timeout: float = 7200,
          evaluate: bool = False) -> dict:
    """`python -m diet_engine.launch.cli train --no-eval --train.run_dir=run *args` (without
    `--no-eval` when `evaluate`: the end-of-run evaluation too); SIGKILL once `kill_at_step` is logged.

    Returns wall time, return code, peak RSS (main process, and with children) and the metrics rows
    this invocation appended to metrics.csv. With `mark_at_step` (e.g. the run's last step), also the
    tree's peak RSS before and after that step is logged (`peak_rss_tree_{before,after}_mark_GB`:
    the steps vs the final checkpoint and export); metrics.csv is then polled every 0.05 s.
    """
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    before = len(read_metrics(run))
    cmd = [sys.executable, "-m", "diet_engine.launch.cli", "train", *([] if evaluate else ["--no-eval"]),
           f"--train.run_dir={run}", "--train.progress=false", *args]
    log = log or run.with_name(run.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    killed = False
    with log.open("a") as out:
        out.write(f"\n=== {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with TreeRSS(proc.pid) as rss:
            while proc.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    proc.wait()
                    raise TimeoutError(f"diet train ran past {timeout:.0f} s; see {log}")
                if kill_at_step is not None:
                    rows = read_metrics(run)
                    if rows and rows[-1]["step"] >= kill_at_step:
                        proc.send_signal(signal.SIGKILL)
                        killed = True
                        proc.wait()
                        break
                if mark_at_step is not None and not rss.marked:
                    rows = read_metrics(run)
                    if rows and rows[-1]["step"] >= mark_at_step:
                        rss.mark()
                time.sleep(0.05 if mark_at_step is not None and not rss.marked else 0.2)
    wall = time.perf_counter() - t0
    rc = proc.returncode
    if rc != 0 and not killed:
        raise RuntimeError(f"diet train failed (rc {rc}):\n{log.read_text()[-4000:]}")
    rows = read_metrics(run)[before:]
    return {"wall_s": wall, "rc": rc, "killed": killed, "peak_rss_main_GB": rss.peak_main / GB,
            "peak_rss_tree_GB": rss.peak_tree / GB, "peak_rss_tree_before_mark_GB": rss.peak_tree_before_mark / GB,
            "peak_rss_tree_after_mark_GB": rss.peak_tree_after_mark / GB, "rows": rows}


def window_img_per_s(rows: list[dict[str, float]], skip: int = 1) -> list[float]:
    """img/s of each logged window, the first `skip` (start-up) dropped when more remain."""
    w = [r["img_per_s"] for r in rows]
    return w[skip:] if len(w) > skip else w


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def startup_s(run: dict, log_every: int, batch: int) -> float:
    """Seconds of a `train` result not spent in its logged windows: start-up (imports, DeepSpeed,
    creating or recovering the head store) up to the first step."""
    return run["wall_s"] - sum(log_every * batch / r["img_per_s"] for r in run["rows"])


def ensure_synthetic(path: Path, n: int, size: int) -> float:
    """Prepare N synthetic images at `path` unless a matching manifest is there; seconds spent."""
    from diet_engine.storage.shards import prepare_synthetic  # noqa: PLC0415

    mf = path / "manifest.json"
    if mf.exists():
        m = json.loads(mf.read_text())
        if m.get("num_samples") == n and m.get("source", {}).get("size") == size:
            return 0.0
    t0 = time.perf_counter()
    prepare_synthetic(path, n, size=size, channels=1, overwrite=True, progress=False)
    return time.perf_counter() - t0
