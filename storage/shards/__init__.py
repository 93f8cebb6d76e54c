"""Dataset shards: writing (`diet prepare`), indexing (manifest) and reading (`ShardLoader`).

A shard set is a folder of WebDataset tars plus `manifest.json`; sample n carries `__key__` =
n zero-padded to 9 digits and an `.index` member, so its global index (the DIET head row) is
explicit and stable. See manifest.py for the format and plan.py for the epoch order.
"""

from diet_engine.storage.shards.index import index_shards
from diet_engine.storage.shards.loader import ShardLoader
from diet_engine.storage.shards.manifest import FORMAT_VERSION, ImageStats, Manifest, ShardInfo
from diet_engine.storage.shards.plan import assign_shards
from diet_engine.storage.shards.prepare import prepare_digits, prepare_folder, prepare_synthetic, prepare_torchvision
from diet_engine.storage.shards.records import ShardReadError

__all__ = [
    "FORMAT_VERSION",
    "ImageStats",
    "Manifest",
    "ShardInfo",
    "ShardLoader",
    "ShardReadError",
    "assign_shards",
    "index_shards",
    "prepare_digits",
    "prepare_folder",
    "prepare_synthetic",
    "prepare_torchvision",
]
