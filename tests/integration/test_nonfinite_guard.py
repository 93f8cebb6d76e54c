"""The non-finite guard: a step whose loss or gradients are NaN is skipped with nothing applied
(backbone, head rows, moments and stamps), counted in metrics.csv; a persistent NaN stops the run
with the last checkpoint intact."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import tiny_config

pytestmark = pytest.mark.integration


def _poison(trainer, bad, where: str) -> None:
    """The loss, or only the gradients, of an attempt at step t are NaN when `bad(t, attempt)`."""
    loss, attempts = trainer.objective.loss, Counter()

    def poisoned(engine, x, index, labels, t, head):
        out = loss(engine, x, index, labels, t, head)
        attempts[t] += 1
        if not bad(t, attempts[t]):
            return out
        if where == "loss":
            return out * float("nan")
        p = next(trainer.engine.module.parameters())
        return out + 0.0 * torch.sqrt(p.sum() * 0.0)  # value unchanged; d sqrt(0) = inf, × 0: NaN gradients

    trainer.objective.loss = poisoned


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    state = {f"model/{k}": v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    state["optimizer"] = torch.cat([s.flatten() for st in trainer.optimizer.state.values()
                                    for s in st.values() if torch.is_tensor(s)] or [torch.zeros(0)])
    b = trainer.head.store.read_rows(torch.arange(trainer.head.num_rows).numpy())
    state |= {"head/weight": b.weight, "head/exp_avg": b.exp_avg, "head/exp_avg_sq": b.exp_avg_sq, "head/step": b.step}
    return state


@pytest.mark.parametrize(("store", "where"), [("memory", "loss"), ("disk", "loss"), ("memory", "grads")])
def test_a_nonfinite_step_is_skipped_and_counted(digits_dir, tmp_path, store, where):
    from diet_engine.engine.trainer import Trainer

    cfg = tiny_config(digits_dir, tmp_path / "run", head__store=store, train__max_steps=8, train__log_every=1,
                      train__epochs=2)
    tr = Trainer(cfg)
    _poison(tr, lambda t, attempt: t == 4 and attempt == 1, where)  # step 4's first batch only
    seen, step = [], tr.train_step

    def watched(batch):
        before = _snapshot(tr) if tr.step == 3 and not seen else None
        out = step(batch)
        if before is not None:
            seen.append((out, tr.step, before, _snapshot(tr)))
        return out

    tr.train_step = watched
    result = tr.train()
    tr.close()
    out, step_after, before, after = seen[0]
    assert out is None and step_after == 3  # not applied: still 3 steps done
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a skipped step"
    assert result["steps"] == 8 and result["nonfinite_skipped"] == 1
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [int(float(r["nonfinite_skipped"])) for r in rows] == [0, 0, 0] + [1] * 5


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_persistent_nan_stops_with_the_last_checkpoint_intact(digits_dir, tmp_path, store):
    from diet_engine.engine.stopping import TrainingDivergedError
    from diet_engine.engine.trainer import Trainer

    run = tmp_path / "run"
    cfg = tiny_config(digits_dir, run, head__store=store, train__max_steps=20, train__checkpoint_every=5,
                      train__max_nonfinite_steps=2, train__epochs=2)
    tr = Trainer(cfg)
    _poison(tr, lambda t, attempt: t >= 7, "loss")
    digest = {}
    save = tr.save_checkpoint

    def watched_save():
        out = save()
        digest.update(_digest(run / "checkpoints"))
        return out

    tr.save_checkpoint = watched_save
    with pytest.raises(TrainingDivergedError, match=r"3 steps in a row .*step_00000005\) is intact"):
        tr.train()
    tr.close()
    assert tr.step == 6 and tr.nonfinite_skipped == 3
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    assert _digest(run / "checkpoints") == digest  # nothing written after the step-5 checkpoint
    assert not (run / "backbone.safetensors").exists()
    # the run resumes from it (e.g. with a lower learning rate, accepted explicitly)
    cfg2 = tiny_config(digits_dir, run, head__store=store, train__max_steps=8, train__checkpoint_every=5,
                       train__epochs=2, train__resume=True)
    tr2 = Trainer(cfg2)
    assert tr2.step == 5 and tr2.nonfinite_skipped == 0  # the count as of the step-5 checkpoint
    tr2.train()
    tr2.close()
    assert tr2.step == 8
