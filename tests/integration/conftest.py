"""Shared fixtures of the integration tests: tiny prepared data sets."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The embedded digits data, prepared once per test session (train/ and test/ shard sets)."""
    from diet_engine.storage.shards import prepare_digits

    out = tmp_path_factory.mktemp("digits")
    prepare_digits(out / "digits", overwrite=True)
    return out / "digits"


def tiny_config(digits_dir, run_dir, **overrides):
    """A seconds-long DIET config on the digits data."""
    from diet_engine.engine.config import RunConfig

    cfg = RunConfig()
    cfg.data.manifest = str(digits_dir / "train")
    cfg.data.eval_train_manifest = str(digits_dir / "train")
    cfg.data.eval_test_manifest = str(digits_dir / "test")
    cfg.data.image_size = 8
    cfg.data.crop_scale_min = 0.5
    cfg.model.backbone = "resnet18"
    cfg.train.batch_size = 32
    cfg.train.epochs = 1
    cfg.train.run_dir = str(run_dir)
    cfg.train.progress = False
    cfg.train.log_every = 5
    cfg.optim.warmup_epochs = 0.5
    cfg.eval.probe_epochs = 5
    for key, value in overrides.items():
        cfg.set(key.replace("__", "."), value)
    return cfg


def logged_steps(run) -> int:
    """Rows in a run's metrics.csv (one per step with log_every=1; a resumed run appends)."""
    try:
        return max(0, len((run / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def latest_step(run) -> int:
    """The step of the checkpoint `checkpoints/latest` names (0: none yet)."""
    f = run / "checkpoints" / "latest"
    return int(f.read_text().strip().removeprefix("step_")) if f.exists() else 0
