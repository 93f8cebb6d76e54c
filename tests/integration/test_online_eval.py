"""Online kNN monitor (eval.every_epochs): logged to metrics.csv while training, and it does not
change the training trajectory (same seed: same losses and the same backbone, bit for bit)."""

from __future__ import annotations

import csv

import pytest
import torch

from tests.integration.conftest import tiny_config

pytestmark = pytest.mark.integration


def _train(digits_dir, run_dir, every: int):
    from diet_engine.engine.trainer import Trainer

    cfg = tiny_config(digits_dir, run_dir, train__epochs=2, train__log_every=1, eval__every_epochs=every,
                      eval__online_bank=600, eval__online_queries=200, train__batch_size=128)
    tr = Trainer(cfg)
    try:
        tr.train()
        state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    finally:
        tr.close()
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return rows, state


def test_online_knn_is_logged_and_leaves_the_trajectory_unchanged(digits_dir, tmp_path):
    plain, plain_state = _train(digits_dir, tmp_path / "plain", every=0)
    watched, watched_state = _train(digits_dir, tmp_path / "watched", every=1)

    losses = lambda rows: [(r["step"], r["loss"]) for r in rows if r.get("loss")]  # noqa: E731
    assert losses(watched) == losses(plain) and len(losses(plain)) == 24  # 2 epochs of 12 steps
    assert all(torch.equal(plain_state[k], watched_state[k]) for k in plain_state)

    evals = [r for r in watched if r.get("eval/knn")]
    assert [round(float(r["epoch"])) for r in evals] == [0, 1, 2]  # before training, then every epoch
    assert all(0.3 < float(r["eval/knn"]) <= 1.0 for r in evals)  # 10 classes: chance is 0.1
    assert "eval/knn" not in plain[0]


def test_online_eval_needs_a_query_split(digits_dir, tmp_path):
    from diet_engine.engine.config import ConfigError

    cfg = tiny_config(digits_dir, tmp_path / "run", eval__every_epochs=1, data__eval_test_manifest="")
    with pytest.raises(ConfigError, match="eval.every_epochs"):
        cfg.validate()
