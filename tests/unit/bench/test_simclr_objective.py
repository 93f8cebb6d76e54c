"""NT-Xent against the SimCLR paper's definition, the two-view layout, and the baseline objectives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diet_engine.engine.objectives import (
    DietObjective,
    SimclrObjective,
    SupervisedObjective,
    build_objective,
    num_classes_of,
)
from diet_engine.engine.simclr import TwoViews, nt_xent, nt_xent_reference, stack_views


@pytest.mark.parametrize("b,p,tau", [(1, 3, 0.5), (5, 7, 0.2), (13, 16, 0.07)])
def test_nt_xent_matches_reference_forward_and_gradient(b, p, tau):
    g = torch.Generator().manual_seed(b * 100 + p)
    z = torch.randn(2 * b, p, generator=g, dtype=torch.float64) * 3  # unnormalised on purpose
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    ours, ref = nt_xent(z1, tau), nt_xent_reference(z2, tau)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-5, atol=1e-6)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-4, atol=1e-6)


def test_nt_xent_perfect_pairs_beat_random_and_rejects_odd_rows():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 32, generator=g)
    aligned = nt_xent(torch.cat([a, a]), 0.2)
    shuffled = nt_xent(torch.cat([a, a[torch.randperm(8, generator=g)]]), 0.2)
    assert aligned < shuffled
    with pytest.raises(ValueError, match="even"):
        nt_xent(torch.randn(5, 3), 0.2)


def test_stack_views_is_view_major():
    x = torch.arange(3 * 2).float().view(3, 2, 1, 1, 1)  # sample i, view v → 2i + v
    assert stack_views(x).flatten().tolist() == [0, 2, 4, 1, 3, 5]  # views 0 of all, then views 1
    with pytest.raises(ValueError, match="multi-view"):
        stack_views(torch.zeros(3, 1, 4, 4))


def test_two_views_are_independent_augmentations():
    torch.manual_seed(0)
    t = TwoViews(lambda img: img + torch.randn(()))
    out = t(torch.zeros(3, 4, 4))
    assert out.shape == (2, 3, 4, 4)
    assert not torch.equal(out[0], out[1])


class _FakeEngine(nn.Module):
    """Stands in for the DeepSpeed engine: engine(x) = model(x)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, out_dim))

    def forward(self, x):
        return self.net(x)


def test_simclr_objective_runs_both_views_through_the_engine():
    torch.manual_seed(0)
    engine = _FakeEngine(3 * 4 * 4, 10)
    obj = SimclrObjective(10, hidden=16, out_dim=8, temperature=0.2)
    seen = []
    engine.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    x = torch.randn(6, 2, 3, 4, 4)
    loss = obj.loss(engine, x, np.arange(6), None, 1, None)
    assert seen == [torch.Size([12, 3, 4, 4])]  # one backbone call on 2B images
    loss.backward()
    assert all(p.grad is not None for p in obj.projector.parameters())
    assert engine.net[1].weight.grad is not None
    with pytest.raises(ValueError, match="two views"):
        obj.loss(engine, torch.randn(6, 3, 4, 4), np.arange(6), None, 1, None)


def test_supervised_objective_is_cross_entropy_of_a_linear_classifier():
    torch.manual_seed(0)
    engine = _FakeEngine(12, 5)
    obj = SupervisedObjective(5, 3)
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 2, 1, 2])
    loss = obj.loss(engine, x, np.arange(4), y, 1, None)
    ref = nn.functional.cross_entropy(obj.classifier(engine(x)), y)
    torch.testing.assert_close(loss, ref)
    with pytest.raises(ValueError, match="labels"):
        obj.loss(engine, x, np.arange(4), None, 1, None)
    with pytest.raises(ValueError, match="no label"):
        obj.loss(engine, x, np.arange(4), torch.tensor([0, -1, 1, 2]), 1, None)


def test_build_objective_per_method():
    from diet_engine.engine.config import RunConfig

    class _Model:
        out_dim = 7

    class _Manifest:
        label_names = [str(i) for i in range(4)]

    cfg = RunConfig()
    assert isinstance(build_objective(cfg, _Model(), _Manifest(), "cpu"), DietObjective)
    cfg.train.method = "simclr"
    cfg.train.simclr_projector_hidden, cfg.train.simclr_projector_out = 9, 5
    obj = build_objective(cfg, _Model(), _Manifest(), "cpu")
    assert isinstance(obj, SimclrObjective)
    assert obj.projector[0].in_features == 7 and obj.projector[-1].out_features == 5
    assert obj.temperature == cfg.train.simclr_temperature == 0.2
    cfg.train.method = "supervised"
    obj = build_objective(cfg, _Model(), _Manifest(), "cpu")
    assert obj.classifier.out_features == 4
    cfg.train.num_classes = 11
    assert build_objective(cfg, _Model(), _Manifest(), "cpu").classifier.out_features == 11
    with pytest.raises(ValueError, match="num_classes"):
        num_classes_of(object())
