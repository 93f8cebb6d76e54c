"""Fused batch cross-entropy vs PyTorch: forward + backward time and peak memory.

Three implementations of loss = cross_entropy(scale · Z Rᵀ, target, label_smoothing=0.8) with
gradients to Z and R, timed as `torch.autograd.grad(loss, (z, rows))`:
    eager     the reference (matmul, cross_entropy, backward; materialises B × M logits);
    compile   torch.compile of the reference (inductor, static shapes);
    fused     kernels/_batch_ce_triton.py (the path batch_cross_entropy takes on CUDA).
Time: median of triton.testing.do_bench (warm-up, L2 flushed between runs). Memory: peak of
torch.cuda.max_memory_allocated over one call minus what was allocated before it (the inputs),
so it includes the returned gradients (`grads` column). Bars checked: fused never
slower than eager; at B = 4096, M = 65,536: ≥ 1.2× eager, within 10% of compile, peak extra
memory ≤ 10% of eager's.

    diet bench batch-ce            # GPU: full grid, ~15 min (compiles per shape)
    diet bench batch-ce --quick    # GPU: B = 4096, M = 65,536 only
    python -m benchmarks.kernels.batch_ce ...      # the same without the CLI

`fused_ws256` is the fused path with a 256 MiB logits chunk instead of the default budget: the
time / memory trade-off of the chunk size (`--workspace-mib` sets the list).

Without a GPU it times the reference path on small sizes for completeness and writes
results/batch_ce.cpu.*; the GPU figures (results/batch_ce.*) need a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine_stamp, markdown_table, write_csv, write_report
from diet_engine.kernels.batch_ce import batch_cross_entropy_reference

EPS, SCALE = 0.8, 10.0
MiB = 2**20


def _has_gpu() -> bool:
    return torch.cuda.is_available()


def _inputs(B, M, d, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(B, d, device=device, generator=g), dim=1)
    rows = torch.nn.functional.normalize(torch.randn(M, d, device=device, generator=g), dim=1)
    t = torch.randint(0, M, (B,), device=device, generator=g)
    return z.to(dtype).requires_grad_(), rows.to(dtype).requires_grad_(), t


def _implementations(device: str, workspace_mib: list[int]) -> dict:
    impls = {"eager": batch_cross_entropy_reference}
    if device == "cuda":
        import diet_engine.kernels._batch_ce_triton as backend  # noqa: PLC0415

        impls["compile"] = torch.compile(batch_cross_entropy_reference, dynamic=False)
        impls["fused"] = backend.batch_cross_entropy_fused
        for mib in workspace_mib:  # the same path with a fixed logits-chunk budget
            impls[f"fused_ws{mib}"] = _with_workspace(backend, mib * MiB)
    return impls


def _with_workspace(backend, budget: int):
    def loss_fn(*args):
        saved = backend._MIN_WORKSPACE_BYTES, backend._WORKSPACE_DIVISOR
        backend._MIN_WORKSPACE_BYTES, backend._WORKSPACE_DIVISOR = budget, 2**62
        try:
            return backend.batch_cross_entropy_fused(*args)  # gradients are computed here
        finally:
            backend._MIN_WORKSPACE_BYTES, backend._WORKSPACE_DIVISOR = saved

    return loss_fn


def _step(loss_fn, z, rows, t):
    return torch.autograd.grad(loss_fn(z, rows, t, EPS, SCALE), (z, rows))


def _measure_gpu(loss_fn, z, rows, t, warmup_ms, rep_ms) -> tuple[float, float, float]:
    """(median ms, peak extra MiB, loss) for one implementation on one config."""
    import triton.testing  # noqa: PLC0415

    loss = loss_fn(z, rows, t, EPS, SCALE).item()  # also compiles; host sync
    _step(loss_fn, z, rows, t)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = _step(loss_fn, z, rows, t)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / MiB
    del grads
    ms = triton.testing.do_bench(
        lambda: _step(loss_fn, z, rows, t), warmup=warmup_ms, rep=rep_ms, return_mode="median"
    )
    return ms, peak, loss


def _measure_cpu(loss_fn, z, rows, t, reps) -> tuple[float, float, float]:
    loss = loss_fn(z, rows, t, EPS, SCALE).item()
    _step(loss_fn, z, rows, t)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _step(loss_fn, z, rows, t)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), float("nan"), loss


def _grid(device: str, quick: bool) -> list[tuple[int, int, int]]:
    if device != "cuda":
        return [(B, M, 128) for B in (64, 256) for M in (B, 2048)]
    if quick:
        return [(4096, 65_536, d) for d in (512, 2048)]
    return [(B, M, d) for B in (256, 1024, 4096) for M in (B, 16_384, 65_536) for d in (512, 2048)]


def measure(args: argparse.Namespace) -> list[dict]:
    """One row per (dtype, B, M, d) of the grid: time (and on GPU peak memory) of every implementation."""
    device = "cuda" if _has_gpu() else "cpu"
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    rows_out = []
    for dname in args.dtypes:
        for B, M, d in _grid(device, args.quick):
            torch._dynamo.reset()  # a fresh static-shape compile per config
            z, rows, t = _inputs(B, M, d, dtypes[dname], device)
            grad_mib = (z.numel() * z.element_size() + rows.numel() * rows.element_size()) / MiB
            row = {"dtype": dname, "B": B, "M": M, "d": d, "grads_MiB": grad_mib}
            for name, fn in _implementations(device, args.workspace_mib).items():
                try:
                    if device == "cuda":
                        ms, mib, loss = _measure_gpu(fn, z, rows, t, args.warmup_ms, args.rep_ms)
                    else:
                        ms, mib, loss = _measure_cpu(fn, z, rows, t, args.reps)
                except torch.OutOfMemoryError:
                    ms, mib, loss = float("nan"), float("nan"), float("nan")
                    torch.cuda.empty_cache()
                row |= {f"{name}_ms": ms, f"{name}_MiB": mib, f"{name}_loss": loss}
            if "fused_ms" in row:
                row["vs_eager"] = row["eager_ms"] / row["fused_ms"]
                row["vs_compile"] = row["compile_ms"] / row["fused_ms"]
                row["mem_vs_eager"] = row["fused_MiB"] / row["eager_MiB"]
                row["loss_diff"] = abs(row["fused_loss"] - row["eager_loss"])
            rows_out.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            del z, rows, t
    return rows_out


def _bars(rows: list[dict]) -> list[str]:
    """The bars of the module docstring, each with PASS/FAIL and the numbers behind it."""
    if not rows or "fused_ms" not in rows[0]:
        return []

    def verdict(ok: bool) -> str:
        return "**PASS**" if ok else "**FAIL**"

    slower = [f"{r['dtype']} {r['B']}/{r['M']}/{r['d']}" for r in rows if not r["vs_eager"] >= 1.0]
    out = [f"- never slower than eager: {verdict(not slower)}" + (f" ({', '.join(slower)})" if slower else "")]
    for r in rows:
        if (r["B"], r["M"]) != (4096, 65_536):
            continue
        out.append(
            f"- {r['dtype']}, d = {r['d']}: ≥ 1.2× eager {verdict(r['vs_eager'] >= 1.2)} "
            f"({r['vs_eager']:.2f}×); within 10% of compile {verdict(r['vs_compile'] >= 1 / 1.1)} "
            f"(compile time / fused time {r['vs_compile']:.2f}); peak extra ≤ 10% of eager's "
            f"{verdict(r['mem_vs_eager'] <= 0.1)} ({100 * r['mem_vs_eager']:.1f}%, the gradients "
            f"alone are {r['grads_MiB']:.0f} MiB of fused's {r['fused_MiB']:.0f})"
        )
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    impls = [k[:-3] for k in rows[0] if k.endswith("_ms")]
    labels = [f"{r['dtype']}\n{r['B']}/{r['M']}\n{r['d']}" for r in rows]
    panels = [("ms", "fwd + bwd, ms (median)")]
    if any(r[f"{i}_MiB"] > 0 for r in rows for i in impls):  # memory is measured on GPU only
        panels.append(("MiB", "peak extra memory, MiB"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.55 * len(rows)), 4 * len(panels)),
                             sharex=True, squeeze=False)
    width = 0.8 / len(impls)
    for ax, (unit, ylabel) in zip(axes[:, 0], panels, strict=True):
        for i, name in enumerate(impls):
            x = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(x, [r[f"{name}_{unit}"] for r in rows], width, label=name)
        ax.set(ylabel=ylabel, yscale="log")
    axes[0, 0].set_title(f"Batch cross-entropy forward + backward, eps = {EPS}")
    axes[0, 0].legend()
    axes[-1, 0].set_xticks(range(len(rows)), labels, fontsize=7)
    axes[-1, 0].set_xlabel("dtype / B / M / d")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="GPU: only B = 4096, M = 65,536")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up (GPU)")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time (GPU)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (CPU)")
    p.add_argument("--workspace-mib", type=int, nargs="*", default=[256],
                   help="GPU: also time the fused path with these logits-chunk budgets (MiB)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")


def run(args: argparse.Namespace) -> int:
    gpu = _has_gpu()
    rows = measure(args)
    name = "batch_ce" if gpu else "batch_ce.cpu"
    impls = [k[:-3] for k in rows[0] if k.endswith("_ms")]
    cols = ["dtype", "B", "M", "d"] + [f"{i}_ms" for i in impls]
    if gpu:
        cols += [f"{i}_MiB" for i in impls]
        cols += ["grads_MiB", "vs_eager", "vs_compile", "mem_vs_eager", "loss_diff"]
    write_csv(args.out / f"{name}.csv", rows, cols)
    _plot(rows, args.out / f"{name}.png")
    body = [
        "Forward + backward of `cross_entropy(scale · Z Rᵀ, target, label_smoothing=0.8)`, "
        f"scale = {SCALE}, unit-norm rows. Times: median ms"
        + ("; memory: peak MiB above the inputs (includes the gradients). `vs_eager`, "
           "`vs_compile`: their time / fused time; `mem_vs_eager`: fused / eager peak memory."
           if gpu else "."),
        "",
        markdown_table(rows, cols),
        "",
        f"![plot]({name}.png)",
    ]
    bars = _bars(rows)
    if bars:
        body[1:1] = ["", "**Bars (issue 5).**", *bars]
    if not gpu:
        body.insert(1, "\n**No GPU here**: only the reference path (what `batch_cross_entropy` runs "
                       "on CPU) is timed, on small sizes. The fused-vs-PyTorch figures and the bars "
                       "need a CUDA GPU: run `diet bench batch-ce` there.")
    config = {"eps": EPS, "scale": SCALE, "dtypes": args.dtypes, "quick": args.quick,
              "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "reps_cpu": args.reps,
              "workspace_mib": args.workspace_mib}
    if gpu:
        import triton  # noqa: PLC0415

        config["triton"] = triton.__version__
    md = write_report(name, "Fused batch cross-entropy", "\n".join(body), machine_stamp(), config, rows,
                      out_dir=args.out)
    print(md.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
