"""The run folder: `--overwrite` deletes only what the engine wrote, never a folder that is not a
run folder; a resume is refused, before anything is written, when the trajectory would change."""

from __future__ import annotations

import json
import os

import pytest

from diet_engine.engine.config import ConfigError, RunConfig
from diet_engine.engine.run_dir import MARKER, check_resume, clear_run_dir, mark_run_dir


def _manifest(tmp_path, text="{}"):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_text(text)
    return d


def _run(tmp_path, **overrides) -> tuple[RunConfig, os.PathLike]:
    cfg = RunConfig()
    cfg.data.manifest = str(_manifest(tmp_path))
    cfg.train.run_dir = str(tmp_path / "run")
    for k, v in overrides.items():
        cfg.set(k.replace("__", "."), v)
    mark_run_dir(cfg.train.run_dir, cfg)
    cfg.save(tmp_path / "run" / "config.json")
    return cfg, tmp_path / "run"


@pytest.mark.parametrize("where", ["", ".", "..", "/", "~"])
def test_overwrite_refuses_folders_that_are_never_run_folders(tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "thesis.tex").write_text("precious")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        clear_run_dir(os.path.expanduser(where) if where == "~" else where)
    assert (work / "thesis.tex").read_text() == "precious"


def test_empty_run_dir_is_a_config_error():
    cfg = RunConfig()
    cfg.train.run_dir = ""
    with pytest.raises(ConfigError, match="train.run_dir"):
        cfg.validate()


def test_overwrite_refuses_a_folder_that_is_not_a_run_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "checkpoints").mkdir()  # an engine name, but no mark and no run config
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a diet run folder"):
        clear_run_dir(tmp_path / "x")
    assert (tmp_path / "x" / "notes.txt").exists() and (tmp_path / "x" / "checkpoints").is_dir()


def test_overwrite_deletes_only_what_the_engine_wrote(tmp_path):
    _, run = _run(tmp_path)
    for d in ("checkpoints/step_00000005", "head.zarr/weight", "head-rank1.zarr", "tensorboard"):
        (run / d).mkdir(parents=True)
    for f in ("metrics.csv", "lr_schedule.npy", "backbone.safetensors", "final_report.json", "final_report.md",
              ".lr_schedule.npy.tmp", "job.sbatch", "notes.txt"):
        (run / f).write_text("x")
    kept = clear_run_dir(run)
    assert sorted(kept) == ["job.sbatch", "notes.txt"]
    assert sorted(p.name for p in run.iterdir()) == [".diet-run.lock", "job.sbatch", "notes.txt"]  # (lock: held)


def test_a_run_folder_of_an_earlier_version_is_recognised_by_its_config(tmp_path):
    _, run = _run(tmp_path)
    (run / MARKER).unlink()
    (run / "metrics.csv").write_text("step\n")
    assert clear_run_dir(run) == [] and [p.name for p in run.iterdir()] == [".diet-run.lock"]


def test_resume_with_the_same_config_or_free_options_is_accepted(tmp_path):
    cfg, run = _run(tmp_path)
    for key, value in [("train.max_steps", 99), ("train.checkpoint_every", 3), ("train.log_every", 1),
                       ("eval.probe_epochs", 1), ("data.eval_test_manifest", "elsewhere"), ("train.progress", False)]:
        cfg.set(key, value)
    check_resume(run, cfg)


@pytest.mark.parametrize(("key", "value"), [
    ("optim.name", "sgd"), ("train.batch_size", 7), ("train.seed", 3), ("data.num_workers", 2),
    ("train.epochs", 31), ("model.backbone", "resnet50"), ("head.store", "disk"), ("optim.lr", 2e-3),
    ("data.image_size", 32), ("train.precision", "fp64"), ("head.seed", 1),
])
def test_resume_that_changes_the_trajectory_is_refused_with_the_differences(tmp_path, key, value):
    cfg, run = _run(tmp_path)
    before = (run / "config.json").read_bytes()
    cfg.set(key, value)
    cfg.set("train.max_steps", 50)  # free: not listed
    with pytest.raises(ConfigError) as e:
        check_resume(run, cfg)
    assert key in str(e.value) and "train.max_steps" not in str(e.value)
    assert f"--train.allow_changes={key}" in str(e.value)
    assert (run / "config.json").read_bytes() == before
    cfg.set("train.allow_changes", key)  # the explicit escape
    check_resume(run, cfg)
    cfg.set("train.allow_changes", key.split(".")[0])  # a whole section
    check_resume(run, cfg)


def test_allow_changes_names_must_exist(tmp_path):
    cfg, run = _run(tmp_path)
    cfg.set("train.allow_changes", "data.nosuch")
    with pytest.raises(ConfigError, match="data.nosuch"):
        check_resume(run, cfg)


def test_resume_refuses_a_manifest_that_changed_under_the_same_path(tmp_path):
    cfg, run = _run(tmp_path)
    _manifest(tmp_path, json.dumps({"num_samples": 5}))
    with pytest.raises(ConfigError, match="manifest .* changed"):
        check_resume(run, cfg)


def test_resume_accepts_the_same_manifest_moved(tmp_path):
    cfg, run = _run(tmp_path)
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    cfg.data.manifest = str(moved)
    check_resume(run, cfg)


def test_a_second_trainer_on_a_run_folder_in_use_is_refused(tmp_path):
    """`diet train --overwrite` (or --resume) on the folder of a running trainer once deleted or
    wrote over its files; the run lock refuses it while the first holds the folder."""
    import subprocess
    import sys

    from diet_engine.engine.run_dir import hold_run_lock, release_run_lock

    _, run = _run(tmp_path)
    (run / "metrics.csv").write_text("step\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from diet_engine.engine.run_dir import hold_run_lock; "
         f"hold_run_lock({str(run)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by another trainer \\(pid {holder.pid}"):
            hold_run_lock(run)
        with pytest.raises(ConfigError, match="in use"):
            clear_run_dir(run)
        assert (run / "metrics.csv").exists() and (run / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert hold_run_lock(run)  # the holder died: the lock went with it
    assert not hold_run_lock(run)  # held by this process already
    assert clear_run_dir(run) == [] and [p.name for p in run.iterdir()] == [".diet-run.lock"]
    release_run_lock(run)


def test_a_forked_worker_does_not_keep_the_run_folder_locked(tmp_path):
    """A loader worker forked by a trainer that is then killed must not block the resume."""
    import signal
    import subprocess
    import sys
    import time

    from diet_engine.engine.run_dir import hold_run_lock, release_run_lock

    run = tmp_path / "run"
    assert hold_run_lock(run)
    pid = os.fork()
    if pid == 0:  # the "worker": outlives its parent's lock
        time.sleep(30)
        os._exit(0)
    try:
        release_run_lock(run)  # the trainer is gone
        probe = subprocess.run([sys.executable, "-c", "from diet_engine.engine.run_dir import hold_run_lock; "
                                f"print(hold_run_lock({str(run)!r}))"], capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0 and probe.stdout.strip() == "True", probe.stderr[-1000:]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
