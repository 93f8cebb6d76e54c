"""`diet bench gpu`: the first minutes on a borrowed H100/H200, one command, one summary.

    diet bench gpu                      # CUDA: all stages, ~8 min, writes results/gpu_summary.{md,json}
    diet bench gpu --stages ce,lazy     # a subset
    diet bench gpu --dry-run --out TMP  # CPU: every stage's code path on tiny sizes (CI)
    python -m benchmarks.gpu ...        # the same without the CLI

Stages, in sequence, each with a time budget (seconds); a stage that fails or overruns is recorded
with its error and the next one runs, so one failure never loses the others' figures:
    tests    `pytest -q -m gpu tests` in a subprocess (pass/fail counts)
    ce       `diet bench batch-ce --quick`: fused batch CE vs eager vs torch.compile
    lazy     lazy AdamW catch_up + step of the B rows a step touches vs dense torch.optim.AdamW on
             the same B rows and on all N rows (N = 1,281,167, d = 2048 fp32 if memory allows)
    memory   `diet bench memory --preset gpu-resnet50`, methods a (DIET full CE), c (s-DIET disk head)
             at two N, e (supervised): peak allocated / reserved
    e2e      `diet train` img/s, s-DIET (disk head) vs supervised, alternating rounds (bar ≥ 0.95)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, cli_main, machine_stamp, markdown_table, write_report

STAGES = ("tests", "ce", "lazy", "memory", "e2e")
BUDGET_S = {"tests": 90, "ce": 90, "lazy": 60, "memory": 150, "e2e": 150}  # GPU; ≈ 8 min in all


class StageTimeout(RuntimeError):
    pass


# --------------------------------------------------------------------------- stages

def stage_tests(a, budget: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
    if a.dry_run:
        cmd.append("--collect-only")
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as e:
        raise StageTimeout(f"pytest ran past {budget:.0f} s") from e
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|tests? collected)",
                                              r.stdout + r.stderr)}
    # pytest: 0 all passed, 5 nothing collected (no GPU tests selected): both are not failures of the driver
    ok = r.returncode in (0, 5) and not counts.get("failed") and not counts.get("error") and not counts.get("errors")
    return {"ok": ok, "rc": r.returncode, "summary": tail[0], **counts}


def stage_ce(a, budget: float) -> dict:
    from benchmarks.kernels import batch_ce as ce  # noqa: PLC0415

    p = argparse.ArgumentParser()
    ce.add_arguments(p)
    argv = ["--quick"] + (["--dtypes", "fp32", "--reps", "1"] if a.dry_run else ["--rep-ms", "100"])
    rows = ce.measure(p.parse_args(argv))
    keep = ("dtype", "B", "M", "d", "eager_ms", "compile_ms", "fused_ms", "vs_eager", "vs_compile",
            "eager_MiB", "fused_MiB", "mem_vs_eager")
    return {"ok": bool(rows), "rows": [{k: r[k] for k in keep if k in r} for r in rows]}


def _time_ms(fn, dev, reps: int) -> float:
    """Median ms of fn(); CUDA: triton.testing.do_bench (synchronised, warmed up)."""
    if dev.type == "cuda":
        import triton.testing  # noqa: PLC0415

        return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def stage_lazy(a, budget: float) -> dict:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from diet_engine.kernels.lazy_optim import LazyAdamW, Rows  # noqa: PLC0415

    dev = torch.device("cpu" if a.dry_run else "cuda")
    N, B, d = (2_000, 16, 32) if a.dry_run else (1_281_167, 256, 2048)
    backend = "numba" if a.dry_run else "triton"
    epoch = -(-N // B)
    T = 4 * epoch
    lrs = 1e-3 * np.ones(T)
    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(B, d, generator=g) * 0.02).to(dev)  # (B, d)
    m0 = (torch.randn(B, d, generator=g) * 1e-4).to(dev)
    v0 = (torch.rand(B, d, generator=g) * 1e-8).to(dev)
    grad = (torch.randn(B, d, generator=g) * 1e-4).to(dev)
    t = 3 * epoch
    rng = np.random.default_rng(0)
    stamps = torch.from_numpy(t - (rng.integers(0, epoch, B) + rng.integers(0, epoch, B)).clip(1)).to(dev)
    opt = LazyAdamW(lrs, weight_decay=0.05, backend=backend)
    opt.catch_up(Rows(w0.clone(), m0.clone(), v0.clone(), stamps.clone()), t)  # fills the per-stamp cache (steady)
    bufs = [w0.clone(), m0.clone(), v0.clone(), stamps.clone()]

    def lazy():
        w, m, v, s = bufs[0].copy_(w0), bufs[1].copy_(m0), bufs[2].copy_(v0), bufs[3].copy_(stamps)
        opt.catch_up(Rows(w, m, v, s), t)
        opt.step(Rows(w, m, v, s), grad, t)

    def dense_step(n_rows: int):
        p = torch.nn.Parameter(torch.zeros(n_rows, d, device=dev))
        p.grad = torch.zeros_like(p)
        o = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.05, foreach=True)
        o.step()  # allocates the moments
        return o.step, p

    reps = 3 if a.dry_run else 20
    lazy_ms = _time_ms(lazy, dev, reps)
    step_b, _pb = dense_step(B)
    dense_b_ms = _time_ms(step_b, dev, reps)
    out = {"N": N, "B": B, "d": d, "backend": backend, "lazy_catch_up_step_ms": lazy_ms,
           "dense_B_rows_ms": dense_b_ms, "lazy_vs_dense_B": lazy_ms / dense_b_ms}
    need = 4 * N * d * 4  # weight, grad, exp_avg, exp_avg_sq in fp32
    free = torch.cuda.mem_get_info()[0] if dev.type == "cuda" else 2 * need
    if need < 0.9 * free:
        step_n, _pn = dense_step(N)
        dense_n_ms = _time_ms(step_n, dev, reps)
        out |= {"dense_N_rows_ms": dense_n_ms, "dense_N_vs_lazy": dense_n_ms / lazy_ms}
        del step_n, _pn
    else:
        out["dense_N_rows_ms"] = f"skipped: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return {"ok": True, **out}


def stage_memory(a, budget: float) -> dict:
    from benchmarks.memory import harness  # noqa: PLC0415

    p = argparse.ArgumentParser()
    harness.add_arguments(p)
    work = Path(a.work) / "memory"
    argv = ["--out", str(a.out_dir), "--work", str(work), "--name", "gpu_memory"]
    if a.dry_run:
        argv += ["--preset", "tiny", "--methods", "a,c,e", "--device", "cpu", "--sizes", "2000"]
    else:
        argv += ["--preset", "gpu-resnet50", "--methods", "a,c,e", "--sizes", "50e3,1281167"]
    rc = int(harness.run(p.parse_args(argv)) or 0)
    res = json.loads((Path(a.out_dir) / "gpu_memory.json").read_text())
    rows = [{k: v for k, v in r.items() if k in ("method", "N", "status", "cuda_reserved_mib") or "peak" in k}
            for r in res.get("rows", [])]
    return {"ok": rc == 0 and bool(rows), "rc": rc, "rows": rows}


def stage_e2e(a, budget: float) -> dict:
    from benchmarks.train.runs import ensure_synthetic, median, train, window_img_per_s  # noqa: PLC0415

    if a.dry_run:
        n, size, backbone, batch, steps, log_every, rounds = 64, 8, "resnet18", 8, 4, 2, 1
    else:
        n, size, backbone, batch, steps, log_every, rounds = 20_480, 224, "resnet50", 256, 120, 20, 2
    work = Path(a.work) / "e2e"
    data = work / f"synth-{n}-{size}px"
    ensure_synthetic(data, n, size)
    common = [f"--data.manifest={data}", "--data.eval_train_manifest=", "--data.eval_test_manifest=",
              "--data.prepare_digits=false", f"--data.image_size={size}",
              f"--data.num_workers={0 if a.dry_run else 8}", f"--model.backbone={backbone}",
              f"--train.batch_size={batch}", "--train.epochs=1", f"--train.max_steps={steps}",
              f"--train.log_every={log_every}"]
    if not a.dry_run:
        common.append("--train.precision=bf16")
    cases = {"s-diet": ["--head.loss=batch", "--head.store=disk"], "supervised": ["--train.method=supervised"]}
    per: dict[str, list[float]] = {k: [] for k in cases}
    deadline = time.monotonic() + budget
    for _ in range(rounds):
        for name, extra in cases.items():
            if time.monotonic() > deadline:
                raise StageTimeout(f"e2e ran past {budget:.0f} s after {per}")
            run = work / f"run-{name}"
            shutil.rmtree(run, ignore_errors=True)
            r = train(run, [*common, *extra], timeout=max(30.0, deadline - time.monotonic()))
            if r.get("returncode", 0) != 0:
                raise RuntimeError(f"diet train ({name}) exited {r.get('returncode')}")
            per[name].append(median(window_img_per_s(r["rows"])))
            shutil.rmtree(run, ignore_errors=True)
    sd, sup = median(per["s-diet"]), median(per["supervised"])
    ratio = sd / sup
    return {"ok": True, "backbone": backbone, "image_size": size, "batch": batch, "steps": steps,
            "s_diet_img_per_s": sd, "supervised_img_per_s": sup, "ratio": ratio,
            "bar_0.95": "PASS" if ratio >= 0.95 else "MISS", "rounds": per}


RUNNERS = {"tests": stage_tests, "ce": stage_ce, "lazy": stage_lazy, "memory": stage_memory, "e2e": stage_e2e}


# --------------------------------------------------------------------------- driver

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="CPU, tiny sizes: exercise every stage's code path (CI; no GPU needed)")
    p.add_argument("--out", default="", help="results folder (default benchmarks/results)")
    p.add_argument("--work", default="", help="scratch folder (default: a temporary folder, removed)")


def run(args: argparse.Namespace) -> int:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        print(f"diet bench gpu: --stages {args.stages!r}: unknown {bad}; expected some of {','.join(STAGES)}",
              file=sys.stderr)
        return 2
    if not args.dry_run:
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            print("diet bench gpu: no CUDA GPU is visible; use --dry-run to check the stages on the CPU",
                  file=sys.stderr)
            return 2
    args.out_dir = Path(args.out or RESULTS)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = None if args.work else tempfile.mkdtemp(prefix="diet-bench-gpu-")
    args.work = args.work or tmp
    results: dict[str, dict] = {}
    try:
        for name in stages:
            budget = BUDGET_S[name] * (2 if args.dry_run else 1)  # the 2-core CI box is slower per step
            print(f"== diet bench gpu: stage {name} (budget {budget} s)", flush=True)
            t0 = time.monotonic()
            try:
                res = RUNNERS[name](args, budget)
            except Exception as e:  # noqa: BLE001 - record the failure, keep the other stages' figures
                traceback.print_exc()
                res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
            res["wall_s"] = round(time.monotonic() - t0, 1)
            if res["wall_s"] > budget and res.get("ok"):
                res["over_budget"] = True
            results[name] = res
            print(f"   {name}: {'ok' if res['ok'] else 'FAILED'} in {res['wall_s']} s", flush=True)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    _write(args, stages, results)
    return 0 if all(r["ok"] for r in results.values()) else 1


def _write(args, stages, results) -> None:
    summary = [{"stage": s, "status": "ok" if results[s]["ok"] else "FAILED", "wall_s": results[s]["wall_s"],
                "headline": _headline(s, results[s])} for s in stages]
    body = [markdown_table(summary, ["stage", "status", "wall_s", "headline"], align="llrl"), ""]
    for s in stages:
        r = results[s]
        body.append(f"## {s}\n")
        if r.get("rows"):
            body.append(markdown_table(r["rows"], list(r["rows"][0])))
        scalars = {k: v for k, v in r.items() if k not in ("rows",)}
        body.append("\n```\n" + json.dumps(scalars, indent=1, default=str) + "\n```\n")
    title = "GPU first minutes" + (" (dry run, CPU, tiny sizes)" if args.dry_run else "")
    path = write_report("gpu_summary", title, "\n".join(body), machine_stamp(),
                        {"stages": stages, "dry_run": args.dry_run, "budgets_s": BUDGET_S}, summary,
                        extra={"stages": results}, out_dir=args.out_dir)
    print(path.read_text())


def _headline(stage: str, r: dict) -> str:
    if not r["ok"]:
        return r.get("error", r.get("summary", ""))[:160]
    if stage == "tests":
        return r.get("summary", "")
    if stage == "ce" and r["rows"] and "vs_eager" in r["rows"][0]:
        return "; ".join(f"{x['dtype']} d={x['d']}: fused {x['vs_eager']:.2f}× eager, {x['vs_compile']:.2f}× compile"
                         for x in r["rows"])
    if stage == "lazy":
        dense_n = r["dense_N_rows_ms"]  # a number, or why it was skipped
        dense_n = dense_n if isinstance(dense_n, str) else f"{dense_n:.3g} ms"
        return (f"lazy {r['lazy_catch_up_step_ms']:.3g} ms = {r['lazy_vs_dense_B']:.2f}× dense AdamW on B rows; "
                f"dense on N rows: {dense_n}")
    if stage == "e2e":
        return f"s-DIET/supervised img/s = {r['ratio']:.3f} (bar ≥ 0.95: {r['bar_0.95']})"
    return f"{len(r.get('rows', []))} rows"


main = cli_main(__doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
