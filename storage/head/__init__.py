"""Head stores: the contract (`HeadStore`), an in-memory backend and the on-disk Zarr backend."""

from storage.head.base import FORMAT_VERSION, HeadMeta, HeadStore, RowBlock, head_init
from storage.head.memory import MemoryHeadStore

__all__ = ["FORMAT_VERSION", "HeadMeta", "HeadStore", "MemoryHeadStore", "RowBlock", "head_init"]
