"""`diet bench memory`: peak memory of DIET / s-DIET / SimCLR / supervised training across N.

    diet bench memory                          # CPU preset: ResNet-18, 16 px, B = 256, N up to 10M
    diet bench memory --preset cpu-resnet18-32px   # the SimCLR / s-DIET / supervised ratios at 32 px
    diet bench memory --preset gpu-resnet50    # ResNet-50, 224 px, B = 256, bf16, on a CUDA GPU
    python -m benchmarks.memory.harness ...    # the same, without the CLI

How it measures (see worker.py): every (configuration, N) runs the real `Trainer` (same loader,
backbone, DeepSpeed engine, head) in a fresh subprocess capped at `--mem-cap-gib` of data segment
(RLIMIT_DATA), for `warmup` + `measure` steps; the peak of the measured steps is reported. On CPU
that is the process's peak RSS (VmHWM), also given net of an idle process that imported the same
libraries; on CUDA the peak allocated / reserved accelerator memory plus the host RSS. A process
that fails to allocate (or is killed by the kernel) is reported as OOM; on CUDA a dense head whose
state alone exceeds the GPU is reported as a predicted OOM without building it (minutes of host
work at 10M × 2048).

Fairness: the same environment for every process (glibc `MALLOC_MMAP_THRESHOLD_`, so RSS tracks live
tensors, see MALLOC_ENV); JIT caches (numba / Triton) primed by a throwaway tiny run first, so no
measured process pays a compile; the loader's decoded-image cache for data sets ≤ 50k samples
switched off (worker.py), so N = 50k streams like every other N.

Data for large N: only N matters to the head, so no N images are written. A small synthetic shard
(R = shard_size samples, `prepare_synthetic`) is written once; for each N a *virtual* manifest
lists ceil(N/R) shards that all point at that one tar, with positional indices (index_field = null),
so shard j yields global indices j·R … j·R+R−1 and the loader, the epoch plan and the head see a
data set of N samples. The on-disk head store of (c) is created in full when it fits in half the
free disk, else (e.g. N = 10M: 61 GB at d = 512) only the chunk files the measured steps touch are
created (`store_files = partial`; the store is still N rows, with its O(N) step vector in RAM).

Slicing: `--reuse` takes the stored result of every identical configuration that already ran ok
(from the scratch folder) and runs the rest, so a sweep can be taken in parts (e.g. `--sizes` per
call on a machine with a per-command time limit) and assembled by a last full call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, cli_main, machine_stamp, write_csv, write_report
from benchmarks.memory import methods as M
from benchmarks.memory import report
from benchmarks.memory.presets import PRESETS, MemoryPreset

REPO = Path(__file__).resolve().parents[2]

# glibc's malloc raises its mmap threshold dynamically (up to 32 MiB) after large frees, so freed
# blocks below it stay in the heap and peak RSS would depend on tensor sizes rather than on live
# bytes (measured: a B = 256 step's 16 MiB activations were retained, SimCLR's 33 MiB ones were
# returned). A fixed 64 KiB threshold serves every tensor-sized block by mmap and returns it on
# free, so RSS tracks live memory. Set for the idle baseline and every configuration alike.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ---------------------------------------------------------------------------------------- data


def prepare_base(preset: MemoryPreset, work: Path):
    """One synthetic shard of R RGB images (written once per image size and R)."""
    from diet_engine.storage.shards import Manifest, prepare_synthetic  # noqa: PLC0415

    out = work / f"base-{preset.base_image_px}px-r{preset.shard_size}"
    if (out / "manifest.json").exists():
        return Manifest.load(out)
    return prepare_synthetic(out, preset.shard_size, preset.shard_size, size=preset.base_image_px, channels=3,
                             num_classes=10, seed=0, overwrite=True, workers=1, progress=False)


def virtual_manifest(base, n: int, out: Path) -> Path:
    """A manifest of N samples whose shards all read the base shard (positional indices); the last,
    shorter one a copy of its first N mod R samples."""
    from diet_engine.storage.shards import Manifest, ShardInfo  # noqa: PLC0415

    r = base.shard_size
    tar = str(base.shard_paths()[0])
    shards = [ShardInfo(tar, j * r, r) for j in range(n // r)]
    if n % r:  # the last shard holds exactly its n % r samples (a shard with more is refused when read)
        tail = out / f"tail-{n % r}.tar"
        if not tail.exists():
            import webdataset as wds  # noqa: PLC0415

            from diet_engine.storage.shards.records import iter_samples  # noqa: PLC0415

            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".tail-{n % r}.tar.tmp"
            with wds.TarWriter(str(tmp), encoder=False) as tw:
                for _, sample in zip(range(n % r), iter_samples(tar), strict=False):
                    tw.write(sample)
            tmp.replace(tail)
        shards.append(ShardInfo(str(tail), (n // r) * r, n % r))
    m = Manifest(num_samples=n, shard_size=r, shards=shards, image=base.image, label_names=base.label_names,
                 num_classes=base.num_classes, index_field=None, image_field=base.image_field,
                 label_field=base.label_field, key_width=base.key_width,
                 source={"kind": "virtual", "base": str(base.root), "note": "benchmarks/memory: every shard "
                         "is the same synthetic tar; indices are positional (first_index + position)"},
                 root=out)
    out.mkdir(parents=True, exist_ok=True)
    m.save(out / "manifest.json")
    return out


def head_dim(backbone: str) -> int:
    from diet_engine.engine.model import build_backbone  # noqa: PLC0415

    return build_backbone(backbone)[1]


# ---------------------------------------------------------------------------------------- processes


def spawn(spec: dict[str, Any], work: Path, name: str, timeout_s: float, reuse: bool = False) -> dict[str, Any]:
    """Run worker.py on `spec` in a fresh process; its result, or what became of it.

    reuse: return the stored result of an identical spec that ran ok (re-run only what failed).
    """
    spec_path, result_path, log_path = work / f"{name}.spec.json", work / f"{name}.result.json", work / f"{name}.log"
    spec = {**spec, "result": str(result_path)}
    if reuse and spec_path.exists() and result_path.exists():
        old, res = json.loads(spec_path.read_text()), json.loads(result_path.read_text())
        same = {k: v for k, v in old.items() if k != "cap_bytes"} == {k: v for k, v in spec.items() if k != "cap_bytes"}
        if same and res.get("status") == "ok":  # an ok result stays valid under another cap
            return {**res, "reused": True}
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1))
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    env.update(MALLOC_ENV)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.memory.worker", str(spec_path)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out = False
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout_s and not timed_out:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    wall = time.perf_counter() - t0
    if result_path.exists():
        res = json.loads(result_path.read_text())
    elif timed_out:
        res = {"status": "timeout", "error": f"killed after {timeout_s:.0f} s"}
    elif proc.returncode == -signal.SIGKILL:
        res = {"status": "OOM", "error": "killed by SIGKILL (kernel OOM killer?)"}
    else:
        tail = log_path.read_text()[-1500:] if log_path.exists() else ""
        res = {"status": "error", "error": f"exit {proc.returncode}: {tail}"}
    res["wall_s"] = wall
    res["rusage_maxrss_mib"] = rusage.ru_maxrss / 1024
    res["log"] = str(log_path)
    return res


def gpu_total_bytes() -> int | None:
    """Total memory of GPU 0 from nvidia-smi (never creates a CUDA context in this process)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return int(out[0]) * 2**20 if out else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def predicted_oom(method: str, head: int, device: str, gpu_bytes: int | None) -> str:
    """Why a configuration cannot fit before it runs ('' when it may): its O(N) head state alone.

    Only where trying is slow: a dense head is generated on the host (minutes for 10M × 2048) before
    it reaches the GPU. On CPU the memory cap makes the attempt fail at once, so it is measured.
    """
    import psutil  # noqa: PLC0415

    if device == "cuda" and method in ("a", "b") and gpu_bytes and head > gpu_bytes:
        return f"predicted: the head state alone is {head / 2**30:.0f} GiB > {gpu_bytes / 2**30:.0f} GiB GPU"
    host = psutil.virtual_memory().total
    if device == "cuda" and method == "b2" and head > host:
        return f"predicted: the head state alone is {head / 2**30:.0f} GiB > {host / 2**30:.0f} GiB host RAM"
    return ""


