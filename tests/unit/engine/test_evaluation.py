"""kNN, linear probe and RankMe on synthetic data with known answers."""

import torch

from diet_engine.engine.evaluation.knn import knn_accuracy, knn_predict
from diet_engine.engine.evaluation.linear_probe import linear_probe_accuracy
from diet_engine.engine.evaluation.rankme import rankme


def _blobs(n_per: int, centers: torch.Tensor, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + noise * torch.randn(n_per, centers.shape[1], generator=g) for c in centers])
    y = torch.arange(len(centers)).repeat_interleave(n_per)
    return x, y


def test_knn_separated_clusters_is_perfect():
    centers = torch.eye(5) * 10
    xtr, ytr = _blobs(40, centers, 0.5, 0)
    xte, yte = _blobs(20, centers, 0.5, 1)
    assert knn_accuracy(xtr, ytr, xte, yte, k=20) == 1.0


def test_knn_weighted_vote_prefers_closer_neighbours():
    # bank: one very close sample of class 1, two far (but within k) samples of class 0
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([1, 0, 0])
    q = torch.tensor([[1.0, 0.05]])
    assert knn_predict(bank, labels, q, k=3, temperature=0.07).item() == 1
    # with a huge temperature all votes weigh the same: the majority (class 0) wins
    assert knn_predict(bank, labels, q, k=3, temperature=1e6).item() == 0


def test_knn_random_labels_is_chance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    y = torch.randint(0, 4, (2000,), generator=g)
    acc = knn_accuracy(x[:1500], y[:1500], x[1500:], y[1500:])
    assert 0.15 < acc < 0.35


def test_linear_probe_linearly_separable_vs_not():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    y = (x @ w).argmax(1)  # linear labels: a probe can reach ~100%
    acc = linear_probe_accuracy(x[:1000], y[:1000], x[1000:], y[1000:], epochs=60)
    assert acc > 0.95
    yr = torch.randint(0, 3, (1200,), generator=g)  # random labels: chance
    acc_r = linear_probe_accuracy(x[:1000], yr[:1000], x[1000:], yr[1000:], epochs=20)
    assert acc_r < 0.5


def test_linear_probe_is_scale_invariant_thanks_to_standardisation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 6, generator=g)
    y = (x[:, 0] > 0).long()
    a = linear_probe_accuracy(x[:500], y[:500], x[500:], y[500:], epochs=30)
    b = linear_probe_accuracy(1e4 * x[:500], y[:500], 1e4 * x[500:], y[500:], epochs=30)
    assert abs(a - b) < 1e-9


def test_rankme_known_ranks():
    q, _ = torch.linalg.qr(torch.randn(100, 100, dtype=torch.float64))
    for k in (1, 5, 32):
        z = q[:, :k] * 3.0  # k equal singular values
        assert abs(rankme(z) - k) < 1e-3 * k
    collapsed = torch.ones(50, 20)
    assert rankme(collapsed) < 1.01
