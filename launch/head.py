"""`diet head export`: write a run's DIET head at step T with every row materialised.

The lazy optimizer leaves untouched rows behind their last step; export brings each row to T
(the run's last checkpoint by default) exactly as dense AdamW/SGD would have, block by block
(host memory O(block·d)), into a Zarr v3 array `weight` (N, d) readable by any Zarr reader.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from diet_engine.storage.head.errors import HeadStoreError

_BLOCK = 65536  # rows materialised at a time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("head", help="operations on a run's DIET head")
    hs = p.add_subparsers(dest="head_command", metavar="HEAD_COMMAND", required=True)
    e = hs.add_parser("export", help="write the head at step T with every row materialised (Zarr)")
    e.add_argument("--run", required=True, help="run folder of `diet train`")
    e.add_argument("--out", required=True, help="output Zarr store (refused if it exists unless --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output")
    v = hs.add_parser("verify", help="read every row of a run's on-disk head and check its checksum")
    v.add_argument("--run", required=True, help="run folder of `diet train` (head.store=disk)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.head_command == "verify":
        report = verify_head(args.run, progress=not args.no_progress)
        print(f"ok: {report['rows']} rows in {len(report['stores'])} store(s) verified in {report['seconds']:.1f} s "
              f"({report['rows_per_s']:.0f} rows/s, {report['bytes'] / max(report['seconds'], 1e-9) / 1e6:.0f} MB/s)")
        return 0
    out = export_head(args.run, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def verify_head(run_dir: str | Path, progress: bool = True) -> dict:
    """Read every row of every rank store of `run_dir` (each read checks the row's crc32c of weight,
    exp_avg and exp_avg_sq) and the stamps against the store's commit (checked when it opens).
    Raises HeadStoreCorruptionError naming the store, chunk file and rows. Cost: one sequential read
    of the whole head (3·N·d·itemsize bytes), host memory O(block·d)."""
    import time  # noqa: PLC0415

    from tqdm import tqdm  # noqa: PLC0415

    from diet_engine.engine.checkpoint import checkpoint_dir, latest_tag  # noqa: PLC0415
    from diet_engine.engine.config import ConfigError, RunConfig  # noqa: PLC0415
    from diet_engine.storage.head import ZarrHeadStore  # noqa: PLC0415

    run_dir = Path(run_dir)
    cfg = RunConfig.load(run_dir / "config.json")
    if cfg.head.store != "disk":
        raise ConfigError(f"{run_dir}: head.store is {cfg.head.store!r}; `diet head verify` checks on-disk heads "
                          "(a memory or dense head lives in the checkpoint)")
    tag = latest_tag(run_dir)
    world = int(_client_state(checkpoint_dir(run_dir) / tag)["world_size"]) if tag else 1
    paths = _store_roots(cfg, run_dir, world)
    t0, rows, nbytes = time.perf_counter(), 0, 0
    for path in paths:
        if not Path(path, "zarr.json").is_file():
            raise FileNotFoundError(f"{run_dir}: head store {path} is missing")
        store = ZarrHeadStore.open(path, mode="r")  # checks chunk files, sizes and step stamps
        try:
            owned = store.owned_rows()
            bar = tqdm(total=owned.size, desc=f"verify {Path(path).name}", unit="row", unit_scale=True,
                       disable=not progress)
            for lo in range(0, owned.size, _BLOCK):
                idx = owned[lo : lo + _BLOCK]
                store.read_rows(idx)  # raises on the first row whose bytes do not match its checksum
                rows, nbytes = rows + idx.size, nbytes + idx.size * 3 * store.meta.dim * store.layout.dtype.itemsize
                bar.update(idx.size)
            bar.close()
        finally:
            store.close()
    seconds = time.perf_counter() - t0
    return {"stores": paths, "rows": rows, "bytes": nbytes, "seconds": seconds, "rows_per_s": rows / max(seconds, 1e-9)}


def export_head(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Export the head of `run_dir` at its latest checkpoint step into a new Zarr store `out`."""
    import zarr  # noqa: PLC0415

    from diet_engine.engine.checkpoint import checkpoint_dir, latest_tag  # noqa: PLC0415
    from diet_engine.engine.config import RunConfig  # noqa: PLC0415

    run_dir, out = Path(run_dir), Path(out)
    cfg = RunConfig.load(run_dir / "config.json")
    tag = latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to export the head from")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    lrs = np.load(run_dir / "lr_schedule.npy")
    ckpt = checkpoint_dir(run_dir) / tag
    client = _client_state(ckpt)
    T, world = int(client["step"]), int(client["world_size"])
    sources = _row_sources(cfg, run_dir, ckpt, client, lrs, world)
    n, d = sources[0][0].num_rows, sources[0][0].dim
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    arr = root.create_array("weight", shape=(n, d), chunks=(min(_BLOCK, n), d), dtype="float32",
                            compressors=None)
    for lo in range(0, n, _BLOCK):
        idx = np.arange(lo, min(lo + _BLOCK, n), dtype=np.int64)
        arr[lo : lo + len(idx)] = _materialised(sources, idx, T).numpy()
    root.attrs.update({"step": T, "num_rows": n, "dim": d, "run": str(run_dir.resolve()), "checkpoint": tag,
                       "optimizer": cfg.optim.name, "format": "diet-head-export/1"})
    for head, _ in sources:
        head.close()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _client_state(ckpt: Path) -> dict:
    from diet_engine.engine.checkpoint import read_client_state  # noqa: PLC0415

    return read_client_state(ckpt)


