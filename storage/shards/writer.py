"""Writing samples into WebDataset tar shards with stable global indices.

Sample n goes to shard n // R as members `<key>.<ext>` (image), `<key>.index` and, when labelled,
`<key>.cls`, with key = n zero-padded to `key_width` digits (see records.py).

The tar is plain POSIX ustar (mode 0444, uid/gid 0, mtime 0: equal input gives byte-identical
shards), read back by WebDataset, Python's tarfile and GNU tar alike. It is written by a 30-line
header writer rather than `webdataset.TarWriter`: measured on this 2-core machine, TarWriter
(through tarfile's PAX header path) costs 100–250 µs per 3-member sample, this writer 15–35 µs;
for N = 1.28M tiny images that is the difference between minutes and seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from diet_engine.storage.shards.manifest import KEY_WIDTH, ShardInfo, key_of, shard_name

Sample = tuple[bytes, str, "int | None"]  # (encoded image, extension 'png'/'jpg', label or None)

_BLOCK, _RECORD = 512, 10240  # tar block; tarfile/GNU tar pad the archive to 20 blocks
_HEADER = bytearray(_BLOCK)  # ustar header template; name, size and checksum filled per member
_HEADER[100:108] = b"0000444\x00"  # mode
_HEADER[108:116] = b"0000000\x00"  # uid
_HEADER[116:124] = b"0000000\x00"  # gid
_HEADER[136:148] = b"00000000000\x00"  # mtime
_HEADER[148:156] = b" " * 8  # checksum field counts as spaces while summing
_HEADER[156:157] = b"0"  # regular file
_HEADER[257:265] = b"ustar\x0000"  # POSIX ustar magic + version


class TarShard:
    """Append-only ustar writer: `add(name, data)` per member, `close()` writes the end blocks."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")
        self._size = 0

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("ascii")
        if len(raw) > 100 or len(data) >= 8**11:
            raise ValueError(f"tar member {name!r} ({len(data)} bytes) does not fit a ustar header")
        h = bytearray(_HEADER)
        h[0:len(raw)] = raw
        h[124:136] = b"%011o\x00" % len(data)
        h[148:156] = b"%06o\x00 " % sum(h)
        pad = -len(data) % _BLOCK
        self._f.write(h)
        self._f.write(data)
        self._f.write(bytes(pad))
        self._size += _BLOCK + len(data) + pad

    def add_sample(self, index: int, image: bytes, ext: str, label: int | None, key_width: int) -> None:
        key = key_of(index, key_width)
        if label is not None:
            self.add(f"{key}.cls", str(int(label)).encode("ascii"))
        self.add(f"{key}.index", str(index).encode("ascii"))
        self.add(f"{key}.{ext}", image)

    def close(self) -> None:
        if not self._f.closed:
            end = 2 * _BLOCK
            self._f.write(bytes(end + (-(self._size + end) % _RECORD)))
            self._f.close()


def write_shard(path: Path, first_index: int, samples: Iterable[Sample], key_width: int = KEY_WIDTH) -> int:
    """Write `samples` as indices first_index, first_index+1, ... into the tar `path`; return the count."""
    n = 0
    tar = TarShard(path)
    try:
        for image, ext, label in samples:
            tar.add_sample(first_index + n, image, ext, label, key_width)
            n += 1
    finally:
        tar.close()
    return n


class ShardSetWriter:
    """Appends samples to `folder/shard-000000.tar`, `shard-000001.tar`, ... R samples per shard.

    Used inside a staging folder (staging.py), so a half-written shard never becomes visible.
    """

    def __init__(self, folder: Path, shard_size: int, key_width: int = KEY_WIDTH):
        if shard_size < 1:
            raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.key_width = key_width
        self.shards: list[ShardInfo] = []
        self.num_samples = 0
        self._tar: TarShard | None = None

    def write(self, image: bytes, ext: str, label: int | None = None) -> int:
        """Append one sample; return its global index."""
        if self._tar is None:
            name = shard_name(len(self.shards))
            self._tar = TarShard(self.folder / name)
            self.shards.append(ShardInfo(file=name, first_index=self.num_samples, num_samples=0))
        index = self.num_samples
        self._tar.add_sample(index, image, ext, label, self.key_width)
        self.num_samples += 1
        self.shards[-1].num_samples += 1
        if self.shards[-1].num_samples == self.shard_size:
            self._close_current()
        return index

    def close(self) -> list[ShardInfo]:
        self._close_current()
        return self.shards

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
