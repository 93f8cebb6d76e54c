"""MemoryHeadStore: the conformance suite (reopened through its checkpoint files) plus its state_dict round trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from head_conformance import HeadStoreConformance, Model, assert_rows, make_meta, update

from diet_engine.storage.head import MemoryHeadStore


def _through_torch_save(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what the trainer's checkpoint loader does


class TestMemoryHeadStore(HeadStoreConformance):
    @pytest.fixture
    def make_store(self):
        return lambda meta, seed=0: MemoryHeadStore(meta, seed=seed)

    @pytest.fixture
    def open_as(self, tmp_path):
        def reopen(store, meta, read_only=False):  # the way a training checkpoint saves and loads it
            state = _through_torch_save(store.save_files(tmp_path, "head_rank0"))
            new = MemoryHeadStore(meta)
            new.load_files(tmp_path, state)
            new.read_only = read_only
            return new

        return reopen


def test_state_dict_round_trip_and_read_only_view():
    meta = make_meta()
    store, model = MemoryHeadStore(meta, seed=2), Model(meta, 2)
    b = update(store.read_rows(np.array([1, 50, 299])), 4)
    store.write_rows(b)
    model.write(b)
    store.commit(4)
    state = _through_torch_save(store.state_dict())
    store.write_rows(update(store.read_rows(np.array([1])), 5))  # the state dict is a copy
    view = MemoryHeadStore.from_state_dict(state, read_only=True)
    assert_rows(view, model)
    assert view.commits == [4] and view.read_only


def test_load_state_dict_refuses_other_format():
    store = MemoryHeadStore(make_meta())
    state = store.state_dict()
    state["format_version"] = 7
    with pytest.raises(ValueError, match="format version 7"):
        store.load_state_dict(state)
