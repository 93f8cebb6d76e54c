"""The paper-check benchmarks' building blocks: toy-model data, theory ratio, gradient cosine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.paper.grad_cosine import SyntheticImages, backbone_grad_cosine
from benchmarks.paper.toy import ToyConfig, ToyData, theory_ratio, train_toy


def test_toy_data_shapes_and_structure():
    cfg = ToyConfig()
    data = ToyData(cfg, torch.Generator().manual_seed(0))
    assert data.u.shape == (cfg.C, cfg.d) and data.v.shape == (cfg.C, cfg.d)
    feats = torch.cat([data.u, data.v]).double()
    torch.testing.assert_close(feats @ feats.T, torch.eye(2 * cfg.C, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.bincount(data.concept).tolist() == [cfg.n // cfg.C] * cfg.C
    x = data.sample(torch.Generator().manual_seed(1))
    assert x.shape == (cfg.n, cfg.d)
    u, v = data.u[data.concept], data.v[data.concept]
    cu, cv = (x * u).sum(1), (x * v).sum(1)  # = 1 + ε_u, 1 + ε_v (ξ is orthogonal to both)
    assert (cu - 1).abs().max() < 6 * cfg.sigma_u and (cv - 1).abs().max() < 6 * cfg.sigma_v
    xi = x - cu[:, None] * u - cv[:, None] * v
    assert xi.norm(dim=1).max() < 6 * cfg.phi
    with pytest.raises(ValueError, match="2C <= d"):
        ToyData(ToyConfig(C=9, d=16), torch.Generator())


def test_toy_theory_ratio_and_short_training():
    assert theory_ratio(ToyConfig()) == pytest.approx(0.0103, abs=2e-4)
    res = train_toy(ToyConfig(steps=40, log_every=10), normalize=True)
    assert res["step"].tolist() == [1, 10, 20, 30, 40]
    assert np.isfinite(res["align_u"]).all() and res["align_u"][-1] > 0


def test_grad_cosine_is_one_when_the_batch_holds_every_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    head = torch.randn(9, 6)
    x = torch.randn(9, 3, 2, 2)
    index = torch.randperm(9)
    for eps in (0.0, 0.8):
        assert backbone_grad_cosine(model, head, x, index, eps) == pytest.approx(1.0, abs=1e-6)
    assert backbone_grad_cosine(model, head, x[:3], index[:3], 0.0) < 1.0


def test_synthetic_images_are_deterministic_per_index():
    imgs = SyntheticImages(1000, 4)
    a, b = imgs[torch.tensor([3, 7])], imgs[torch.tensor([7])]
    assert a.shape == (2, 3, 4, 4) and torch.equal(a[1], b[0]) and len(imgs) == 1000
