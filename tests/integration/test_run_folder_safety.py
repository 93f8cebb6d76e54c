"""A full disk and a second trainer on a busy run folder, end to end through `diet train`.

* A second `diet train` (to resume or to overwrite) on the folder of a running one is refused
  with one error line, and the first run finishes untouched.
* A disk that fills up while a checkpoint is written (a small tmpfs; needs root to mount) ends
  the run with one error line naming the last complete checkpoint and leaves no half-written
  checkpoint; once there is space again, `--resume` finishes the run bit-identically to one that
  never ran out (backbone and exported head), and the head store verifies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.integration


def _cmd(digits_dir, run, *extra):
    return [sys.executable, "-m", "diet_engine.launch.cli", "train", "--no-eval", f"--data.manifest={digits_dir}/train",
            "--data.eval_train_manifest=", "--data.eval_test_manifest=", "--data.image_size=8",
            "--model.backbone=resnet18", "--train.batch_size=64", "--train.epochs=1", "--train.max_steps=6",
            "--train.checkpoint_every=3", "--train.keep_checkpoints=5", "--train.progress=false",
            "--head.store=disk", f"--train.run_dir={run}", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _final(run, out):
    import zarr

    from diet_engine.launch.head import export_head

    head = zarr.open_group(str(export_head(run, out)), mode="r")["weight"][:]
    return load_file(str(run / "backbone.safetensors")), head


@pytest.fixture(scope="module")
def reference(digits_dir, tmp_path_factory):
    """An uninterrupted run."""
    base = tmp_path_factory.mktemp("safety-reference")
    out = subprocess.run(_cmd(digits_dir, base / "run"), env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return _final(base / "run", base / "head.zarr")


def test_second_trainer_refused_while_the_first_runs(digits_dir, tmp_path):
    run = tmp_path / "run"
    long = ["--train.epochs=30", "--train.max_steps=600", "--train.checkpoint_every=0"]
    first = subprocess.Popen(_cmd(digits_dir, run, *long), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not (run / "metrics.csv").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        for extra in (["--resume"], ["--overwrite"]):
            second = subprocess.run(_cmd(digits_dir, run, *long, *extra), env=_env(), capture_output=True, text=True,
                                    timeout=600)
            refused = [line for line in second.stderr.splitlines() if line.startswith("diet train: error:")]
            assert second.returncode == 2 and refused and "in use by another trainer" in refused[0], \
                second.stderr[-2000:]
            assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first trainer ended before the second ones were refused"
        assert (run / "config.json").exists() and (run / "metrics.csv").exists() and (run / "head.zarr").is_dir()
    finally:
        first.kill()
        first.wait()


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    # a 128 MB checkpoint fits once beside the 11 MB head store; the second one does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_checkpoint_loses_nothing(digits_dir, tmp_path, small_disk, reference):
    run = small_disk / "run"
    out = subprocess.run(_cmd(digits_dir, run), env=_env(), capture_output=True, text=True, timeout=900)
    errors = [line for line in out.stderr.splitlines() if line.startswith("diet train: error:")]
    assert out.returncode == 2 and errors, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "No space left" in errors[0] and "step_00000003" in errors[0], errors[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000003"]  # no half-written one
    subprocess.run(["mount", "-o", "remount,size=1g", str(small_disk)], check=True)  # space again
    again = subprocess.run(_cmd(digits_dir, run, "--resume"), env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    verify = subprocess.run([sys.executable, "-m", "diet_engine.launch.cli", "head", "verify", "--run", str(run),
                             "--no-progress"], env=_env(), capture_output=True, text=True, timeout=600)
    assert verify.returncode == 0 and "ok: 1437 rows" in verify.stdout, verify.stderr[-2000:]
    backbone, head = _final(run, tmp_path / "head.zarr")
    ref_backbone, ref_head = reference
    for k in ref_backbone:
        assert np.array_equal(backbone[k].numpy(), ref_backbone[k].numpy()), k
    assert np.array_equal(head, ref_head)
