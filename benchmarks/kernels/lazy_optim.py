"""Benchmark of the exact lazy AdamW: speed against a dense torch.optim.AdamW step, and
how far the s-DIET `paper` mode drifts from dense AdamW over an ImageNet-sized epoch.

    diet bench lazy-optim                        # CPU (numba); Triton too when CUDA is there
    python -m benchmarks.kernels.lazy_optim      # the same without the CLI

Speed: B = 256 rows of d = 2048 (fp32) at an ImageNet step (N = 1,281,167, B = 256: a row comes
back after ≈ N/B = 5,005 steps; gaps drawn as the sum of two uniform positions in consecutive
shuffled epochs, mean ≈ 5,005). The engine's order is timed: `catch_up(t)` then `step(t)`, with
fresh stamps every iteration. "steady" = the per-stamp coefficient cache already holds the stamps
(in a run each stamp is computed once and then serves its whole batch: ≈ 1 new stamp per step);
"cold" = a fresh optimizer every iteration (256 stamps computed). Baseline, same run and device:
`torch.optim.AdamW(foreach=True).step()` over one (256, 2048) parameter. The three are timed in
turn each iteration; medians (and minima, which show the machine unloaded) after warm-up.

Drift: a sample of rows, each drawn into one batch per epoch at a random step, trained by dense
torch.optim.AdamW (zero gradient when out of the batch) and by LazyAdamW(mode="paper"); lr 1e-3
with linear warm-up over the first epoch, then cosine (the engine's `warmup_cosine`); wd 0.05.
Reported per epoch: the error of the rows the forward pass sees (paper row before its step vs
dense row at t − 1) relative to max|W|, and relative to how far dense moved the row from its
initial value.
Writes benchmarks/results/lazy_optim.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, load_average, machine_stamp, markdown_table, write_csv, write_report
from diet_engine.engine.schedule import warmup_cosine
from diet_engine.kernels.lazy_optim import LazyAdamW, Rows, _numba

N_ROWS, BATCH, D = 1_281_167, 256, 2048
EPOCH = -(-N_ROWS // BATCH)  # 5,005 steps
LR, WD = 1e-3, 0.05


def schedule(T: int) -> np.ndarray:
    """lrs[t-1]: linear warm-up over one epoch, then cosine to 0 at T. (T,) float64."""
    return warmup_cosine(LR, T, EPOCH)


def gaps(rng, n):
    return (rng.integers(0, EPOCH, n) + rng.integers(0, EPOCH, n)).clip(1)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def speed(backend: str, dev: torch.device, T: int, reps: int, warm: int) -> dict[str, list[float]]:
    """Seconds per iteration of: the dense baseline step, lazy catch_up + step with a steady
    cache, and the same with a cold one. Interleaved, so a busy machine slows all three alike."""
    rng = np.random.default_rng(0)
    lrs = schedule(T)
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(BATCH, D, generator=g) * 0.02).to(dev)
    m0 = (torch.randn(BATCH, D, generator=g) * 1e-4).to(dev)
    v0 = (torch.rand(BATCH, D, generator=g) * 1e-8).to(dev)
    grad = (torch.randn(BATCH, D, generator=g) * 1e-4).to(dev)
    p = torch.nn.Parameter(w0.clone())
    p.grad = grad.clone()
    dense = torch.optim.AdamW([p], lr=LR, weight_decay=WD, foreach=True)
    steps = list(range(3 * EPOCH, 3 * EPOCH + warm + reps))
    stamps = [torch.from_numpy(t - gaps(rng, BATCH)).to(dev) for t in steps]
    steady = LazyAdamW(lrs, weight_decay=WD, backend=backend)
    for t, s in zip(steps, stamps, strict=True):  # every stamp of these steps seen once before, as in a run
        steady.catch_up(Rows(w0.clone(), m0.clone(), v0.clone(), s.clone()), t)

    def lazy(opt, t, s):
        w, m, v, st = w0.clone(), m0.clone(), v0.clone(), s.clone()
        _sync(dev)
        t0 = time.perf_counter()
        opt.catch_up(Rows(w, m, v, st), t)
        opt.step(Rows(w, m, v, st), grad, t)
        _sync(dev)
        return time.perf_counter() - t0

    out = {"dense": [], "steady": [], "cold": []}
    for i, (t, s) in enumerate(zip(steps, stamps, strict=True)):
        _sync(dev)
        t0 = time.perf_counter()
        dense.step()
        _sync(dev)
        td = time.perf_counter() - t0
        ts = lazy(steady, t, s)
        tc = lazy(LazyAdamW(lrs, weight_decay=WD, backend=backend), t, s)
        if i >= warm:
            for k, x in zip(out, (td, ts, tc), strict=True):
                out[k].append(x)
    return out


def paper_drift(rows: int = 64, d: int = 64, epochs: int = 2, seed: int = 0):
    """Dense AdamW vs paper mode on a sample of rows; per epoch the worst errors seen by the
    forward pass (before each row's step)."""
    lrs = schedule(10 * EPOCH)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    w0 = torch.randn(rows, d, generator=g, dtype=torch.float64) * 0.02
    p = torch.nn.Parameter(w0.clone())
    dense = torch.optim.AdamW([p], lr=LR, weight_decay=WD, foreach=False)
    paper = LazyAdamW(lrs, weight_decay=WD, mode="paper", num_rows=N_ROWS, batch_size=BATCH)
    pw, pm, pv = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    pst = torch.zeros(rows, dtype=torch.int64)
    at = {e: rng.integers(e * EPOCH + 1, (e + 1) * EPOCH + 1, rows) for e in range(epochs)}
    out = []
    for e in range(epochs):
        err_w, err_move = 0.0, 0.0
        for t in range(e * EPOCH + 1, (e + 1) * EPOCH + 1):
            hit = np.nonzero(at[e] == t)[0]
            grad = torch.zeros(rows, d, dtype=torch.float64)
            if len(hit):
                idx = torch.from_numpy(hit)
                seen = p.detach()[idx]  # dense row at t − 1: what the forward pass should see
                diff = (pw[idx] - seen).abs().max()
                err_w = max(err_w, float(diff / p.detach().abs().max()))
                moved = (seen - w0[idx]).abs().max().clamp_min(1e-300)
                err_move = max(err_move, float(diff / moved))
                grad[idx] = torch.randn(len(hit), d, generator=g, dtype=torch.float64) * 1e-3
                rw, rm, rv, rs = pw[idx], pm[idx], pv[idx], pst[idx]
                paper.step(Rows(rw, rm, rv, rs), grad[idx], t)
                pw[idx], pm[idx], pv[idx], pst[idx] = rw, rm, rv, rs
            dense.param_groups[0]["lr"] = float(lrs[t - 1])
            p.grad = grad
            dense.step()
        label = "warm-up (epoch 1)" if e == 0 else f"after warm-up (epoch {e + 1})"
        out.append((label, err_w, err_move))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reps", type=int, default=40, help="timed iterations per case")
    p.add_argument("--warm", type=int, default=5, help="warm-up iterations, not timed")
    p.add_argument("--drift-epochs", type=int, default=2, help="epochs of the paper-mode drift run")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")


def run(args: argparse.Namespace) -> int:
    T = 10 * EPOCH
    rows = []
    if not torch.cuda.is_available():
        print("no CUDA: Triton timing skipped")
    cores = os.cpu_count() or 1
    runs = [("cpu", "numba", n) for n in sorted({1, cores})]
    runs += [("cuda", "triton", None)] if torch.cuda.is_available() else []
    for dev, backend, threads in runs:
        if threads is not None:  # CPU: torch and numba with the same thread count
            torch.set_num_threads(threads)
            _numba.THREADS = threads
        r = speed(backend, torch.device(dev), T, args.reps, args.warm)
        tag = f"{dev}, {threads} thread{'s' if threads != 1 else ''}" if threads else dev
        base_med, base_min = statistics.median(r["dense"]), min(r["dense"])
        rows.append({"device": tag, "what": "torch.optim.AdamW foreach step (baseline)", "median_ms": base_med * 1e3,
                     "vs_baseline_median": 1.0, "min_ms": base_min * 1e3, "vs_baseline_min": 1.0})
        for k in ("steady", "cold"):
            med, mn = statistics.median(r[k]), min(r[k])
            rows.append({"device": tag, "what": f"lazy {backend} catch_up + step, {k} cache", "median_ms": med * 1e3,
                         "vs_baseline_median": med / base_med, "min_ms": mn * 1e3, "vs_baseline_min": mn / base_min})
    torch.set_num_threads(cores)
    load_end = load_average()  # sampled after the timings
    drift = [{"epoch": label, "err_rel_max_w": ew, "err_rel_move": em}
             for label, ew, em in paper_drift(epochs=args.drift_epochs)]
    cols = ["device", "what", "median_ms", "vs_baseline_median", "min_ms", "vs_baseline_min"]
    body = "\n".join([
        f"B = {BATCH}, d = {D}, fp32, N = {N_ROWS:,}, gaps ≈ N/B = {EPOCH:,} steps, lr {LR}, wd {WD}; medians of "
        f"{args.reps} after {args.warm} warm-up iterations. Load average after the timings: {load_end}.", "",
        "## Speed: catch_up + step of 256 rows vs one dense AdamW step of the same rows", "",
        "Each iteration times the three in turn (interleaved); median and minimum over the "
        "iterations, ratios against the baseline's median and minimum.", "",
        markdown_table(rows, cols, ["device", "what", "median ms", "× baseline", "min ms", "× baseline"], "llrrrr"), "",
        "## `paper` mode drift from dense AdamW (64 sampled rows, d = 64, fp64)", "",
        "Error of the rows the forward pass sees, worst over the epoch.", "",
        markdown_table(drift, ["epoch", "err_rel_max_w", "err_rel_move"],
                       ["epoch", "max err / max\\|W\\|", "max err / max\\|W − W0\\|"]),
    ])
    config = {"N": N_ROWS, "B": BATCH, "d": D, "lr": LR, "weight_decay": WD, "reps": args.reps, "warm": args.warm,
              "drift_epochs": args.drift_epochs, "load_average_end": load_end}
    write_csv(args.out / "lazy_optim.csv", [{"kind": "speed", **r} for r in rows]
              + [{"kind": "paper_drift", **r} for r in drift])
    path = write_report("lazy_optim", "Lazy optimizer benchmark", body, machine_stamp(), config, rows,
                        extra={"paper_drift": drift}, out_dir=args.out)
    print(path.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