def _rank_head_state(ckpt: Path, rank: int) -> dict:
    """Rank `rank`'s head entry of a several-rank checkpoint: its own client state file
    (`client_state_rank{r}.pt`, engine/distributed.py), loaded without unpickling objects."""
    path = ckpt / f"client_state_rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: rank {rank}'s part of checkpoint {ckpt.name} is missing")
    return torch.load(path, map_location="cpu", weights_only=True)["head"]


def _store_roots(cfg, run_dir: Path, world: int) -> list[str]:
    """The run's disk head stores: those its layout record names (the rank count may have changed
    since the checkpoint, engine/reshard.py), else one per rank of the checkpoint's `world`."""
    from diet_engine.engine.distributed import rank_store_path  # noqa: PLC0415
    from diet_engine.engine.reshard import JOURNAL_FILE, LAYOUT_FILE  # noqa: PLC0415
    from diet_engine.storage.head.repartition import read_layout  # noqa: PLC0415

    if (run_dir / JOURNAL_FILE).exists():
        raise HeadStoreError(f"{run_dir}: a re-partition of the head between rank counts was interrupted "
                             f"({JOURNAL_FILE}); resume the run (`diet train --train.resume=true`) to finish it first")
    layout = read_layout(run_dir / LAYOUT_FILE)
    if layout is not None:
        world = int(layout["world"])
    return [rank_store_path(cfg.head.store_path, run_dir, r, world) for r in range(world)]


def _row_sources(cfg, run_dir: Path, ckpt: Path, client: dict, lrs: np.ndarray, world: int) -> list:
    """The run's head as it stood at the checkpoint `ckpt`, one read-only head per rank store
    (`build_head`, the trainer's factory): a dense head from the checkpoint's weights, each rank's
    memory store from its rows file in `ckpt` (read block by block: one copy of the head per rank in
    RAM), or each rank's Zarr store. Pairs (head, rows it holds: (N,) bool, None for all)."""
    from diet_engine.engine.head import build_head  # noqa: PLC0415
    from diet_engine.storage.head import MemoryHeadStore, ZarrHeadStore  # noqa: PLC0415

    head_state = client["head"]
    if cfg.head.store == "dense":
        w = head_state["weight"]
        head = build_head(cfg, lrs, num_rows=w.shape[0], dim=w.shape[1], world=world, dtype=w.dtype)
        head.load_state_dict(head_state)
        return [(head, None)]
    state = head_state["store"]
    if cfg.head.store == "memory":  # every rank's store holds all N rows; a row's owner stepped it (newest stamp)
        states = [state] if world == 1 else [_rank_head_state(ckpt, r)["store"] for r in range(world)]
        stores = [MemoryHeadStore.from_files(ckpt, s, read_only=True) for s in states]
    else:
        from diet_engine.storage.head import HeadMeta  # noqa: PLC0415

        meta = HeadMeta.from_dict(state["meta"])
        stores = [ZarrHeadStore.open(root, meta, mode="r") for root in _store_roots(cfg, run_dir, world)]
    return [(build_head(cfg, lrs, num_rows=s.meta.num_rows, dim=s.meta.dim, store=s, world=world), _held(s))
            for s in stores]


def _materialised(sources: list, idx: np.ndarray, T: int) -> torch.Tensor:
    """Rows idx at step T. With several rank stores each row comes from a store that holds it (the
    chunks of its owner's shards; a rank store refuses reads of other chunks), the newest stamp
    winning where several do (the owner is the only rank that ever steps a row)."""
    best = torch.zeros(len(idx), sources[0][0].dim)
    best_step = torch.full((len(idx),), -1, dtype=torch.int64)
    for head, held in sources:
        pos = np.arange(len(idx)) if held is None else np.flatnonzero(held[idx])
        if pos.size == 0:
            continue
        w, stamps = head.rows_at(idx[pos], T)
        newer = (stamps > best_step[pos]).numpy()
        best[pos[newer]] = w.float()[newer]
        best_step[pos] = torch.maximum(best_step[pos], stamps)
    if (best_step < 0).any():
        missing = int(idx[int(torch.nonzero(best_step < 0)[0, 0])])
        raise HeadStoreError(f"row {missing} is held by none of the run's head stores")
    return best


def _held(store) -> np.ndarray | None:
    """(N,) bool: the rows a store holds (a rank's store: its shards' chunks); None when it holds all."""
    mask = np.zeros(store.meta.num_rows, dtype=bool)
    mask[store.owned_rows()] = True
    return None if mask.all() else mask


__all__ = ["export_head", "verify_head"]
