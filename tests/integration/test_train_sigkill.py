"""SIGKILL the real `diet train --head.store=disk`, resume until done, compare with an uninterrupted run.

Each trial runs `python -m diet_engine.launch.cli train` (ResNet-18, 8 px digits, B = 32, 40 steps, a checkpoint
every 6) in a subprocess and kills it with SIGKILL, either at a random moment (a random number of
logged steps, then a random fraction of a step) or inside a chosen window through the test-only
hook of storage/faults.py (`DIET_FAULT_KILL`): mid-scatter of head rows (rows torn on disk), after
the head commit but before the checkpoint's rename, and after the rename but before `latest`; and,
with the head in RAM (`--head.store=memory`), mid-write of the checkpoint's rows file. It
then restarts the run with `--train.resume=true` until it finishes. The final backbone, the exported
head (`diet head export`) and the raw store (weights, both moments, step stamps) must equal the
uninterrupted run's to fp32 tolerance, and every row must pass its checksum (reads verify them).

Kill moments are drawn from DIET_SIGKILL_SEED (default 0); failure messages name it. The training
processes run with one thread (OMP_NUM_THREADS=1): reproducible and fast on a shared 2-core machine.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.conftest import latest_step, logged_steps

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("DIET_SIGKILL_SEED", "0"))
STEPS, EVERY = 40, 6
ROOT = Path(__file__).resolve().parents[2]


def _cmd(digits_dir: Path, run: Path, resume: bool, store: str = "disk") -> list[str]:
    return [sys.executable, "-m", "diet_engine.launch.cli", "train", "--no-eval", f"--data.manifest={digits_dir}/train",
            "--data.eval_train_manifest=", "--data.eval_test_manifest=", "--data.prepare_digits=false",
            "--data.image_size=8", "--data.crop_scale_min=0.5", "--model.backbone=resnet18",
            "--train.batch_size=32", "--train.epochs=2", f"--train.max_steps={STEPS}",
            f"--train.checkpoint_every={EVERY}", "--train.log_every=1", "--train.progress=false",
            f"--head.store={store}", f"--train.run_dir={run}", f"--train.resume={str(resume).lower()}"]


def _start(digits_dir: Path, run: Path, resume: bool, fault: str | None = None,
           store: str = "disk") -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("DIET_FAULT_KILL", None)
    if fault:
        env["DIET_FAULT_KILL"] = fault
    log = (run.parent / f"{run.name}.log").open("a")
    log.write(f"\n=== {'resume' if resume else 'start'} fault={fault}\n")
    log.flush()
    return subprocess.Popen(_cmd(digits_dir, run, resume, store), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _log_tail(run: Path, n: int = 2500) -> str:
    return (run.parent / f"{run.name}.log").read_text()[-n:]


def _wait(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _kill_after(proc: subprocess.Popen, run: Path, steps: int, delay: float) -> bool:
    """SIGKILL `delay` s after `steps` more steps are logged; True if the kill (not the end) stopped it."""
    target = logged_steps(run) + steps
    while proc.poll() is None and logged_steps(run) < target:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return _wait(proc) == -signal.SIGKILL


def _read_store(path: Path, finished: bool = True) -> dict[str, np.ndarray]:
    """Every row of a store; reading verifies each row's checksum. A finished run's store must not
    hold rows written after its last commit (opening such a store warns: an error here)."""
    from diet_engine.storage.head import ZarrHeadStore

    with warnings.catch_warnings():
        warnings.simplefilter("error" if finished else "ignore")
        store = ZarrHeadStore.open(path, mode="r")
    try:
        b = store.read_rows(np.arange(store.meta.num_rows, dtype=np.int64))
        return {"weight": b.weight.numpy().copy(), "exp_avg": b.exp_avg.numpy().copy(),
                "exp_avg_sq": b.exp_avg_sq.numpy().copy(), "step": b.step.numpy().copy(),
                "commits": np.asarray(store.commits)}
    finally:
        store.close()


def _final_state(run: Path, out: Path, store: str = "disk") -> dict[str, dict]:
    import zarr
    from safetensors.torch import load_file

    from diet_engine.launch.head import export_head

    exported = export_head(run, out)
    state = {"backbone": load_file(str(run / "backbone.safetensors")),
             "head": {"exported": zarr.open_group(str(exported), mode="r")["weight"][:]}}
    if store == "disk":
        state["store"] = _read_store(run / "head.zarr")
    return state


def _assert_equal(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for group in want:
        for k, w in want[group].items():
            g = got[group][k]
            g, w = torch.as_tensor(np.asarray(g)), torch.as_tensor(np.asarray(w))
            msg = f"{what}: {group}/{k} differs from the uninterrupted run (DIET_SIGKILL_SEED={SEED})"
            if not w.is_floating_point():
                assert torch.equal(g, w), msg
                continue
            atol = 1e-6 * float(w.abs().max())
            torch.testing.assert_close(g, w, rtol=1e-5, atol=atol, msg=lambda m, msg=msg: f"{msg}\n{m}")


@pytest.fixture(scope="module")
def reference(digits_dir, tmp_path_factory):
    """One uninterrupted run, shared by every trial."""
    base = tmp_path_factory.mktemp("sigkill-reference")
    run = base / "run"
    rc = _wait(_start(digits_dir, run, resume=False))
    assert rc == 0, f"uninterrupted run failed (rc {rc}):\n{_log_tail(run)}"
    assert latest_step(run) == STEPS
    return _final_state(run, base / "head.zarr")


def _finish(digits_dir: Path, run: Path, what: str, store: str = "disk") -> None:
    rc = _wait(_start(digits_dir, run, resume=True, store=store))
    assert rc == 0, f"{what}: resumed run failed (rc {rc}, DIET_SIGKILL_SEED={SEED}):\n{_log_tail(run)}"
    assert latest_step(run) == STEPS, f"{what}: finished at checkpoint {latest_step(run)}, not {STEPS}"


def test_kill_mid_scatter(digits_dir, tmp_path, reference):
    """Killed while a chunk's rows are half written (new weight, old moments and checksums)."""
    from diet_engine.storage.head import HeadStoreCorruptionError

    rng = random.Random(f"{SEED}-scatter")
    n = rng.randint(2 * EVERY, 3 * EVERY)  # ≥ 1 scatter per step: lands after the first checkpoints
    run = tmp_path / "run"
    rc = _wait(_start(digits_dir, run, resume=False, fault=f"scatter:{n}"))
    what = f"kill at scatter {n}"
    assert rc == -signal.SIGKILL, f"{what}: the run was not killed (rc {rc}):\n{_log_tail(run)}"
    with pytest.raises(HeadStoreCorruptionError):  # the kill did tear rows
        _read_store(run / "head.zarr", finished=False)
    _finish(digits_dir, run, what)
    _assert_equal(_final_state(run, tmp_path / "head.zarr"), reference, what)


