"""CheckpointManager with a memory head: the rows go to a file of the checkpoint folder and come
back bit-exact; unfinished and pruned checkpoints take their rows files with them; an old format
is refused. DeepSpeed is replaced by a stand-in engine that writes its client state the same way
(one torch.save file in the tag folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diet_engine.engine.checkpoint import FORMAT_VERSION, CheckpointManager, latest_tag
from diet_engine.storage.head import HeadMeta, MemoryHeadStore, RowBlock

N, D = 53, 7


class _Engine:
    """The two DeepSpeed engine methods the manager calls, on one torch.save file."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(client_state, folder / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, **kwargs):
        path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        return str(path), torch.load(path, weights_only=True)


class _Position:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "world_size": 1}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _meta() -> HeadMeta:
    return HeadMeta(num_rows=N, dim=D, optimizer={"kind": "adamw"})


def _step(store: MemoryHeadStore, t: int) -> None:
    """Write a few rows with values that depend on t (bit-exact to compare)."""
    idx = np.unique(np.random.default_rng(t).integers(0, N, 9))
    b = store.read_rows(idx)
    g = torch.Generator().manual_seed(t)
    store.write_rows(RowBlock(idx, b.weight + torch.randn(b.weight.shape, generator=g), b.exp_avg + 1,
                              b.exp_avg_sq * 2 + 1, torch.full((len(idx),), t, dtype=torch.int64)))


def _snapshot(store: MemoryHeadStore) -> list[torch.Tensor]:
    return [store.weight.clone(), store.exp_avg.clone(), store.exp_avg_sq.clone(), torch.from_numpy(store._step.copy())]


def _manager(run: Path, store: MemoryHeadStore, position: _Position | None = None) -> CheckpointManager:
    return CheckpointManager(run, _Engine(), position=position or _Position(), head=store, keep=2)


def test_save_load_round_trip_bit_exact_and_prune(tmp_path):
    store, pos = MemoryHeadStore(_meta(), seed=4), _Position()
    mgr = _manager(tmp_path, store, pos)
    snaps = {}
    for t in range(1, 10):
        _step(store, t)
        pos.step = t
        if t % 3 == 0:
            folder = mgr.save(t)
            snaps[t] = _snapshot(store)
            assert (folder / "head_rank0.safetensors").is_file()
            state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
            assert state["format_version"] == FORMAT_VERSION == 3
            assert "weight" not in state["head"] and state["head"]["rows"]["file"] == "head_rank0.safetensors"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000006", "step_00000009"]  # step 3 pruned with its rows file
    new, pos2 = MemoryHeadStore(_meta()), _Position()
    assert _manager(tmp_path, new, pos2).load() == 9 and pos2.step == 9
    for got, want in zip(_snapshot(new), snaps[9], strict=True):
        assert torch.equal(got, want)
    assert new.commits == [9]


def test_unfinished_checkpoint_with_a_half_written_rows_file_is_discarded(tmp_path):
    """What a kill during the rows write of step 6 leaves (`.tmp-step_6/` holding the rows file's
    temp name): resume discards it and loads step 3 bit-exact."""
    store, pos = MemoryHeadStore(_meta(), seed=4), _Position()
    mgr = _manager(tmp_path, store, pos)
    for t in range(1, 4):
        _step(store, t)
    pos.step = 3
    mgr.save(3)
    at3 = _snapshot(store)
    for t in range(4, 7):
        _step(store, t)
    unfinished = tmp_path / "checkpoints" / ".tmp-step_00000006"
    unfinished.mkdir()
    (unfinished / ".head_rank0.safetensors.tmp").write_bytes(b"\0" * 100)
    new = MemoryHeadStore(_meta())
    assert _manager(tmp_path, new).load() == 3
    assert not unfinished.exists() and latest_tag(tmp_path) == "step_00000003"
    for got, want in zip(_snapshot(new), at3, strict=True):
        assert torch.equal(got, want)


def test_damaged_rows_file_is_refused_on_resume(tmp_path):
    from diet_engine.storage.head import HeadStoreCorruptionError

    store, pos = MemoryHeadStore(_meta(), seed=4), _Position()
    _step(store, 1)
    pos.step = 1
    folder = _manager(tmp_path, store, pos).save(1)
    rows = folder / "head_rank0.safetensors"
    rows.write_bytes(rows.read_bytes()[:-8])
    with pytest.raises(HeadStoreCorruptionError, match="head_rank0.safetensors has .* truncated"):
        _manager(tmp_path, MemoryHeadStore(_meta())).load()


def test_older_checkpoint_format_is_refused_naming_both_versions(tmp_path):
    store, pos = MemoryHeadStore(_meta(), seed=4), _Position()
    folder = _manager(tmp_path, store, pos).save(0)
    state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
    state["format_version"] = 2
    torch.save(state, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="format version 2 != 3"):
        _manager(tmp_path, MemoryHeadStore(_meta())).load()


def test_head_export_reads_every_rank_rows_file(tmp_path):
    """`diet head export` of a 2-rank memory-head run: each rank's store holds all N rows but steps
    only its own; the export takes every row from the rank that stepped it (its rows file)."""
    import zarr

    from diet_engine.engine.config import RunConfig
    from diet_engine.engine.head import head_meta
    from diet_engine.launch.head import export_head

    run, T = tmp_path / "run", 5
    run.mkdir()
    cfg = RunConfig()
    cfg.head.store = "memory"
    cfg.save(run / "config.json")
    np.save(run / "lr_schedule.npy", np.full(10, 1e-3))
    ckpt = run / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000005\n")
    meta = head_meta(cfg, N, D, torch.float32, 16)
    want = torch.empty(N, D)
    for r in range(2):
        store = MemoryHeadStore(meta, seed=cfg.head.seed)
        own = np.arange(r, N, 2)  # rank r's rows, stepped at T: export leaves them as they are
        b = store.read_rows(own)
        weight = torch.randn(len(own), D, generator=torch.Generator().manual_seed(r))
        store.write_rows(RowBlock(own, weight, b.exp_avg + 0.5, b.exp_avg_sq + 0.25, torch.full((len(own),), T)))
        store.commit(T)
        want[own] = weight
        state = {"step": T, "world_size": 2, "head": {"store": store.save_files(ckpt, f"head_rank{r}")}}
        torch.save(state, ckpt / f"client_state_rank{r}.pt")
        if r == 0:
            torch.save(state, ckpt / "mp_rank_00_model_states.pt")  # DeepSpeed's copy: rank 0's
    got = zarr.open_group(str(export_head(run, tmp_path / "head.zarr")), mode="r")["weight"][:]
    assert torch.equal(torch.from_numpy(got), want)
