"""The head-store conformance suite: every backend subclasses `HeadStoreConformance`.

Pattern of zarr-python's `zarr.testing.store.StoreTests`: the base class holds the tests, a
subclass supplies two fixtures:

* `make_store(meta, seed=0) -> HeadStore`: a new, writable store (closed by the fixture);
* `open_as(store, meta, read_only=False) -> HeadStore`: the same content opened as a new store
  object against `meta` (the on-disk store closes `store` and reopens its folder; the in-memory
  one goes through its checkpoint files, `save_files`/`load_files`). It must refuse a `meta` that
  does not match.

Every comparison is exact: a store moves bytes, it never computes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diet_engine.kernels import Rows
from diet_engine.storage.head import HeadMeta, HeadStore, HeadStoreReadOnlyError, Lookahead, RowBlock, head_init

N, D, R = 300, 12, 64  # rows, dim, chunk rows (5 chunks, the last one partial)


def make_meta(**kw) -> HeadMeta:
    base = dict(num_rows=N, dim=D, dtype="float32", optimizer={"kind": "adamw", "betas": [0.9, 0.999]}, chunk_rows=R)
    base.update(kw)
    return HeadMeta(**base)


class Model:
    """Plain numpy reference of a head store's state, with the same commit/recover semantics."""

    def __init__(self, meta: HeadMeta, seed: int) -> None:
        n, d = meta.num_rows, meta.dim
        self.w = head_init(seed, 0, n, d).numpy().copy()
        self.m = np.zeros((n, d), np.float32)
        self.v = np.zeros((n, d), np.float32)
        self.s = np.zeros(n, np.int64)
        self.snaps: dict[int, tuple] = {meta.global_step: self.snap()}

    def snap(self) -> tuple:
        return self.w.copy(), self.m.copy(), self.v.copy(), self.s.copy()

    def write(self, b: RowBlock) -> None:
        self.w[b.index], self.m[b.index], self.v[b.index] = b.weight.numpy(), b.exp_avg.numpy(), b.exp_avg_sq.numpy()
        self.s[b.index] = b.step.numpy()

    def commit(self, step: int) -> None:
        self.snaps[step] = self.snap()

    def recover(self, step: int) -> None:
        self.w, self.m, self.v, self.s = (x.copy() for x in self.snaps[step])


def update(b: RowBlock, t: int) -> RowBlock:
    """A deterministic fake optimizer step on a block (fp32, bit-reproducible)."""
    b.weight.mul_(0.9).add_(1e-3 * t)
    b.exp_avg.add_(b.weight)
    b.exp_avg_sq.mul_(0.5).addcmul_(b.weight, b.weight)
    b.step.fill_(t)
    return b


def assert_rows(store: HeadStore, model: Model, index: np.ndarray | None = None) -> None:
    idx = np.arange(model.s.size) if index is None else index
    b = store.read_rows(idx)
    np.testing.assert_array_equal(b.weight.numpy(), model.w[idx])
    np.testing.assert_array_equal(b.exp_avg.numpy(), model.m[idx])
    np.testing.assert_array_equal(b.exp_avg_sq.numpy(), model.v[idx])
    np.testing.assert_array_equal(b.step.numpy(), model.s[idx])
    np.testing.assert_array_equal(store.step_stamps[idx], model.s[idx])


