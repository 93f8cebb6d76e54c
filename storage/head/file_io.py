"""The system calls the on-disk head store makes, and a bounded cache of open chunk-file descriptors.

`FileIO` is the only place the store touches the OS, so tests subclass it to inject faults (ENOSPC,
EROFS, slow writes that widen crash windows) without mocking. All calls release the GIL inside the
kernel, so a pool of Python threads gets real I/O parallelism (queue depth) out of them.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _advance(bufs: Sequence[memoryview], done: int) -> list[memoryview]:
    """The part of `bufs` not yet transferred after a short read/write of `done` bytes."""
    out: list[memoryview] = []
    for b in bufs:
        if done >= len(b):
            done -= len(b)
            continue
        out.append(b[done:])
        done = 0
    return out


class FileIO:
    """Thin, overridable wrappers of os.* calls; short transfers are completed, EOF is an error."""

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def preadv(self, fd: int, bufs: Sequence[memoryview], offset: int) -> None:
        """Fill `bufs` (each a writable byte view) from `offset`. One syscall unless the kernel returns short."""
        want = sum(len(b) for b in bufs)
        n = os.preadv(fd, bufs, offset)
        while n < want:
            rest = _advance(bufs, n)
            got = os.preadv(fd, rest, offset + n)
            if got == 0:
                raise EOFError(f"file descriptor {fd}: unexpected end of file at byte {offset + n}")
            bufs, want, offset = rest, want - n, offset + n
            n = got

    def pwritev(self, fd: int, bufs: Sequence[memoryview], offset: int) -> None:
        """Write `bufs` contiguously at `offset` (to the page cache; durable only after fdatasync)."""
        want = sum(len(b) for b in bufs)
        n = os.pwritev(fd, bufs, offset)
        while n < want:
            bufs, want, offset = _advance(bufs, n), want - n, offset + n
            n = os.pwritev(fd, bufs, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fallocate(self, fd: int, offset: int, length: int) -> None:
        """Reserve blocks (reads give zeros) so later in-place writes cannot hit ENOSPC."""
        os.posix_fallocate(fd, offset, length)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fadvise(self, fd: int, offset: int, length: int, advice: int) -> None:
        os.posix_fadvise(fd, offset, length, advice)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_file_atomic(self, path: str, data: bytes) -> None:
        """Write `data` to `path` via a temp file, fsync, rename over `path` and fsync the folder."""
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        fd = self.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            self.pwritev(fd, [memoryview(data)], 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        self.fsync_dir(os.path.dirname(path) or ".")


def raise_nofile_limit(want: int) -> int:
    """Raise the RLIMIT_NOFILE soft limit to `want` descriptors (at most the hard limit) if it is
    lower, as servers and data loaders do; returns the soft limit now in force (-1: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


class _Held:
    """`with` target of a descriptor that is never closed before the cache is (no bookkeeping)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        return None


class FdCache:
    """Open descriptors of chunk files, at most `max_open`, least recently used closed first.

    Thread-safe. When the store's `expected_files` fit `max_open` (ImageNet at R = 5000: 1,285
    files), descriptors are never closed before `close_all`, and `use()` is a dict lookup (the
    random order calls it ~2,300 times a step). Otherwise a descriptor in use is never closed
    underneath its user (reference counts). Files written since the last `sync_dirty()` are
    remembered by path so that a commit can fdatasync them even if their descriptor was closed
    meanwhile (fdatasync flushes the inode, not the fd).
    """

    def __init__(self, io: FileIO, writable: bool, max_open: int = 4096, random_access: bool = True,
                 expected_files: int = 0) -> None:
        self.io = io
        self.flags = os.O_RDWR if writable else os.O_RDONLY
        soft = raise_nofile_limit(2 * min(max_open, expected_files))
        self.max_open = max(8, min(max_open, soft // 2 if soft > 0 else max_open))
        self.evicting = expected_files > self.max_open
        self.random_access = random_access
        self._lock = threading.Lock()
        self._fds: OrderedDict[str, int] = OrderedDict()  # path -> fd, LRU order
        self._held: dict[str, _Held] = {}  # fast path (not evicting)
        self._users: dict[str, int] = {}
        self._dirty: set[str] = set()

    def _open_locked(self, path: str) -> int:
        fd = self.io.open(path, self.flags)
        if self.random_access:  # no kernel readahead: a row read moves one row, not 8 MB
            self.io.fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._fds[path] = fd
        return fd

    def use(self, path: str):  # a context manager yielding the fd
        if not self.evicting:
            held = self._held.get(path)
            if held is None:
                with self._lock:
                    held = self._held.get(path)
                    if held is None:
                        held = self._held[path] = _Held(self._open_locked(path))
            return held
        return self._use_counted(path)

    @contextlib.contextmanager
    def _use_counted(self, path: str) -> Iterator[int]:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._open_locked(path)
                self._evict_locked()
            else:
                self._fds.move_to_end(path)
            self._users[path] = self._users.get(path, 0) + 1
        try:
            yield fd
        finally:
            with self._lock:
                self._users[path] -= 1
                if not self._users[path]:
                    del self._users[path]

    def _evict_locked(self) -> None:
        if len(self._fds) <= self.max_open:
            return
        for path in list(self._fds):
            if len(self._fds) <= self.max_open:
                break
            if path not in self._users:
                self.io.close(self._fds.pop(path))

    def mark_dirty(self, paths: Sequence[str]) -> None:
        with self._lock:
            self._dirty.update(paths)

    def sync_dirty(self, pool: Executor | None = None) -> int:
        """fdatasync every file written since the last call (in parallel on `pool`); returns how many."""
        with self._lock:
            paths, self._dirty = sorted(self._dirty), set()

        def sync(p: str) -> None:
            with self.use(p) as fd:
                self.io.fdatasync(fd)

        try:
            if pool is None:
                for p in paths:
                    sync(p)
            else:
                for f in [pool.submit(sync, p) for p in paths]:
                    f.result()
        except BaseException:
            self.mark_dirty(paths)  # still not durable: a later sync retries them
            raise
        return len(paths)

    def close_all(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    self.io.close(fd)
            self._fds.clear()
            self._held.clear()
