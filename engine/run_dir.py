"""The run folder: what the engine writes there, what `--overwrite` may delete, what a resume must
find unchanged.

Design note
-----------
* **Marked.** The engine marks a run folder it creates with `.diet-run` (JSON: format version and
  a fingerprint of the training manifest). A folder is taken for a run folder only with that mark,
  or, for runs of earlier versions, with a `config.json` that loads as a run config.
* **Overwrite deletes only what the engine wrote.** `clear_run_dir` refuses a path that can never
  be a run folder (empty, `/`, the home folder, the working directory or one of its parents) and
  a non-empty folder that is not a run folder; in a run folder it deletes the entries of
  `ENGINE_ENTRIES` and leaves everything else (a user's notes, a job script) where it was.
* **One trainer per run folder.** `hold_run_lock` takes an exclusive flock on `.diet-run.lock`
  (rank 0, for the whole run; released when the process ends, also by a crash); a second
  `diet train` on the same folder, to resume or to overwrite it, is refused while the first runs.
* **Resume checks before it writes.** `check_resume` compares the saved config (and the manifest
  fingerprint) with the new one *before* anything in the folder is touched; every option that can
  change the trajectory must be equal, unless the user lists it in `train.allow_changes`. Options
  that cannot change it (`RESUME_FREE`: where to log, how often to checkpoint, how far to run,
  evaluation) may always change.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from diet_engine.engine.config import ConfigError, RunConfig
from diet_engine.storage.head.writer_lock import close_in_forked_children, release_writer_lock

MARKER = ".diet-run"
MARKER_FORMAT = 1
LOCK = ".diet-run.lock"

# Every name the engine writes directly in a run folder (fnmatch patterns); temp names included.
ENGINE_ENTRIES = (
    MARKER, f".{MARKER}.tmp", "config.json", "config.json.tmp", "lr_schedule.npy", ".lr_schedule.npy.tmp",
    "metrics.csv", "tensorboard", "checkpoints", "backbone.safetensors", ".backbone.safetensors.tmp",
    "final_report.json", ".final_report.json.tmp", "final_report.md", "head.zarr", "head-rank*.zarr", LOCK,
    "head-layout.json", "head-layout.json.tmp-*", "head-repartition.json", "head-repartition.json.tmp-*",
    "head*.zarr.repartition-*",
)

# Options a resume may change freely: none of them changes what the resumed run computes.
RESUME_FREE = (
    "train.run_dir", "train.resume", "train.allow_changes", "train.max_steps", "train.checkpoint_every",
    "train.preempt_signal", "train.max_nonfinite_steps",
    "train.keep_checkpoints", "train.log_every", "train.progress", "head.memory_budget_mb",
    "data.eval_train_manifest", "data.eval_test_manifest", "data.prepare_digits", "data.prepare_torchvision", "eval",
)


def _matches(key: str, patterns) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def _unsafe_reason(path: Path) -> str | None:
    """Why `path` can never be a run folder to clear, or None."""
    if not str(path).strip():
        return "the path is empty"
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the file-system root"
    if resolved == Path.home().resolve():
        return "it is the home folder"
    if resolved == cwd or resolved in cwd.parents:
        return "it is the working directory or one of its parents"
    return None


def is_run_dir(path: Path) -> bool:
    """Marked by the engine, or (runs of earlier versions) holding a config.json that loads as a run config."""
    if (path / MARKER).is_file():
        return True
    try:
        RunConfig.load(path / "config.json")
    except (ConfigError, OSError, ValueError):
        return False
    return True


def clear_run_dir(path: str | Path) -> list[str]:
    """`--overwrite`: delete what the engine wrote in run folder `path`; returns the names kept."""
    path = Path(path)
    reason = _unsafe_reason(path)
    if reason:
        raise ConfigError(f"refusing to overwrite run folder {str(path)!r}: {reason}; "
                          "set --train.run_dir to a folder of its own")
    if not path.exists():
        return []
    if not path.is_dir():
        raise ConfigError(f"train.run_dir {path} is a file, not a folder")
    entries = sorted(p.name for p in path.iterdir())
    if entries and not is_run_dir(path):
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise ConfigError(f"refusing to overwrite {path}: it is not a diet run folder (no {MARKER} or config.json; "
                          f"it holds {shown}); choose another --train.run_dir or empty it yourself")
    hold_run_lock(path)  # nobody else trains here while it is cleared
    kept = []
    for name in entries:
        if name == LOCK:
            continue  # held by this process: deleting it would let a second trainer lock a new file
        if not any(fnmatch.fnmatchcase(name, pat) for pat in ENGINE_ENTRIES):
            kept.append(name)
            continue
        p = path / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return kept


def manifest_fingerprint(manifest_path: str | Path) -> str | None:
    """sha256 of the training manifest file (its shards, counts and first indices), or None."""
    p = Path(manifest_path)
    p = p / "manifest.json" if p.is_dir() else p
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError:
        return None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def parse_allow_changes(value: str) -> list[str]:
    """`train.allow_changes`: comma-separated options or sections, each checked to exist."""
    known = _flat(RunConfig().to_dict())
    sections = {k.split(".")[0] for k in known}
    items = [x.strip() for x in value.split(",") if x.strip()]
    for x in items:
        if x not in known and x not in sections:
            raise ConfigError(f"train.allow_changes: unknown option {x!r} (use section.field, e.g. data.num_workers)")
    return items


def config_differences(saved: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """(option, saved value, new value) for every option that differs and is not in RESUME_FREE."""
    a, b = _flat(saved.to_dict()), _flat(new.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _matches(k, RESUME_FREE)]


def resolve_resume(cfg: RunConfig) -> None:
    """`train.resume=auto` becomes 'true' when the run folder holds a run (its config.json), else
    'false'. Call before anything is written to the folder, so that every rank decides alike (the
    ranks write nothing before they have all joined the process group)."""
    if cfg.train.resume == "auto":
        cfg.train.resume = "true" if (Path(cfg.train.run_dir) / "config.json").is_file() else "false"


def check_resume(path: str | Path, cfg: RunConfig) -> None:
    """Refuse, before anything is written, a resume that would not continue the run in `path`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return  # nothing saved yet: the run starts from scratch
    saved = RunConfig.load(path / "config.json")
    allowed = parse_allow_changes(cfg.train.allow_changes)
    marker = read_marker(path)
    now = manifest_fingerprint(cfg.data.manifest)
    same_data = bool(now) and marker.get("manifest_sha256") == now  # the same manifest, maybe moved
    problems = [(k, f"  {k}: {old!r} (run) -> {new!r} (now)") for k, old, new in config_differences(saved, cfg)
                if not _matches(k, allowed) and not (same_data and k == "data.manifest")]
    if marker.get("manifest_sha256") and now and not same_data and not _matches("data.manifest", allowed):
        problems.append(("data.manifest", f"  data.manifest: the manifest at {cfg.data.manifest} changed since the run "
                                          f"started (sha256 {marker['manifest_sha256'][:12]}… -> {now[:12]}…)"))
    if problems:
        raise ConfigError(f"cannot resume {path}: the resumed run would not continue the saved one:\n"
                          + "\n".join(line for _, line in problems)
                          + "\nrestore these options, or accept an inexact resume with "
                          f"--train.allow_changes={','.join(sorted({k for k, _ in problems}))}")