def test_kill_mid_checkpoint(digits_dir, tmp_path, reference):
    """Killed after the head commit of step S, before `step_S` is renamed (twice: the first time
    before any checkpoint exists), then after the final save's rename but before `latest` names it."""
    rng = random.Random(f"{SEED}-checkpoint")
    run = tmp_path / "run"
    # 1st: resume finds no checkpoint and must roll the head back to its creation (step 0);
    # 3rd: the final save (step STEPS), renamed but not in `latest`: resume must not take it as done
    faults = ["checkpoint:1", f"checkpoint:{rng.randint(1, 3)}", "latest:final"]
    for i, fault in enumerate(faults):
        if fault == "latest:final":
            fault = faults[i] = f"latest:{len(range(latest_step(run) + EVERY, STEPS, EVERY)) + 1}"
        rc = _wait(_start(digits_dir, run, resume=i > 0, fault=fault))
        what = f"kills at {faults[: i + 1]}"
        assert rc == -signal.SIGKILL, f"{what}: the run was not killed (rc {rc}):\n{_log_tail(run)}"
        # the killed save left a folder newer than `latest`: `.tmp-step_S` (checkpoint) or `step_S` (latest)
        prefix = ".tmp-step_" if fault.startswith("checkpoint") else "step_"
        folders = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert any(p.startswith(prefix) and int(p.rsplit("_", 1)[1]) > latest_step(run) for p in folders), \
            f"{what}: no unfinished {prefix}* newer than latest (step {latest_step(run)}) in {folders}"
    _finish(digits_dir, run, str(faults))
    _assert_equal(_final_state(run, tmp_path / "head.zarr"), reference, str(faults))


def test_kill_at_random_moments(digits_dir, tmp_path, reference):
    """Two kills at random moments (anywhere: forward/backward, scatter, commit, checkpoint, resume)."""
    rng = random.Random(f"{SEED}-random")
    run = tmp_path / "run"
    kills = []
    for i in range(2):
        left = STEPS - latest_step(run)
        steps, delay = rng.randint(1, min(left, 30)), rng.uniform(0.0, 0.3)  # a step takes ~0.2 s
        killed = _kill_after(_start(digits_dir, run, resume=i > 0), run, steps, delay)
        kills.append((steps, round(delay, 3), killed))
    assert any(k for *_, k in kills), f"no kill landed: {kills} (DIET_SIGKILL_SEED={SEED})"
    _finish(digits_dir, run, f"kills {kills}")
    _assert_equal(_final_state(run, tmp_path / "head.zarr"), reference, f"kills (steps, delay, landed) {kills}")


def test_memory_head_kill_mid_rows_file(digits_dir, tmp_path):
    """Head in RAM: killed while a checkpoint's rows file is half written under its temp name, first
    in the run's first checkpoint (resume starts over), then in its second (resume loads the first);
    the finished run equals an uninterrupted one."""
    ref = tmp_path / "ref"
    assert _wait(_start(digits_dir, ref, resume=False, store="memory")) == 0, _log_tail(ref)
    want = _final_state(ref, tmp_path / "ref-head.zarr", "memory")
    run = tmp_path / "run"
    for i, fault in enumerate(["rows:1", "rows:2"]):
        rc = _wait(_start(digits_dir, run, resume=i > 0, fault=fault, store="memory"))
        what = f"memory head, kill at {fault}"
        assert rc == -signal.SIGKILL, f"{what}: the run was not killed (rc {rc}):\n{_log_tail(run)}"
        half = list((run / "checkpoints").glob(".tmp-step_*/.head_rank0.safetensors.tmp"))
        assert half, f"{what}: no half-written rows file in {sorted((run / 'checkpoints').rglob('*'))}"
        assert latest_step(run) == (0 if i == 0 else EVERY), what
    _finish(digits_dir, run, "memory head, kills mid rows file", store="memory")
    assert not list((run / "checkpoints").glob(".tmp-*"))
    _assert_equal(_final_state(run, tmp_path / "head.zarr", "memory"), want, "memory head, kills mid rows file")
