"""One configuration of the memory sweep, in its own fresh process (spawned by harness.py).

    python -m benchmarks.memory.worker SPEC.json

SPEC: {"mode": "run"|"idle"|"idle-kernels", "config": RunConfig sections, "warmup": k, "measure": m,
       "cap_bytes": int|0, "result": path, "partial_store": bool}

The process caps its own data segment (RLIMIT_DATA: every private writable mapping, i.e. all
anonymous memory torch and numpy allocate) before importing anything, builds the real `Trainer`
for the config, runs `warmup` steps, resets the peak counters, runs `measure` steps and writes the
peaks to `result`:

* host: the RSS high-water mark of the measured steps (Linux VmHWM, reset through
  /proc/self/clear_refs) and of the whole process (ru_maxrss, construction included);
* CUDA: torch.cuda.max_memory_allocated / max_memory_reserved over the measured steps.

An allocation beyond the cap (RuntimeError "can't allocate memory", MemoryError,
torch.cuda.OutOfMemoryError) is reported as status "OOM". Checkpointing and backbone export are
skipped (they are not part of a training step, and a dense head's checkpoint is GBs).

`mode: idle` imports the same libraries and stops: the baseline subtracted in the tables.
`mode: idle-kernels` also runs the lazy optimizer once on a few rows: on CPU that loads numba and
LLVM (a fixed ~0.1 GiB of RSS that (b') and (c) carry and the others do not).
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from pathlib import Path

_OOM_PATTERNS = ("can't allocate memory", "not enough memory", "out of memory", "cannot allocate memory")


def _status_kib(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else 0


def _reset_hwm() -> bool:
    """Reset the RSS high-water mark (VmHWM) to the current RSS. Linux ≥ 4.0."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _tree_bytes(root: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of all files under `root`."""
    apparent = allocated = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                st = os.stat(os.path.join(dirpath, f))
            except OSError:
                continue
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def _write(path: str, result: dict) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)


def _import_libraries() -> None:
    """Everything a training run imports before it allocates: the idle baseline imports exactly this."""
    import deepspeed  # noqa: F401, PLC0415
    import torch  # noqa: F401, PLC0415
    import torchvision  # noqa: F401, PLC0415
    import zarr  # noqa: F401, PLC0415  (imported by the disk store when it creates a store)

    import diet_engine.engine.trainer  # noqa: PLC0415
    import diet_engine.storage.head  # noqa: PLC0415  (the disk store)
    import diet_engine.storage.shards  # noqa: F401, PLC0415


def _touched_rows(cfg, steps: int) -> object:
    """Rows the first `steps` batches (+ the head's lookahead) use: the chunks a partial store needs."""
    import numpy as np  # noqa: PLC0415

    from diet_engine.engine.data import build_train_loader, load_manifest  # noqa: PLC0415

    loader = build_train_loader(cfg, load_manifest(cfg.data))
    plan = loader.plan(0)[: steps + cfg.head.lookahead + 2]
    return np.unique(np.concatenate(plan))


def _install_partial_store(rows) -> None:
    """Bench-only: create the disk store's chunk files only for `rows` (the store is still N rows).

    A full store at large N needs 3·N·d·4 bytes of disk (61 GB for N = 10M, d = 512); the store's
    multi-rank `owned_rows` option already creates only some chunks, so the sweep passes the chunks
    its few steps touch. The trainer imports `open_or_create_store` from `storage.head` when it
    builds the head, so replacing the attribute there is enough.
    """
    import diet_engine.storage.head as sh  # noqa: PLC0415

    original = sh.open_or_create_store

    def open_partial(path, meta, **kw):
        kw["owned_rows"] = rows
        return original(path, meta, **kw)

    sh.open_or_create_store = open_partial


def _disable_loader_cache() -> bool:
    """Bench-only: stream every N the same way. The shard loader decodes a data set of ≤ 50k samples
    into RAM once (`_CACHE_MAX_SAMPLES`; +112 MiB at N = 50k, 16 px): a per-data-set cost shared by
    every method, which would make N = 50k look bigger than N = 100k. Returns whether it applied."""
    import diet_engine.storage.shards.loader as loader  # noqa: PLC0415

    if not hasattr(loader, "_CACHE_MAX_SAMPLES"):
        return False
    loader._CACHE_MAX_SAMPLES = 0
    return True


