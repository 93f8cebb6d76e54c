"""The one helper module of the benchmarks: what every benchmark leaves behind, and how it measures.

Benchmarks are programs, not tests: they measure, write `benchmarks/results/<name>.{md,csv,json,png}`
and print the Markdown table. Ratios are always against a baseline measured in the same run.

    stamp     machine_stamp (hardware, versions, git commit), disk_stamp, load_average
    tables    markdown_table, write_csv, write_report (Markdown + JSON with stamp and config)
    measuring evict (page cache), raw_sequential_bandwidth (the disk's own speed), TreeRSS (peak RSS)

Every benchmark module has `add_arguments(parser)` and `run(args) -> int` (what `diet bench NAME`
calls, see launch/bench.py) and `main(argv)` for `python -m benchmarks.<group>.<name>`.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent  # the repository (a source checkout)
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "_work"  # git-ignored scratch space
GB = 1e9


def cli_main(doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int]) -> Callable[[list[str] | None], int]:
    """A benchmark program's `main(argv)`: its docstring's first paragraph as the description, its
    options, its run (the same options `diet bench NAME` gives it)."""

    def main(argv: list[str] | None = None) -> int:
        p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
        add_arguments(p)
        return run(p.parse_args(argv))

    return main


def machine_stamp(device: str | None = None) -> dict[str, Any]:
    """Hardware, library versions and time of a measurement (imports torch; stamps the optional
    libraries that are installed)."""
    import psutil  # noqa: PLC0415
    import torch  # noqa: PLC0415

    stamp: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        stamp["gpu"] = torch.cuda.get_device_name(0)
        stamp["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        stamp["cuda"] = torch.version.cuda
    for lib in ("torchvision", "deepspeed", "numpy", "zarr", "numba", "triton"):
        try:
            stamp[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is just not stamped
            pass
    return stamp


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    """HEAD's short hash (read-only), '+dirty' when the code has changes; '' outside a checkout.

    benchmarks/results/ is left out of the check: a benchmark writes its own tables there before it
    stamps them, and results do not change what was measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if head and dirty else "")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None,
                   align: str | None = None) -> str:
    """A GitHub Markdown table of `rows` (dicts) restricted to `columns`; None/'' shows as '—'."""
    headers = list(headers or columns)
    align = align or "l" + "r" * (len(columns) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(sep) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, float):
        if v != v:  # NaN
            return "—"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    columns = list(columns or _all_keys(rows))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in columns})
    _atomic_write(path, buf.getvalue())


def _all_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    return keys


def stamp_markdown(stamp: dict[str, Any], config: dict[str, Any] | None = None) -> str:
    """Two short bullet lists: the machine/versions, then the benchmark's config."""
    lines = ["**Machine.** " + ", ".join(f"{k}: {v}" for k, v in stamp.items())]
    if config:
        lines.append("")
        lines.append("**Config.** " + ", ".join(f"{k}: {v}" for k, v in config.items()))
    return "\n".join(lines)


def write_report(name: str, title: str, body: str, stamp: dict[str, Any], config: dict[str, Any],
                 rows: Sequence[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
                 out_dir: Path | None = None) -> Path:
    """Write <out>/<name>.md (title, body, stamp) and <name>.json (stamp, config, rows, extra)."""
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    md = f"# {title}\n\n{body.rstrip()}\n\n{stamp_markdown(stamp, config)}\n"
    _atomic_write(out / f"{name}.md", md)
    payload = {"stamp": stamp, "config": config, "rows": list(rows or []), **(extra or {})}
    _atomic_write(out / f"{name}.json", json.dumps(payload, indent=2, default=str) + "\n")
    return out / f"{name}.md"


def _atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------- measuring


def disk_stamp(path: str | Path) -> dict[str, Any]:
    """Mount, file system, block device, rotational flag, size and free space of `path`'s disk."""
    path = os.path.abspath(path)
    best = ("", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fs = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                best = (mnt, dev, fs)
    mnt, dev, fs = best
    usage = shutil.disk_usage(mnt or path)
    out: dict[str, Any] = {"disk_mount": mnt, "disk_device": dev, "disk_fs": fs,
                           "disk_size_gb": round(usage.total / 1e9, 1), "disk_free_gb": round(usage.free / 1e9, 1)}
    block = Path("/sys/class/block") / Path(dev).name
    for key, rel in (("disk_rotational", "queue/rotational"), ("disk_model", "device/model"),
                     ("disk_read_ahead_kb", "queue/read_ahead_kb")):
        for base in (block, block.parent / block.name.rstrip("0123456789")):
            try:
                out[key] = (base / rel).read_text().strip()
                break
            except OSError:
                continue
    return out


def evict(paths: list[str | Path]) -> None:
    """Write back and drop `paths` (files, or folders searched recursively) from the page cache.

    posix_fadvise(DONTNEED) after fdatasync: targeted and unprivileged (no global drop_caches on a
    shared machine). Reads afterwards come from the disk."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else files.append(p)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_average() -> str:
    """1/5/15-minute load averages: other processes competing for the CPUs during the run."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def raw_sequential_bandwidth(folder: Path, gib: float = 4.0, block_mib: int = 16) -> dict[str, float]:
    """dd-like: write `gib` GiB sequentially + fdatasync, evict it from the page cache, read it back.

    Returns write and read bandwidth in bytes/s (buffered I/O, like the store's)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "raw_bandwidth.bin"
    block = np.random.default_rng(0).integers(0, 255, block_mib << 20, dtype=np.uint8).tobytes()
    n = int(gib * 1024 / block_mib)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, block)
        os.fdatasync(fd)
        t_w = time.perf_counter() - t0
        os.close(fd)
        evict([path])
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(block_mib << 20)
        t0 = time.perf_counter()
        while os.readv(fd, [buf]):
            pass
        t_r = time.perf_counter() - t0
        os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    size = n * (block_mib << 20)
    return {"raw_write_Bps": size / t_w, "raw_read_Bps": size / t_r, "raw_bytes": size}


class TreeRSS:
    """Peak resident set of a process and of it plus its children (loader workers), sampled every `period` s.

    `mark()` splits the run in two: `peak_tree_before_mark` and `peak_tree_after_mark` (e.g. training
    steps vs the final checkpoint); before any mark, both stay 0."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        import psutil  # noqa: PLC0415

        self.proc = psutil.Process(pid)
        self.peak_main = self.peak_tree = 0
        self.peak_tree_before_mark = self.peak_tree_after_mark = 0
        self.marked = False
        self._period, self._stop = period, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def mark(self) -> None:
        """From now on, samples count towards `peak_tree_after_mark`."""
        self.peak_tree_before_mark, self.marked = self.peak_tree, True

    def _run(self) -> None:
        import psutil  # noqa: PLC0415

        while not self._stop.is_set():
            try:
                main = self.proc.memory_info().rss
                kids = 0
                for c in self.proc.children(recursive=True):
                    try:
                        kids += c.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:  # exited
                return
            self.peak_main, self.peak_tree = max(self.peak_main, main), max(self.peak_tree, main + kids)
            if self.marked:
                self.peak_tree_after_mark = max(self.peak_tree_after_mark, main + kids)
            time.sleep(self._period)

    def __enter__(self) -> TreeRSS:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