def read_marker(path: str | Path) -> dict:
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def mark_run_dir(path: str | Path, cfg: RunConfig) -> None:
    """Create the run folder and its mark (kept as it is when it exists: it fingerprints the start)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if (path / MARKER).is_file():
        return
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"format": MARKER_FORMAT, "manifest": str(cfg.data.manifest),
                               "manifest_sha256": manifest_fingerprint(cfg.data.manifest)}, indent=2) + "\n")
    os.replace(tmp, path / MARKER)


_LOCKS: dict[str, int] = {}  # resolved run folder -> lock fd held by this process (forked workers close theirs)
os.register_at_fork(after_in_child=_LOCKS.clear)  # (the fds themselves: writer_lock's fork hook)


def hold_run_lock(path: str | os.PathLike) -> bool:
    """Hold the run folder's exclusive lock (creating the folder); True if this call took it,
    False if this process already held it. Raises ConfigError if another process holds it."""
    path = Path(path)
    key = str(path.resolve())
    if key in _LOCKS:
        return False
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        raise ConfigError(f"run folder {path} is in use by another trainer ({holder or 'a running process'}); "
                          "wait for it to finish or stop it first, or choose another --train.run_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    close_in_forked_children(fd)
    _LOCKS[key] = fd
    return True


def release_run_lock(path: str | os.PathLike) -> None:
    fd = _LOCKS.pop(str(Path(path).resolve()), None)
    if fd is not None:
        release_writer_lock(fd)  # (the store's lock helper: closes the fd, forgets it for forks)