def default_cap_gib() -> float:
    import psutil  # noqa: PLC0415

    avail = psutil.virtual_memory().available / 2**30
    return max(1.0, min(20.0, avail - 2.0))


# ---------------------------------------------------------------------------------------- sweep


def sweep(preset: MemoryPreset, work: Path, cap_bytes: int, store_policy: str, log=print,
          reuse: bool = False) -> dict[str, Any]:
    base = prepare_base(preset, work)
    d = head_dim(preset.backbone)
    gpu_bytes = gpu_total_bytes() if preset.device == "cuda" else None
    idle = spawn({"mode": "idle", "cap_bytes": cap_bytes}, work, "idle", 300, reuse)
    idle_mib = float(idle.get("rss_end_mib", idle.get("peak_rss_total_mib", 0.0)))
    log(f"idle process (imports only): RSS {idle_mib:.0f} MiB (peak during imports "
        f"{idle.get('peak_rss_total_mib', float('nan')):.0f} MiB)")
    # JIT caches (numba on CPU, Triton on CUDA) compile on a machine's first run and load from disk
    # afterwards; compiling costs ~0.1 GiB more RSS. Prime them with a throwaway tiny run of each
    # kernel-using configuration so every measured process loads cached code, as any later run does.
    tiny = dataclasses.replace(preset, image_size=8, batch_size=16, warmup_steps=1, measure_steps=1,
                               head_memory_budget_mb=8, num_workers=0)
    tiny_manifest = virtual_manifest(base, 2000, work / "manifest-prime")
    for method in [m for m in ("b", "b2", "c") if m in preset.methods]:
        prime_dir = work / "runs" / f"prime-{method}"
        spec = {"mode": "run", "config": M.run_config(tiny, method, str(tiny_manifest), str(prime_dir)),
                "warmup": 1, "measure": 1, "cap_bytes": cap_bytes, "partial_store": False}
        primed = spawn(spec, work, f"prime-{method}", 300)
        shutil.rmtree(prime_dir, ignore_errors=True)
        log(f"primed JIT caches with a tiny '{method}' run: {primed['status']}")
    kernels_mib = None
    if preset.device == "cpu" and any(m in ("b2", "c") for m in preset.methods):
        idle_k = spawn({"mode": "idle-kernels", "cap_bytes": cap_bytes}, work, "idle-kernels", 300, reuse)
        if idle_k.get("status") == "ok":
            kernels_mib = float(idle_k.get("rss_end_mib", idle_k["peak_rss_total_mib"])) - idle_mib
            log(f"lazy optimizer CPU runtime (numba/LLVM): +{kernels_mib:.0f} MiB")
    measurements = []
    sizes = sorted(preset.sizes)
    for n in sizes:
        manifest = virtual_manifest(base, n, work / f"manifest-n{n}")
        for method in preset.methods:
            if method in M.N_INDEPENDENT and n != sizes[0]:
                continue
            name = f"{method}-n{n}"
            run_dir = work / "runs" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = M.run_config(preset, method, str(manifest), str(run_dir))
            meta: dict[str, Any] = {"method": method, "N": n, "head_analytic_bytes": M.head_bytes(method, n, d)}
            partial = False
            why = predicted_oom(method, meta["head_analytic_bytes"], preset.device, gpu_bytes)
            if why:
                measurements.append({**meta, "status": "OOM", "note": why})
                log(f"{M.SHORT[method]:>18s} N={report.fmt_n(n):>6s}:     OOM ({why})")
                continue
            if method == "c":
                need = M.store_bytes(n, d, preset.shard_size)
                meta["store_full_bytes"] = need
                free = shutil.disk_usage(work).free
                partial = store_policy == "partial" or (store_policy == "auto" and need > free / 2)
                if store_policy == "full" and need > free:
                    measurements.append({**meta, "status": "skipped",
                                         "note": f"full store needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"})
                    continue
            spec = {"mode": "run", "config": cfg, "warmup": preset.warmup_steps, "measure": preset.measure_steps,
                    "cap_bytes": cap_bytes, "partial_store": partial}
            res = spawn(spec, work, name, preset.timeout_s, reuse)
            shutil.rmtree(run_dir, ignore_errors=True)  # the disk store (GBs)
            res.update(meta)
            if method == "c":
                res["note"] = ("store: only touched chunks created" if partial else "store: all chunks created")
            measurements.append(res)
            key = report.primary_key(preset.device)
            val = res.get(key)
            log(f"{M.SHORT[method]:>18s} N={report.fmt_n(n):>6s}: {res['status']:>7s} "
                + (f"{val:9.0f} MiB" if isinstance(val, (int, float)) else "")
                + ("  (reused)" if res.get("reused") else f"  ({res['wall_s']:.0f} s)"))
    return {"idle": idle, "idle_mib": idle_mib, "kernels_mib": kernels_mib, "measurements": measurements,
            "head_dim": d}


