"""`diet train --train.method=simclr|supervised` end to end: same loader, backbone and DeepSpeed path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.integration.conftest import tiny_config

pytestmark = pytest.mark.integration


def test_simclr_cli_end_to_end(digits_dir, tmp_path):
    run = tmp_path / "simclr"
    cmd = [sys.executable, "-m", "diet_engine.launch.cli", "train", "--train.method=simclr",
           f"--data.manifest={digits_dir}/train",
           "--data.image_size=8", "--train.batch_size=16", "--train.max_steps=3", "--train.log_every=1",
           "--train.simclr_projector_hidden=32", "--train.simclr_projector_out=16",
           f"--train.run_dir={run}", "--train.progress=false", "--no-eval"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["method"] == "simclr" and cfg["train"]["simclr_temperature"] == 0.2
    lines = (run / "metrics.csv").read_text().splitlines()
    assert len(lines) == 4  # header + 3 steps
    losses = [float(line.split(",")[1]) for line in lines[1:]]
    assert all(0 < v < 10 for v in losses)  # NT-Xent of 2·16 views: log(31) ≈ 3.4 at chance
    assert (run / "backbone.safetensors").is_file()
    assert not (run / "head.zarr").exists()


def test_simclr_projector_is_owned_and_stepped_by_deepspeed(digits_dir, tmp_path):
    from diet_engine.engine.trainer import Trainer

    cfg = tiny_config(digits_dir, tmp_path / "r", train__method="simclr", train__max_steps=2,
                      train__simclr_projector_hidden=32, train__simclr_projector_out=16)
    trainer = Trainer(cfg)
    try:
        assert trainer.head is None
        proj = trainer.engine.module.objective.projector
        in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert all(id(p) in in_opt for p in proj.parameters())
        before = proj[0].weight.detach().clone()
        x, idx = next(iter(trainer.loader.epoch(0)))
        assert x.shape == (len(idx), 2, 3, 8, 8)  # two views per sample from the loader
        trainer.train()
        assert not torch.equal(before, proj[0].weight.detach())
    finally:
        trainer.close()


def test_supervised_trains_a_linear_classifier_on_labels(digits_dir, tmp_path):
    from diet_engine.launch.train import train_and_evaluate

    cfg = tiny_config(digits_dir, tmp_path / "sup", train__method="supervised", train__max_steps=3,
                      train__log_every=1)
    result = train_and_evaluate(cfg, evaluate=False)
    assert result["steps"] == 3 and 0 < result["final_loss"] < 5  # CE over 10 classes: log(10) ≈ 2.3
