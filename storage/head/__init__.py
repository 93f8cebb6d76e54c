"""Head stores: the contract (`HeadStore`), an in-memory backend and the on-disk Zarr backend."""

from storage.head.base import FORMAT_VERSION, HeadMeta, HeadStore, RowBlock, check_index, head_init
from storage.head.errors import (
    HeadStoreCorruptionError,
    HeadStoreError,
    HeadStoreIOError,
    HeadStoreReadOnlyError,
)
from storage.head.file_io import FileIO
from storage.head.memory import MemoryHeadStore
from storage.head.zarr_layout import chunk_rows_from_shards
from storage.head.config import ZarrHeadStoreConfig
from storage.head.open_store import open_or_create_store
from storage.head.zarr_store import ZarrHeadStore

__all__ = [
    "FORMAT_VERSION",
    "FileIO",
    "HeadMeta",
    "HeadStore",
    "HeadStoreCorruptionError",
    "HeadStoreError",
    "HeadStoreIOError",
    "HeadStoreReadOnlyError",
    "MemoryHeadStore",
    "RowBlock",
    "ZarrHeadStore",
    "ZarrHeadStoreConfig",
    "check_index",
    "chunk_rows_from_shards",
    "head_init",
    "open_or_create_store",
]