def run(args: argparse.Namespace) -> int:
    preset = dataclasses.replace(PRESETS[args.preset])
    if args.sizes:
        preset.sizes = tuple(int(float(s)) for s in args.sizes.split(","))
    if args.methods:
        preset.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in preset.methods if m not in M.OVERRIDES]
        if bad:
            raise ValueError(f"--methods: unknown {bad}; expected some of {list(M.OVERRIDES)}")
    for field in ("batch_size", "image_size", "warmup_steps", "measure_steps", "backbone", "device", "precision"):
        v = getattr(args, field, None)
        if v not in (None, ""):
            setattr(preset, field, type(getattr(preset, field))(v))
    if preset.device == "cuda":
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise ValueError(f"--preset {preset.name} needs a CUDA GPU and none is visible; "
                             "use --preset cpu-resnet18 (or --device cpu)")
    out = Path(args.out or RESULTS)
    work = Path(args.work or (REPO / "benchmarks" / "_work" / "memory"))  # git-ignored scratch
    work.mkdir(parents=True, exist_ok=True)
    cap_gib = args.mem_cap_gib if args.mem_cap_gib is not None else (default_cap_gib() if preset.device == "cpu" else 0)
    cap_bytes = int(cap_gib * 2**30)
    print(f"memory sweep '{preset.name}': {preset.backbone} {preset.image_size}px B={preset.batch_size} "
          f"{preset.precision} on {preset.device}; N={list(preset.sizes)}; methods={list(preset.methods)}; "
          f"cap={'none' if not cap_bytes else f'{cap_gib:.1f} GiB'}", flush=True)
    t0 = time.perf_counter()
    res = sweep(preset, work, cap_bytes, args.disk_store, log=lambda s: print(s, flush=True), reuse=args.reuse)
    wall = time.perf_counter() - t0
    rows = report.build_rows(res["measurements"], res["idle_mib"], preset.device)
    bars = report.check_bars(rows, res["idle_mib"], preset.device, preset.batch_size, res["kernels_mib"])
    name = args.name or f"memory_{preset.name}"
    out.mkdir(parents=True, exist_ok=True)
    report.plot(rows, out / f"{name}.png", preset.device,
                f"{preset.backbone} {preset.image_size}px B={preset.batch_size} {preset.precision} on "
                f"{preset.device} — peak memory vs N", cap_mib=cap_bytes / 2**20 if cap_bytes else None)
    write_csv(out / f"{name}.csv", rows)
    metric = ("peak GPU memory allocated during the measured steps" if preset.device == "cuda"
              else "peak process RSS (VmHWM) during the measured steps")
    body = (
        f"Metric: {metric}, after {preset.warmup_steps} warm-up step(s), over {preset.measure_steps} step(s); "
        f"each configuration in a fresh process. Idle process (same imports, nothing built): "
        f"{res['idle_mib']:.0f} MiB RSS (the 'net' column subtracts it)"
        + (f"; the lazy optimizer's CPU runtime (numba + LLVM, loaded on first use by (b') and (c) only) adds "
           f"{res['kernels_mib']:.0f} MiB" if res.get("kernels_mib") is not None else "")
        + ". Memory cap (RLIMIT_DATA): "
        f"{'none' if not cap_bytes else f'{cap_gib:.1f} GiB'}. Head d = {res['head_dim']}.\n\n"
        + report.markdown(rows, bars, preset.device)
        + f"\nPlot: `{name}.png`. Sweep wall time {wall / 60:.1f} min.\n"
    )
    config = {**dataclasses.asdict(preset), "mem_cap_gib": round(cap_gib, 2), "disk_store": args.disk_store,
              "data": "one synthetic shard of R images behind a virtual manifest of N samples (harness.py)",
              "optimizer": "AdamW lr 1e-3 wd 0.05 (backbone and head)", "label_smoothing": 0.8,
              "simclr": "2-layer projector 2048-128, τ = 0.2", "augmentation": "strength 1 (crop + flip)",
              "malloc_env": MALLOC_ENV}
    path = write_report(name, f"Memory: DIET vs s-DIET vs SimCLR vs supervised ({preset.name})", body,
                        machine_stamp(preset.device), config, rows,
                        extra={"bars": bars, "idle": res["idle"], "raw": res["measurements"]}, out_dir=out)
    print(body)
    print(f"wrote {path}")
    if not args.keep_work:
        for p in work.glob("runs"):
            shutil.rmtree(p, ignore_errors=True)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu-resnet18", choices=sorted(PRESETS),
                   help="backbone / image size / batch / precision / N values (default cpu-resnet18)")
    p.add_argument("--sizes", default="", help="comma-separated N values (overrides the preset), e.g. 50e3,1.28e6")
    p.add_argument("--methods", default="", help=f"comma-separated subset of {','.join(M.OVERRIDES)}")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--image-size", dest="image_size", type=int, default=None)
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=None)
    p.add_argument("--measure-steps", dest="measure_steps", type=int, default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"])
    p.add_argument("--mem-cap-gib", type=float, default=None,
                   help="per-process data-segment cap (default on CPU: min(20, available − 2) GiB; GPU: none)")
    p.add_argument("--disk-store", default="auto", choices=["auto", "full", "partial"],
                   help="s-DIET store files: all chunks, only touched ones, or auto (full if ≤ half the free disk)")
    p.add_argument("--out", default="", help="results folder (default benchmarks/results)")
    p.add_argument("--work", default="",
                   help="scratch folder: shards, manifests, head stores (default benchmarks/_work/memory)")
    p.add_argument("--name", default="", help="result file stem (default memory_<preset>)")
    p.add_argument("--keep-work", action="store_true", help="keep the run folders in the scratch folder")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the stored results of identical configurations that ran ok; re-run the rest")


main = cli_main(__doc__, add_arguments, run)
