"""Who may write a head store: one process at a time, on a writable file system.

`acquire_writer_lock` takes an exclusive flock on `undo_log/writer.lock` (released when its fd is
closed, also by a crash; `release_writer_lock` closes it). A forked child (a loader worker) would
share the lock through its copy of the fd and keep the store locked after the trainer is killed,
until the orphan notices: children close their copies at fork (`os.register_at_fork`).
`check_writable` turns EROFS/EACCES into an error that says how to open the store read-only for
export or evaluation.
"""

from __future__ import annotations

import errno
import fcntl
import os

from diet_engine.storage.head.errors import HeadStoreError, HeadStoreReadOnlyError
from diet_engine.storage.head.file_io import FileIO
from diet_engine.storage.head.zarr_layout import DATA_ARRAYS, LOCK_FILE, HeadLayout

_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _not_writable(root: str, what: str, e: OSError) -> HeadStoreReadOnlyError:
    err = HeadStoreReadOnlyError(
        f"head store {root} is not writable ({what}{e.strerror}): training needs a writable store; "
        "open it with mode='r' to read it for export or evaluation"
    )
    err.__cause__ = e
    return err


_HELD: set[int] = set()  # lock fds of this process


def _close_inherited_locks() -> None:
    """In a forked child: drop the parent's lock fds (the parent keeps its locks)."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def close_in_forked_children(fd: int) -> None:
    """Register a lock fd of this process: forked children close their copy (the parent keeps the lock)."""
    _HELD.add(fd)


def release_writer_lock(fd: int) -> None:
    """Close the lock fd (releases the lock)."""
    _HELD.discard(fd)
    os.close(fd)


def acquire_writer_lock(layout: HeadLayout, io: FileIO) -> int:
    """The fd holding the store's exclusive writer lock (close it to release)."""
    try:
        fd = io.open(f"{layout.undo_dir}/{LOCK_FILE}", os.O_RDWR | os.O_CREAT)
    except OSError as e:
        if e.errno in _READ_ONLY:
            raise _not_writable(layout.root, "", e) from e
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HeadStoreError(
            f"head store {layout.root} is already open for writing by another process or store "
            "object (a store has one writer); close it first, or open this one with mode='r'"
        ) from None
    _HELD.add(fd)
    return fd


def check_writable(layout: HeadLayout, chunk: int, io: FileIO) -> None:
    """Open one chunk file of each data array read-write (and check permissions, for non-root users)."""
    for name in DATA_ARRAYS:
        path = layout.chunk_path(name, chunk)
        try:
            if not os.access(path, os.W_OK) or not os.access(layout.undo_dir, os.W_OK):
                raise PermissionError(errno.EACCES, "permission denied")
            io.close(io.open(path, os.O_RDWR))
        except OSError as e:
            if e.errno in _READ_ONLY:
                raise _not_writable(layout.root, f"{path}: ", e) from e
            raise
