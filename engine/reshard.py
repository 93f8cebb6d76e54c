"""Resume on a different number of ranks: a run checkpointed on K ranks continues on K'.

Design note
-----------
Four parts of a run depend on the rank count, and each is carried over on its own:

* **Position and data order.** The checkpoint holds (step S, epoch e, batches b of e done, K) and
  the history of e on earlier rank counts, `epoch_segments` [(ranks, batches), ...]. On K' ≠ K
  the history gains (K, b) and the epoch continues with the samples not yet visited
  (`ShardLoader.continue_epoch`; the rule and its visit bound: storage/shards/plan.py). Later
  epochs are ordinary K' epochs. The step counter goes on from S.
* **Learning rate.** Steps 1..S keep the learning rates they were applied with (the head's lazy
  optimizer catches rows up over past steps with the lrs of those steps). From S + 1 the lr is
  the K' run's own nominal schedule (base lr scaled by its global batch) at the same point of
  training, measured in epochs: step S stands at e + f (f: the fraction of epoch e's samples
  visited), the rest of epoch e spreads (f, 1] evenly over its steps, then one epoch is
  `steps_per_epoch(K')` steps. `lrs = old[:S] ++ that`; the array is saved in the checkpoint
  (`Trainer.state_dict()['lrs']`) once it is no longer the nominal one, and reused on resumes
  with the same rank count, so a resume never changes it.
* **Head rows.** Disk: `<run_dir>/head-layout.json` records which rank count's stores hold the
  head (their paths follow from `head.store_path`, `distributed.rank_store_path`); on a
  rank-count change rank 0 moves whole chunks between rank stores (storage/head/repartition.py:
  bit-for-bit, crash-consistent, finished or rolled back after a kill). Memory: each new rank
  builds its rows from the old ranks' saved states, each row from its old owner
  (`load_memory_head`).
* **Backbone and its optimizer.** ZeRO-0 checkpoints hold the whole model and optimizer in
  `mp_rank_00_model_states.pt`, the same on every rank count: loaded as they are. ZeRO-1/2
  partition the optimizer state by rank: rank 0 converts the checkpoint with DeepSpeed's
  `ds_to_universal` into `checkpoints/universal/step_S/` and every rank loads it with
  `checkpoint.load_universal` (DeepSpeed's universal checkpoint; its loads are forced to
  weights_only, see `distributed.weights_only_loads`). The universal load restores parameters
  and optimizer state but not buffers, so BatchNorm's running statistics are copied from the
  checkpoint's module state (checkpoint.py `_load_buffers`). The folder is removed after the load.
  ZeRO-0 is not converted: `ds_to_universal` reads ZeRO's `*_optim_states.pt` partitions, which a
  stage-0 checkpoint does not have (FileNotFoundError), and `load_universal` loads weights through
  the ZeRO optimizer only; a stage-0 checkpoint holds the whole model and optimizer and loads as is.

Not covered: head.store=dense (each rank holds its own dense head; refused), node-local disk
stores that rank 0 cannot reach (the move needs them on one file system), and the paper-mode lazy
optimizer, whose closed form assumes one global batch size for the whole run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from diet_engine.engine.checkpoint import checkpoint_dir, latest_tag, read_client_state
from diet_engine.engine.schedule import warmup_cosine
from diet_engine.storage.shards.plan import assign_shards, num_batches

LAYOUT_FILE = "head-layout.json"
JOURNAL_FILE = "head-repartition.json"
UNIVERSAL_DIR = "universal"


# ---------------------------------------------------------------------------------------- position


def saved_position(run_dir: str | Path) -> dict[str, Any] | None:
    """The trainer state of the run's latest checkpoint (rank 0's), or None without one. Cost: one
    read of DeepSpeed's model states file (with ZeRO-0 it holds the optimizer state too)."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    state = read_client_state(checkpoint_dir(run_dir) / tag)
    return {k: v for k, v in state.items() if k not in ("format_version", "head")}


