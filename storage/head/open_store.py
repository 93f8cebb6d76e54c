"""The trainer's entry point to the on-disk head store."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from diet_engine.storage.head.base import HeadMeta
from diet_engine.storage.head.config import ZarrHeadStoreConfig
from diet_engine.storage.head.file_io import FileIO
from diet_engine.storage.head.zarr_store import ZarrHeadStore


def open_or_create_store(
    path: str | os.PathLike, meta: HeadMeta, *, seed: int = 0, resume: bool = False, overwrite: bool = False,
    memory_budget_bytes: int | None = None, owned_rows: np.ndarray | None = None,
    config: ZarrHeadStoreConfig | None = None, io: FileIO | None = None,
) -> ZarrHeadStore:
    """The trainer's entry point for head.store = 'disk'.

    resume=True: open the store at `path` for writing (refusing one whose N, d, dtype, optimizer
    or format differ from `meta`); the trainer then calls `recover(S)` with its checkpoint's step.
    A missing store is created (the run stopped before creating it). resume=False: create a new
    store; an existing one is refused unless `overwrite`.
    """
    config = dataclasses.replace(config or ZarrHeadStoreConfig())
    if memory_budget_bytes is not None:
        config.memory_budget_bytes = int(memory_budget_bytes)
    exists = os.path.exists(os.path.join(os.fspath(path), "zarr.json"))
    if resume and exists:
        return ZarrHeadStore.open(path, meta, mode="r+", config=config, io=io)
    if exists and not overwrite:
        raise FileExistsError(
            f"head store {os.fspath(path)} exists from an earlier run: resume that run, delete the store, "
            "or choose another run folder"
        )
    return ZarrHeadStore.create(path, meta, seed, overwrite=overwrite, config=config, io=io, owned_rows=owned_rows)
