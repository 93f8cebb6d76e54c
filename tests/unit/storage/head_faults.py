"""A fault-injecting `FileIO` for the head-store tests: ENOSPC after a byte budget, EROFS, slow calls."""

from __future__ import annotations

import errno
import os
import threading
import time

from diet_engine.storage.head import FileIO


class FaultyIO(FileIO):
    """`FileIO` whose writes to paths containing a key of `space` fail with ENOSPC once that key's
    byte budget is spent (the failing call first writes half of what fits: a torn write), whose
    read-write opens fail with EROFS when `read_only_fs`, and whose data calls can be slowed."""

    def __init__(self, *, space: dict[str, int] | None = None, read_only_fs: bool = False,
                 write_delay: float = 0.0, read_delay: float = 0.0) -> None:
        self.space = dict(space or {})
        self.read_only_fs = read_only_fs
        self.write_delay, self.read_delay = write_delay, read_delay
        self.paths: dict[int, str] = {}
        self._lock = threading.Lock()

    def open(self, path, flags, mode=0o644):
        if self.read_only_fs and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        return fd

    def _budget(self, path: str, want: int) -> int:
        """Bytes of `want` that still fit; -1 if unlimited."""
        with self._lock:
            for key, left in self.space.items():
                if key in path:
                    self.space[key] = left - want
                    return max(0, left)
        return -1

    def pwritev(self, fd, bufs, offset):
        if self.write_delay:
            time.sleep(self.write_delay)
        want = sum(len(b) for b in bufs)
        fits = self._budget(self.paths.get(fd, ""), want)
        if 0 <= fits < want:
            torn = memoryview(b"".join(bytes(b) for b in bufs))[: fits // 2]
            if len(torn):
                os.pwrite(fd, torn, offset)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.paths.get(fd))
        super().pwritev(fd, bufs, offset)

    def write_file_atomic(self, path, data):
        if 0 <= self._budget(path, len(data)) < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        super().write_file_atomic(path, data)

    def preadv(self, fd, bufs, offset):
        if self.read_delay:
            time.sleep(self.read_delay)
        super().preadv(fd, bufs, offset)
