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
    from diet_engine.engine.distributed import rank_store_path  # noqa: PLC0415
    from diet_engine.storage.head import ZarrHeadStore  # noqa: PLC0415

    run_dir = Path(run_dir)
    cfg = RunConfig.load(run_dir / "config.json")
    if cfg.head.store != "disk":
        raise ConfigError(f"{run_dir}: head.store is {cfg.head.store!r}; `diet head verify` checks on-disk heads "
                          "(a memory or dense head lives in the checkpoint)")
    tag = latest_tag(run_dir)
    world = int(_client_state(checkpoint_dir(run_dir) / tag)["world_size"]) if tag else 1
    paths = [rank_store_path(cfg.head.store_path, run_dir, r, world) for r in range(world)]
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
    client = _client_state(checkpoint_dir(run_dir) / tag)
    T, world = int(client["step"]), int(client["world_size"])
    sources = _row_sources(cfg, run_dir, client, lrs, world)
    n, d = sources[0].num_rows, sources[0].dim
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
    for s in sources:
        s.close()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _client_state(ckpt: Path) -> dict:
    files = sorted(ckpt.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model states")
    from diet_engine.engine.distributed import _deepspeed_checkpoint_globals  # noqa: PLC0415

    with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
        state = torch.load(files[0], map_location="cpu", weights_only=True)  # never unpickles objects
    return {k: state[k] for k in ("step", "world_size", "head") if k in state}


def _row_sources(cfg, run_dir: Path, client: dict, lrs: np.ndarray, world: int) -> list:
    from diet_engine.engine.head import DenseHead, LazyHead  # noqa: PLC0415
    from diet_engine.storage.head import HeadMeta, MemoryHeadStore, ZarrHeadStore  # noqa: PLC0415

    head_state = client["head"]
    if cfg.head.store == "dense":
        w = head_state["weight"]
        head = DenseHead(w.shape[0], w.shape[1], lrs, cfg.optim, dtype=w.dtype)
        head.load_state_dict(head_state)
        return [_Dense(head)]
    if cfg.head.store == "memory":
        meta = HeadMeta.from_dict(head_state["store"]["meta"])
        store = MemoryHeadStore(meta, seed=cfg.head.seed)
        store.load_state_dict(head_state["store"])
        return [LazyHead(store, lrs, cfg.optim, mode=cfg.head.optimizer_mode)]
    from diet_engine.engine.distributed import rank_store_path  # noqa: PLC0415

    heads = []
    for r in range(world):
        path = rank_store_path(cfg.head.store_path, run_dir, r, world)
        store = ZarrHeadStore.open(path, HeadMeta.from_dict(head_state["meta"]), mode="r")
        heads.append(LazyHead(store, lrs, cfg.optim, mode=cfg.head.optimizer_mode))
    return heads


class _Dense:
    def __init__(self, head) -> None:
        self.head, self.num_rows, self.dim = head, head.num_rows, head.dim

    def close(self) -> None:
        pass


def _materialised(sources: list, idx: np.ndarray, T: int) -> torch.Tensor:
    """Rows idx at step T; with several rank stores, each row from the store that stepped it last
    (its owner: the only rank that ever steps it)."""
    if isinstance(sources[0], _Dense):
        return sources[0].head.weight.detach()[torch.from_numpy(idx)].float()
    best, best_step = None, None
    for head in sources:
        b = head.store.read_rows(idx)
        stamps = b.step.clone()
        head.opt.materialize(b.rows, T)
        if best is None:
            best, best_step = b.weight.float(), stamps
        else:
            newer = stamps > best_step
            best[newer] = b.weight.float()[newer]
            best_step = torch.maximum(best_step, stamps)
    return best


__all__ = ["export_head", "verify_head"]