def batches(order: str, steps: int, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Sorted unique row ids per step: 'random' over all rows, 'streaming' shard-clustered."""
    rng = np.random.default_rng(seed)
    out = []
    if order == "random":
        for _ in range(steps):
            out.append(np.unique(rng.integers(0, N, batch)))
    else:  # two shards open at a time, samples shuffled inside them, like a WebDataset loader
        perm = np.concatenate([c * R + rng.permutation(min(R, N - c * R)) for c in rng.permutation(-(-N // R))])
        pos = 0
        for _ in range(steps):
            take = perm[pos : pos + batch] if pos + batch <= perm.size else perm[:batch]
            pos = pos + batch if pos + batch <= perm.size else batch
            out.append(np.unique(take))
    return out


class HeadStoreConformance:
    """Tests every HeadStore backend must pass. Subclasses define `make_store` and `open_as`."""

    @pytest.fixture
    def make_store(self):  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    def open_as(self):  # pragma: no cover - overridden
        raise NotImplementedError

    # ---- basics ---------------------------------------------------------------------------------

    def test_initial_state_is_head_init(self, make_store):
        store = make_store(make_meta(), seed=5)
        model = Model(make_meta(), 5)
        assert_rows(store, model)
        assert store.meta.num_rows == N and store.meta.dim == D
        assert store.step_stamps.shape == (N,) and store.step_stamps.dtype == np.int64
        assert store.commits == [0]

    def test_round_trip_and_untouched_rows(self, make_store):
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        idx = np.array([0, 1, 63, 64, 65, 200, 299])
        b = update(store.read_rows(idx), 3)
        store.write_rows(b)
        model.write(b)
        assert_rows(store, model)

    def test_read_returns_copies(self, make_store):
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        b = store.read_rows(np.array([3, 4]))
        b.weight.fill_(7.0)
        b.step.fill_(9)
        assert_rows(store, model, np.array([3, 4]))

    def test_write_copies_the_block(self, make_store):
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        b = update(store.read_rows(np.array([10, 11, 12])), 1)
        store.write_rows(b)
        model.write(b)
        b.weight.fill_(-1.0)  # the caller reuses its block: the store must hold what it was given
        b.step.fill_(99)
        assert_rows(store, model)

    def test_block_rows_are_the_block(self, make_store):
        """`block.rows` (what the lazy optimizer takes) holds the block's own tensors: an in-place
        update through it is an update of the block, and the store gets it on write."""
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        b = store.read_rows(np.array([5, 70, 299]))
        rows = b.rows
        assert isinstance(rows, Rows) and rows._fields == ("weight", "exp_avg", "exp_avg_sq", "step")
        assert all(x is y for x, y in zip(rows, (b.weight, b.exp_avg, b.exp_avg_sq, b.step), strict=True))
        update(RowBlock(b.index, *rows), 4)  # in place, through the tuple's tensors
        store.write_rows(b)
        model.write(b)
        assert_rows(store, model)
        assert (store.step_stamps[b.index] == 4).all()

    @pytest.mark.parametrize(
        "bad",
        [np.array([3, 1]), np.array([1, 1, 2]), np.array([-1, 2]), np.array([0, N]), np.zeros((2, 2), np.int64),
         np.array([0.5])],
        ids=["unsorted", "duplicate", "negative", "past-end", "2-d", "float"],
    )
    def test_index_contract(self, make_store, bad):
        store = make_store(make_meta())
        with pytest.raises(ValueError, match="row index"):
            store.read_rows(bad)
        blk = store.read_rows(np.array([0]))
        bad_blk = dataclasses.replace(blk, index=bad)
        with pytest.raises(ValueError, match="row index"):
            store.write_rows(bad_blk)

    def test_empty_index(self, make_store):
        store = make_store(make_meta())
        b = store.read_rows(np.array([], dtype=np.int64))
        assert b.weight.shape == (0, D) and b.step.shape == (0,)
        store.write_rows(b)
        store.prefetch(np.array([], dtype=np.int64))

    def test_prefetch_then_read(self, make_store):
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        idx = np.array([5, 6, 7, 100, 250])
        store.prefetch(idx)
        store.prefetch(idx)  # twice is harmless
        assert_rows(store, model, idx)

    def test_write_then_immediate_read_same_rows(self, make_store):
        """Rows still in flight to disk are served from memory, with all four fields."""
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        idx = np.arange(0, N, 3)
        for t in range(1, 6):
            b = update(store.read_rows(idx), t)
            store.write_rows(b)
            model.write(b)
            assert_rows(store, model, idx)  # immediately, no flush
        store.flush()
        assert_rows(store, model)

    def test_prefetched_rows_see_later_writes(self, make_store):
        """A row prefetched for batch k+1 and written by batch k is read with batch k's value."""
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        a, b_next = np.arange(0, 40), np.arange(20, 60)
        store.prefetch(a)
        store.prefetch(b_next)
        blk = update(store.read_rows(a), 1)
        store.write_rows(blk)
        model.write(blk)
        assert_rows(store, model, b_next)

    @pytest.mark.parametrize("order", ["random", "streaming"])
    def test_training_sequence(self, make_store, order):
        """prefetch k+L ahead → read → update → write, commit every K: equals the model."""
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        steps, lookahead, every = 40, 3, 10
        plan = batches(order, steps + lookahead, 48, seed=1)
        window = Lookahead(store.prefetch, plan, lookahead)
        for t in range(1, steps + 1):
            window.advance()
            b = update(store.read_rows(plan[t - 1]), t)
            store.write_rows(b)
            model.write(b)
            if t % every == 0:
                store.commit(t)
                model.commit(t)
        assert_rows(store, model)

    def test_read_after_write_under_load(self, make_store):
        """Each batch shares most rows with the previous one, so reads hit rows still in flight."""
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        rng = np.random.default_rng(3)
        prev = np.arange(50)
        for t in range(1, 31):
            idx = np.unique(np.concatenate([prev[rng.random(prev.size) < 0.8], rng.integers(0, N, 20)]))
            store.prefetch(idx)
            b = update(store.read_rows(idx), t)
            np.testing.assert_array_equal(b.step.numpy(), np.full(idx.size, t))
            store.write_rows(b)
            model.write(b)
            prev = idx
        assert_rows(store, model)

    # ---- commit / recover -----------------------------------------------------------------------

    def _run(self, store, model, t0, t1, seed=0):
        rng = np.random.default_rng(seed + t0)
        for t in range(t0, t1):
            idx = np.unique(rng.integers(0, N, 40))
            b = update(store.read_rows(idx), t)
            store.write_rows(b)
            model.write(b)

    def test_recover_newest_commit(self, make_store):
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        self._run(store, model, 1, 6)
        store.commit(5)
        model.commit(5)
        self._run(store, model, 6, 9)
        store.recover(5)
        model.recover(5)
        assert_rows(store, model)
        assert store.commits[-1] == 5 and store.meta.global_step == 5
        self._run(store, model, 6, 12, seed=1)  # training goes on after recovery
        store.commit(11)
        model.commit(11)
        assert_rows(store, model)

    def test_recover_one_but_newest_commit(self, make_store):
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        self._run(store, model, 1, 4)
        store.commit(3)
        model.commit(3)
        self._run(store, model, 4, 8)
        store.commit(7)
        model.commit(7)
        assert store.commits == [3, 7]
        self._run(store, model, 8, 10)
        store.recover(3)
        model.recover(3)
        assert_rows(store, model)
        assert store.commits == [3] and store.meta.global_step == 3
        with pytest.raises(ValueError, match="recover"):
            store.recover(7)  # undone, no longer a recovery point

    def test_recover_to_creation(self, make_store):
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        self._run(store, model, 1, 5)
        store.recover(0)
        model.recover(0)
        assert_rows(store, model)

    def test_recover_refuses_unknown_steps(self, make_store):
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        for s in (2, 4, 6):
            self._run(store, model, s - 1, s)
            store.commit(s)
        assert store.commits == [4, 6]
        for bad in (2, 5, 7):
            with pytest.raises(ValueError, match=f"cannot recover .* to step {bad}"):
                store.recover(bad)

    def test_commit_steps_increase(self, make_store):
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        self._run(store, model, 1, 3)
        store.commit(4)
        store.commit(4)  # nothing written since: a no-op
        self._run(store, model, 5, 6)
        for bad in (3, 4):
            with pytest.raises(ValueError, match="commit"):
                store.commit(bad)

    def test_recover_twice_is_idempotent(self, make_store):
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        self._run(store, model, 1, 4)
        store.commit(3)
        model.commit(3)
        self._run(store, model, 4, 6)
        store.recover(3)
        store.recover(3)
        model.recover(3)
        assert_rows(store, model)

    # ---- opening --------------------------------------------------------------------------------

    def test_reopen_same_content(self, make_store, open_as):
        meta = make_meta()
        store, model = make_store(meta), Model(meta, 0)
        self._run(store, model, 1, 5)
        store.commit(4)
        again = open_as(store, make_meta())
        assert_rows(again, model)
        assert again.meta.global_step == 4

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"num_rows": N + 1}, "num_rows"),
            ({"dim": D + 1}, "dim"),
            ({"dtype": "float64"}, "dtype"),
            ({"optimizer": {"kind": "sgd"}}, "optimizer"),
            ({"format_version": 99}, "format_version"),
        ],
    )
    def test_mismatch_is_refused_naming_the_field(self, make_store, open_as, change, field):
        store = make_store(make_meta())
        with pytest.raises(ValueError, match=field):
            open_as(store, make_meta(**change))

    def test_read_only_store(self, make_store, open_as):
        meta = make_meta()
        store, model = make_store(meta), Model(meta, 0)
        self._run(store, model, 1, 3)
        store.commit(2)
        ro = open_as(store, make_meta(), read_only=True)
        assert ro.read_only
        assert_rows(ro, model)
        ro.prefetch(np.array([1, 2]))
        b = ro.read_rows(np.array([1, 2]))
        with pytest.raises(HeadStoreReadOnlyError, match="read-only"):
            ro.write_rows(b)
        with pytest.raises(HeadStoreReadOnlyError, match="read-only"):
            ro.commit(3)
        with pytest.raises(HeadStoreReadOnlyError, match="read-only"):
            ro.recover(2)

    def test_stats_is_a_flat_dict_of_numbers(self, make_store):
        store = make_store(make_meta())
        store.write_rows(update(store.read_rows(np.array([1, 2, 3])), 1))
        s = store.stats()
        assert isinstance(s, dict) and s
        assert all(isinstance(v, (int, float)) for v in s.values())
        assert s["rows_read"] >= 3

    def test_device_blocks_round_trip(self, make_store):
        """Blocks come back from the trainer as float32 CPU tensors of any layout (here non-contiguous)."""
        store, model = make_store(make_meta()), Model(make_meta(), 0)
        b = update(store.read_rows(np.array([7, 8, 9])), 2)
        b = RowBlock(b.index, b.weight.t().contiguous().t(), b.exp_avg, b.exp_avg_sq, b.step.clone())
        store.write_rows(b)
        model.write(RowBlock(b.index, b.weight.contiguous(), b.exp_avg, b.exp_avg_sq, b.step))
        assert_rows(store, model)
        assert torch.is_tensor(store.read_rows(np.array([7])).weight)
