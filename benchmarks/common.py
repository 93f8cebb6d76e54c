"""What every benchmark leaves behind: a stamp (machine, versions, config) and tables (Markdown + CSV).

Benchmarks are programs, not tests: they measure, write `benchmarks/results/<name>.{md,csv,json,png}`
and print the Markdown table. Ratios are always against a baseline measured in the same run.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine_stamp(device: str | None = None) -> dict[str, Any]:
    """Hardware, library versions and time of a measurement (cheap; imports torch)."""
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
    for lib in ("torchvision", "deepspeed", "numpy", "zarr"):
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
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
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