def continued_position(state: dict[str, Any], world: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(epoch, batch in epoch, epoch segments) that a run on `world` ranks continues from a saved
    trainer state: unchanged on the same rank count; else the epoch's history gains (K, b) and the
    continued epoch starts at its batch 0."""
    epoch, b = int(state["epoch"]), int(state["batch_in_epoch"])
    segments = [(int(k), int(n)) for k, n in state.get("epoch_segments", [])]
    if int(state["world_size"]) == world:
        return epoch, b, segments
    if b > 0:
        segments.append((int(state["world_size"]), b))
    return epoch, 0, segments


def nominal_lrs(cfg, steps_per_epoch: int, world: int) -> np.ndarray:
    """The schedule of a run on `world` ranks from its start: warm-up + cosine over all epochs,
    base lr scaled by the global batch (lr · batch_size · world / 256). (T,) float64."""
    full = cfg.train.epochs * steps_per_epoch
    base_lr = cfg.optim.lr * (cfg.train.batch_size * world) / 256
    warmup = (cfg.optim.warmup_fraction * full if cfg.optim.warmup_fraction > 0
              else cfg.optim.warmup_epochs * steps_per_epoch)
    return warmup_cosine(base_lr, full, int(round(warmup)), base_lr * cfg.optim.final_lr_fraction)


def steps_per_epoch(counts: np.ndarray, world: int, batch_size: int, drop_last: bool = False) -> int:
    """Steps of an ordinary epoch on `world` ranks (the maximum over ranks, as the loader runs)."""
    return max(num_batches(int(np.asarray(counts)[o].sum()), batch_size, drop_last)
               for o in assign_shards(counts, world))


def continued_lrs(cfg, past: np.ndarray, step: int, epoch: int, visited_fraction: float, steps_left: int,
                  steps_per_epoch_now: int, world: int) -> np.ndarray:
    """`past[:step]` then the nominal schedule of `world` ranks at the same epoch progress (design
    note): step step+i is at e + f + (1 - f)·i/steps_left for i ≤ steps_left, then
    e + 1 + (i - steps_left)/steps_per_epoch_now. (step + steps_left + later epochs' steps,) float64."""
    if len(past) < step:
        raise ValueError(f"the saved learning-rate schedule has {len(past)} steps, fewer than step {step}")
    nominal = nominal_lrs(cfg, steps_per_epoch_now, world)
    later = max(cfg.train.epochs - epoch - 1, 0) * steps_per_epoch_now
    i = np.arange(1, steps_left + later + 1, dtype=np.float64)
    progress = np.where(i <= steps_left, epoch + visited_fraction + (1 - visited_fraction) * i / max(steps_left, 1),
                        epoch + 1 + (i - steps_left) / steps_per_epoch_now)
    at = np.clip(np.ceil(progress * steps_per_epoch_now - 1e-9).astype(np.int64) - 1, 0, len(nominal) - 1)
    return np.concatenate([np.asarray(past[:step], np.float64), nominal[at]])


# ---------------------------------------------------------------------------------------- disk head


def store_roots(cfg, run_dir: str | Path, world: int) -> list[str]:
    from diet_engine.engine.distributed import rank_store_path  # noqa: PLC0415

    return [os.path.abspath(rank_store_path(cfg.head.store_path, run_dir, r, world)) for r in range(world)]


def head_layout(cfg, run_dir: str | Path, position: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where the run's disk head lives now: the layout record, else (runs before the record) the
    stores of the checkpoint's rank count; None for a run that has neither."""
    from diet_engine.storage.head.repartition import read_layout  # noqa: PLC0415

    layout = read_layout(Path(run_dir) / LAYOUT_FILE)
    if layout is None and position is None:
        return None
    k = int(layout["world"]) if layout is not None else int(position["world_size"])
    return {"world": k, "roots": store_roots(cfg, run_dir, k)}


def repartition_disk_head(cfg, run_dir: str | Path, world: int, counts: np.ndarray, step: int,
                          position: dict[str, Any] | None) -> bool:
    """Rank 0, before any rank opens its store: finish a killed re-partition, then move the head's
    chunks to the stores of `world` ranks if they are elsewhere. True if chunks were moved."""
    from diet_engine.storage.head.repartition import finish, prepare_old, repartition  # noqa: PLC0415

    run_dir = Path(run_dir)
    finish(run_dir / JOURNAL_FILE, run_dir / LAYOUT_FILE)
    layout = head_layout(cfg, run_dir, position)
    new = store_roots(cfg, run_dir, world)
    if layout is None or [os.path.abspath(r) for r in layout["roots"]] == new:
        return False
    old = [os.path.abspath(r) for r in layout["roots"]]
    for a in old:
        for b in new:
            if a != b and (b.startswith(a + os.sep) or a.startswith(b + os.sep)):
                raise ValueError(f"head.store_path={cfg.head.store_path!r}: the store of {layout['world']} rank(s) "
                                 f"{a} and that of {world} rank(s) {b} lie inside one another, so the head cannot "
                                 "move between them; use a path with '{rank}' (e.g. /scratch/head-{rank}.zarr)")
    chunks = [None] if world == 1 else [o.tolist() for o in assign_shards(counts, world)]  # chunk = shard
    prepare_old(old, step)
    repartition(run_dir / JOURNAL_FILE, run_dir / LAYOUT_FILE, old, new, chunks, step)
    return True


def record_head_layout(cfg, run_dir: str | Path, world: int, step: int) -> None:
    """Rank 0, once every rank's store exists: record the layout if the record is missing or stale."""
    from diet_engine.storage.head.repartition import read_layout, write_layout  # noqa: PLC0415

    path = Path(run_dir) / LAYOUT_FILE
    current = read_layout(path)
    if current is None or int(current["world"]) != world:
        write_layout(path, world, step)


# ---------------------------------------------------------------------------------------- memory head


def load_memory_head(head, folder: str | Path, old_world: int, rank0_state: dict[str, Any], counts: np.ndarray,
                     first_index: np.ndarray) -> None:
    """Load into `head` (a memory head) the checkpoint in `folder` saved by `old_world` ranks: rank 0's
    rows file, then, for every other old rank, the rows (weight, moments, stamp) of the shards it
    owned, from its own rows file. `rank0_state`: the head entry of rank 0's client state
    (DeepSpeed's). Host memory: the head plus one old rank's copy at a time.

    Kept small on purpose: it is the one place that knows how a memory head's rows are saved."""
    from diet_engine.storage.head import MemoryHeadStore  # noqa: PLC0415

    head.load_files(folder, rank0_state)
    if old_world == 1:
        return
    store = head.store
    owners = assign_shards(counts, old_world)
    for r in range(1, old_world):
        path = Path(folder) / f"client_state_rank{r}.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: rank {r}'s part of the checkpoint (its head rows) is missing")
        other = torch.load(path, map_location="cpu", weights_only=True)["head"]["store"]
        old = MemoryHeadStore.from_files(folder, other, read_only=True)
        rows = np.concatenate([np.arange(first_index[s], first_index[s] + counts[s]) for s in owners[r]])
        idx = torch.from_numpy(rows)
        for k in ("weight", "exp_avg", "exp_avg_sq"):
            getattr(store, k)[idx] = getattr(old, k)[idx]
        store.step_stamps[rows] = old.step_stamps[rows]
        del old


# ---------------------------------------------------------------------------------------- backbone


def needs_universal(position: dict[str, Any] | None, world: int, zero_stage: int) -> bool:
    return position is not None and int(position["world_size"]) != world and zero_stage >= 1


def convert_to_universal(run_dir: str | Path, tag: str) -> Path:
    """Rank 0: DeepSpeed's `ds_to_universal` of checkpoint `tag` into checkpoints/universal/<tag>
    (built under a temp name, then renamed). Loads forced to weights_only. Cost: one read and one
    write of the backbone and optimizer state."""
    from deepspeed.checkpoint import ds_to_universal  # noqa: PLC0415

    from diet_engine.engine.distributed import weights_only_loads  # noqa: PLC0415

    root = checkpoint_dir(run_dir) / UNIVERSAL_DIR
    out = root / tag
    if out.is_dir():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = SimpleNamespace(input_folder=str(checkpoint_dir(run_dir) / tag), output_folder=str(tmp),
                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                           inject_missing_state=True)
    with weights_only_loads():
        ds_to_universal.main(args)
    (root / "latest_universal").unlink(missing_ok=True)  # ds_to_universal names its output there; unused
    tmp.rename(out)
    return out


def remove_universal(run_dir: str | Path) -> None:
    shutil.rmtree(checkpoint_dir(run_dir) / UNIVERSAL_DIR, ignore_errors=True)


__all__ = [
    "continued_lrs", "continued_position", "convert_to_universal", "load_memory_head", "needs_universal",
    "nominal_lrs", "record_head_layout", "remove_universal", "repartition_disk_head", "saved_position",
    "steps_per_epoch",
]
