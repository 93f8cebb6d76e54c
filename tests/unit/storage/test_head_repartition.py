"""Re-partition of rank head stores between rank counts (storage/head/repartition.py): rows, moments,
stamps and checksums bit for bit; uncommitted rows rolled back first; a SIGKILL at every fault point
of the protocol leaves, after `finish`, either the old layout or the new one, intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diet_engine.storage.head import HeadMeta, RowBlock, ZarrHeadStore
from diet_engine.storage.head.repartition import finish, prepare_old, read_layout, repartition
from diet_engine.storage.shards.plan import assign_shards

N, D, R, STEP = 61, 8, 8, 5  # 8 chunks, the last one short
COUNTS = np.array([R] * (N // R) + [N % R])
FIRST = np.concatenate([[0], np.cumsum(COUNTS)[:-1]])
ROOT = Path(__file__).resolve().parents[3]


def _meta() -> HeadMeta:
    return HeadMeta(num_rows=N, dim=D, dtype="float32", optimizer={"kind": "adamw"}, chunk_rows=R)


def _rows(shards) -> np.ndarray:
    return np.concatenate([np.arange(FIRST[s], FIRST[s] + COUNTS[s]) for s in shards]).astype(np.int64)


def _roots(tmp: Path, world: int) -> list[str]:
    return [str(tmp / "head.zarr")] if world == 1 else [str(tmp / f"head-rank{r}.zarr") for r in range(world)]


def _make(tmp: Path, world: int) -> list[str]:
    """`world` rank stores, each stepped on its rows: committed at STEP, then rows written after it."""
    roots = _roots(tmp, world)
    g = torch.Generator().manual_seed(world)
    for root, shards in zip(roots, assign_shards(COUNTS, world), strict=True):
        owned = None if world == 1 else _rows(shards)
        s = ZarrHeadStore.create(root, _meta(), seed=3, owned_rows=owned)
        rows = _rows(shards)
        for t, pick in ((STEP, rows[::2]), (STEP + 1, rows[1::3])):  # the second write is after the commit
            m = len(pick)
            s.write_rows(RowBlock(pick, torch.randn(m, D, generator=g), torch.randn(m, D, generator=g),
                                  torch.rand(m, D, generator=g), torch.full((m,), t, dtype=torch.int64)))
            if t == STEP:
                s.commit(STEP)
        s.close()
    return roots


def _snapshot(roots: list[str]) -> dict[str, np.ndarray]:
    """Every row of the head (weight, moments, stamps) from the stores holding it."""
    out = {k: np.zeros((N, D), np.float32) for k in ("weight", "exp_avg", "exp_avg_sq")}
    out["step"] = np.full(N, -1, np.int64)
    for root in roots:
        s = ZarrHeadStore.open(root, mode="r")
        rows = s.owned_rows()
        b = s.read_rows(rows)  # verifies every row's checksum
        for k in ("weight", "exp_avg", "exp_avg_sq"):
            out[k][rows] = getattr(b, k).numpy()
        out["step"][rows] = b.step.numpy()
        s.close()
    assert (out["step"] >= 0).all(), "a row held by no store"
    return out


def _chunks(world: int):
    return [None] if world == 1 else [o.tolist() for o in assign_shards(COUNTS, world)]


@pytest.mark.parametrize(("k_old", "k_new"), [(2, 1), (1, 2), (4, 2), (3, 4)])
def test_repartition_moves_rows_bit_for_bit(tmp_path, k_old, k_new):
    old = _make(tmp_path, k_old)
    prepare_old(old, STEP)  # rows written after the commit are rolled back
    before = _snapshot(old)
    assert before["step"].max() == STEP
    new = _roots(tmp_path, k_new)
    repartition(tmp_path / "journal.json", tmp_path / "layout.json", old, new, _chunks(k_new), STEP)
    after = _snapshot(new)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert read_layout(tmp_path / "layout.json")["world"] == k_new
    assert not (tmp_path / "journal.json").exists()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([Path(r).name for r in new] + ["layout.json"]), left
    for root, shards in zip(new, assign_shards(COUNTS, k_new), strict=True):
        s = ZarrHeadStore.open(root, mode="r+")  # writable, at commit STEP, holding exactly its shards
        assert s.commits == [STEP]
        np.testing.assert_array_equal(s.owned_rows(), _rows(shards) if k_new > 1 else np.arange(N))
        s.close()


_KILLED = """
import sys
from diet_engine.storage.head.repartition import repartition
args = __import__("json").loads(sys.argv[1])
repartition(args["journal"], args["layout"], args["old"], args["new"], args["chunks"], args["step"])
"""


@pytest.mark.integration  # spawns a process per fault point (~3 s each)
@pytest.mark.parametrize(("k_old", "k_new"), [(2, 1), (4, 2)])
def test_sigkill_anywhere_in_repartition_recovers(tmp_path, k_old, k_new):
    """Kill at fault point n for every n of the protocol (each chunk linked, each rename): after
    `finish` the head is the old layout or the new one, equal to the unkilled result either way."""
    want_dir = tmp_path / "want"
    want_dir.mkdir()
    old = _make(want_dir, k_old)
    prepare_old(old, STEP)
    want = _snapshot(old)
    points = 8 + k_old + k_new  # chunks linked + renames of the switch
    phases = set()
    for n in range(1, points + 2):
        run = tmp_path / f"kill{n}"
        run.mkdir()
        old = _make(run, k_old)
        prepare_old(old, STEP)
        args = {"journal": str(run / "journal.json"), "layout": str(run / "layout.json"), "old": old,
                "new": _roots(run, k_new), "chunks": _chunks(k_new), "step": STEP}
        env = dict(os.environ, DIET_FAULT_KILL=f"repartition:{n}",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        rc = subprocess.run([sys.executable, "-c", _KILLED, json.dumps(args)], env=env, cwd=ROOT).returncode
        phase = finish(run / "journal.json", run / "layout.json")
        if n <= points:
            assert rc == -9, f"fault point {n} of {points} was not reached (exit {rc})"
        else:
            assert rc == 0 and phase is None
        layout = read_layout(run / "layout.json")
        world = k_old if layout is None else layout["world"]
        phases.add((phase, world))
        got = _snapshot(_roots(run, world))
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"kill at point {n}: {k}")
        names = {p.name for p in run.iterdir()}
        assert not any("repartition" in x for x in names), names  # nothing half-built stays behind
    assert ("build", k_old) in phases and ("switch", k_new) in phases, phases