def run(spec: dict) -> dict:
    t_start = time.perf_counter()
    _import_libraries()
    import torch  # noqa: PLC0415

    result: dict = {"status": "ok", "rss_imports_mib": _status_kib("VmRSS") / 1024,
                    "import_s": time.perf_counter() - t_start, "loader_cache_off": _disable_loader_cache()}
    if spec["mode"] == "idle-kernels":  # + the lazy optimizer's CPU runtime (numba, LLVM, cached code)
        import numpy as np  # noqa: PLC0415

        from diet_engine.kernels import LazyAdamW, Rows  # noqa: PLC0415

        opt = LazyAdamW(np.full(16, 1e-3), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, mode="exact")
        w = torch.randn(8, 64)
        m, v, stamps = torch.zeros_like(w), torch.zeros_like(w), torch.zeros(8, dtype=torch.int64)
        opt.catch_up(Rows(w, m, v, stamps), 3)
        opt.step(Rows(w, m, v, stamps), torch.randn_like(w), 3)
    if spec["mode"] in ("idle", "idle-kernels"):
        result["rss_end_mib"] = _status_kib("VmRSS") / 1024  # settled; the peak includes import transients
        result["peak_rss_total_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result

    from diet_engine.engine.config import RunConfig  # noqa: PLC0415
    from diet_engine.engine.trainer import Trainer  # noqa: PLC0415

    warmup, measure = int(spec["warmup"]), int(spec["measure"])
    cfg = RunConfig.from_dict(spec["config"])
    cfg.validate()
    cuda = cfg.train.device == "cuda"
    if spec.get("partial_store") and cfg.head.store == "disk":
        _install_partial_store(_touched_rows(cfg, warmup + measure))
        result["store_files"] = "partial"
    elif cfg.head.store == "disk":
        result["store_files"] = "full"

    class MeasuredTrainer(Trainer):
        """The real trainer; peaks reset after `warmup` steps, read after each measured step."""

        def __init__(self, cfg) -> None:
            self.step_times: list[float] = []
            self.losses: list[float] = []
            self.peak_steps_kib = self.cuda_alloc = self.cuda_reserved = self.rss_between_steps_kib = 0
            super().__init__(cfg)

        def train_step(self, batch):
            if self.step == warmup:
                self.rss_between_steps_kib = _status_kib("VmRSS")  # model, optimizer state, head, caches
                _reset_hwm()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = super().train_step(batch)
            if cuda:
                torch.cuda.synchronize()
            self.step_times.append(time.perf_counter() - t0)
            self.losses.append(float(loss))  # host-device sync
            if self.step > warmup:
                self.peak_steps_kib = max(self.peak_steps_kib, _status_kib("VmHWM"))
                if cuda:
                    self.cuda_alloc = max(self.cuda_alloc, torch.cuda.max_memory_allocated())
                    self.cuda_reserved = max(self.cuda_reserved, torch.cuda.max_memory_reserved())
            return loss

        def save_checkpoint(self):  # not a training step; a dense head's checkpoint is GBs
            pass

        def export_backbone(self):
            return None

    t0 = time.perf_counter()
    trainer = MeasuredTrainer(cfg)
    result["build_s"] = time.perf_counter() - t0
    result["rss_after_build_mib"] = _status_kib("VmRSS") / 1024
    try:
        trainer.train()
    finally:
        if cfg.head.store == "disk":
            store = Path(cfg.head.store_path)
            trainer.close()
            result["disk_apparent_bytes"], result["disk_allocated_bytes"] = _tree_bytes(store)
        else:
            trainer.close()
    times = sorted(trainer.step_times[warmup:]) or [float("nan")]
    result.update(
        peak_rss_steps_mib=trainer.peak_steps_kib / 1024,
        rss_between_steps_mib=trainer.rss_between_steps_kib / 1024,
        peak_rss_total_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        step_s_median=times[len(times) // 2],
        steps_measured=len(trainer.step_times) - warmup,
        loss_last=trainer.losses[-1] if trainer.losses else float("nan"),
        head_dim=int(trainer.model.out_dim),
    )
    if cuda:
        result["cuda_peak_allocated_mib"] = trainer.cuda_alloc / 2**20
        result["cuda_peak_reserved_mib"] = trainer.cuda_reserved / 2**20
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    cap = int(spec.get("cap_bytes") or 0)
    if cap > 0:  # before any import: the cap covers everything this process allocates
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    try:
        result = run(spec)
    except MemoryError as e:
        result = {"status": "OOM", "error": f"MemoryError: {e}"[:500]}
    except Exception as e:  # noqa: BLE001 - classified and reported, never hidden
        msg = f"{type(e).__name__}: {e}"
        oom = type(e).__name__ == "OutOfMemoryError" or any(p in msg.lower() for p in _OOM_PATTERNS)
        result = {"status": "OOM" if oom else "error", "error": msg[:2000]}
        if not oom:
            import traceback  # noqa: PLC0415

            traceback.print_exc()
    result["peak_rss_total_mib"] = result.get("peak_rss_total_mib",
                                              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    _write(spec["result"], result)
    return 0 if result["status"] == "ok" else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
