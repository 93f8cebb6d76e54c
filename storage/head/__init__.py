"""Head stores: the contract (`HeadStore`), an in-memory backend and the on-disk Zarr backend."""

from diet_engine.storage.head.base import FORMAT_VERSION, HeadMeta, HeadStore, RowBlock, check_index, head_init
from diet_engine.storage.head.config import ZarrHeadStoreConfig
from diet_engine.storage.head.errors import (
    HeadStoreCorruptionError,
    HeadStoreError,
    HeadStoreIOError,
    HeadStoreReadOnlyError,
)
from diet_engine.storage.head.file_io import FileIO
from diet_engine.storage.head.lookahead import Lookahead
from diet_engine.storage.head.memory import MemoryHeadStore
from diet_engine.storage.head.open_store import open_or_create_store
from diet_engine.storage.head.zarr_layout import chunk_rows_from_shards
from diet_engine.storage.head.zarr_store import ZarrHeadStore

__all__ = [
    "FORMAT_VERSION",
    "FileIO",
    "HeadMeta",
    "HeadStore",
    "HeadStoreCorruptionError",
    "HeadStoreError",
    "HeadStoreIOError",
    "HeadStoreReadOnlyError",
    "Lookahead",
    "MemoryHeadStore",
    "RowBlock",
    "ZarrHeadStore",
    "ZarrHeadStoreConfig",
    "check_index",
    "chunk_rows_from_shards",
    "head_init",
    "open_or_create_store",
]
