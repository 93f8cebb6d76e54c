"""Preemption and automatic resume of the real `diet train`: a signal stops the run at a step
boundary with a checkpoint and exit status 75; `--train.resume=auto` continues it; the result equals
an uninterrupted run (the SIGKILL tests' standard: backbone, exported head and, for the disk head,
the raw store, to fp32 tolerance).

One rank: SIGTERM to the `diet train` process (memory and disk heads), once with a second SIGTERM
while it stops. Two ranks: `diet launch --nproc_per_node 2` (DeepSpeed's launcher, gloo CPU ranks)
gets SIGTERM as `srun` would pass it; it forwards the signal to the rank processes, which agree on
the step, checkpoint and exit 75, and the launcher returns 75.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.conftest import latest_step, logged_steps

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 24, 10


def _args(digits_dir: Path, run: Path, store: str, resume: str) -> list[str]:
    return ["train", "--no-eval", f"--data.manifest={digits_dir}/train", "--data.eval_train_manifest=",
            "--data.eval_test_manifest=", "--data.prepare_digits=false", "--data.image_size=8",
            "--data.crop_scale_min=0.5", "--model.backbone=resnet18", "--train.batch_size=32",
            "--train.epochs=2", f"--train.max_steps={STEPS}", f"--train.checkpoint_every={EVERY}",
            "--train.log_every=1", "--train.progress=false", f"--head.store={store}", f"--train.run_dir={run}",
            f"--train.resume={resume}", "--train.device=cpu"]


def _start(args: list[str], log: Path, ranks: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "diet_engine.launch.cli"]
    if ranks > 1:
        cmd += ["launch", "--nproc_per_node", str(ranks), "--master_port", str(_port())]
    return subprocess.Popen([*cmd, *args], cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final(run: Path, out: Path, store: str, ranks: int) -> dict[str, dict]:
    import zarr
    from safetensors.torch import load_file

    from diet_engine.launch.head import export_head

    state = {"backbone": load_file(str(run / "backbone.safetensors")),
             "head": {"exported": zarr.open_group(str(export_head(run, out)), mode="r")["weight"][:]}}
    if store == "disk":
        for r in range(ranks):
            g = zarr.open_group(str(run / ("head.zarr" if ranks == 1 else f"head-rank{r}.zarr")), mode="r")
            state[f"store{r}"] = {k: g[k][:] for k in ("weight", "exp_avg", "exp_avg_sq", "step")}
    return state


def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want)
    for group in want:
        for k, w in want[group].items():
            g, w = torch.as_tensor(np.asarray(got[group][k])), torch.as_tensor(np.asarray(w))
            if not w.is_floating_point():
                assert torch.equal(g, w), f"{what}: {group}/{k}"
                continue
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()),
                                       msg=lambda m, k=k, group=group: f"{what}: {group}/{k}\n{m}")


@pytest.mark.parametrize(("store", "ranks", "twice"),
                         [("memory", 1, False), ("disk", 1, True), ("memory", 2, False), ("disk", 2, False)],
                         ids=["memory-1rank", "disk-1rank-signalled-twice", "memory-2ranks", "disk-2ranks"])
def test_sigterm_checkpoints_and_auto_resume_equals_uninterrupted(digits_dir, tmp_path, store, ranks, twice):
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    log = tmp_path / "train.log"
    # uninterrupted; --train.resume=auto on a folder that does not exist starts the run
    assert _start(_args(digits_dir, ref_run, store, "auto"), log, ranks).wait(600) == 0, log.read_text()[-3000:]
    want = _final(ref_run, tmp_path / "ref-head.zarr", store, ranks)

    proc = _start(_args(digits_dir, run, store, "auto"), log, ranks)
    while proc.poll() is None and logged_steps(run) < 13:  # past the step-10 checkpoint
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    if twice:
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # while it finishes the step or writes the checkpoint
    rc = proc.wait(600)
    text = log.read_text()
    assert rc == 75, f"exit {rc}, expected 75 (preempted):\n{text[-3000:]}"
    stopped = latest_step(run)
    assert 13 <= stopped < STEPS and stopped % EVERY, f"checkpoint at step {stopped}: the step it was on"
    assert logged_steps(run) == stopped  # every rank stopped at the checkpointed step
    assert f"stopped by SIGTERM at step {stopped}" in text
    assert not (run / "backbone.safetensors").exists()  # an unfinished run exports nothing
    if twice:
        assert "received again: already stopping" in text

    assert _start(_args(digits_dir, run, store, "auto"), log, ranks).wait(600) == 0, log.read_text()[-3000:]
    assert latest_step(run) == STEPS
    _assert_equal(_final(run, tmp_path / "head.zarr", store, ranks), want, f"{store}, {ranks} rank(s)")
