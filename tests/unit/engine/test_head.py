"""The head managers against their references (DIET Algorithm 1, torch cross-entropy, dense AdamW)."""

import numpy as np
import pytest
import torch
from torch import nn

from diet_engine.engine.config import OptimConfig
from diet_engine.engine.head import DenseHead, LazyHead, candidate_rows
from diet_engine.engine.optim import head_optimizer_meta
from diet_engine.engine.schedule import warmup_cosine
from diet_engine.storage.head import HeadMeta, MemoryHeadStore, head_init

N, K = 97, 13


def test_candidate_rows_dedups_and_targets():
    idx = np.array([5, 3, 5, 9, 3])
    rows, target = candidate_rows(idx)
    assert rows.tolist() == [3, 5, 9]
    assert (rows[target] == idx).all()
    rows2, target2 = candidate_rows(idx, upcoming=[np.array([1, 5, 40])], extra=5)
    assert rows2.tolist() == [1, 3, 5, 9, 40]
    assert (rows2[target2] == idx).all()


def test_batch_ce_equals_torch_ce_on_gathered_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    z = torch.randn(8, K, generator=g, requires_grad=True)
    idx = np.array([4, 90, 4, 17, 60, 3, 17, 17])
    rows, target = candidate_rows(idx)
    from diet_engine.kernels import batch_cross_entropy

    ours = batch_cross_entropy(z, w[rows], torch.as_tensor(target), 0.8)
    ref = nn.CrossEntropyLoss(label_smoothing=0.8)(z @ w[torch.as_tensor(rows)].T, torch.as_tensor(target))
    torch.testing.assert_close(ours, ref)


def test_full_ce_head_equals_paper_algorithm_1():
    """DenseHead(loss=full) + a backbone == nn.Linear(K, N, bias=False) + CrossEntropyLoss(0.8), step for step."""
    torch.manual_seed(0)
    f_ref = nn.Linear(5, K)
    f_ours = nn.Linear(5, K)
    f_ours.load_state_dict(f_ref.state_dict())
    lrs = np.full(20, 1e-2)
    cfg = OptimConfig()
    head = DenseHead(N, K, lrs, cfg, loss="full", label_smoothing=0.8)
    W = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        W.weight.copy_(head_init(0, 0, N, K))
    diet_loss = nn.CrossEntropyLoss(label_smoothing=0.8)
    opt_ref = torch.optim.AdamW(list(f_ref.parameters()) + list(W.parameters()), lr=1e-2, weight_decay=0.05)
    opt_ours = torch.optim.AdamW(f_ours.parameters(), lr=1e-2, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 21):
        x = torch.randn(16, 5, generator=g)
        n = torch.randint(0, N, (16,), generator=g)
        loss_ref = diet_loss(W(f_ref(x)), n)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        loss = head.loss(f_ours(x), n.numpy(), t)
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()
        head.step(t)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.detach(), W.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_ours.weight, f_ref.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_lazy_memory_head_equals_dense_head(name):
    steps = 40
    lrs = warmup_cosine(5e-2, steps, 5)
    cfg = OptimConfig(name=name, weight_decay=0.05)
    dense = DenseHead(N, K, lrs, cfg, loss="batch", dtype=torch.float64)
    meta = HeadMeta(num_rows=N, dim=K, dtype="float64", optimizer=head_optimizer_meta(cfg))
    lazy = LazyHead(MemoryHeadStore(meta), lrs, cfg)
    g = torch.Generator().manual_seed(0)
    for t in range(1, steps + 1):
        idx = torch.randint(0, N if t > 10 else 30, (12,), generator=g).numpy()  # rows first touched late
        z = torch.randn(12, K, generator=g, dtype=torch.float64)
        l_d = dense.loss(z, idx, t)
        l_d.backward()
        dense.step(t)
        l_l = lazy.loss(z, idx, t)
        l_l.backward()
        lazy.step(t)
        torch.testing.assert_close(l_l, l_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lazy.export(steps).double(), dense.export(steps).double(), rtol=0, atol=1e-6)
