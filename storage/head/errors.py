"""Errors a head store raises; each message names the store, the file or row, and what to do."""

from __future__ import annotations


class HeadStoreError(Exception):
    """Base class of every head-store error."""


class HeadStoreReadOnlyError(HeadStoreError, PermissionError):
    """A write, commit or recover on a store opened read-only, or opening an unwritable store for training."""


class HeadStoreCorruptionError(HeadStoreError):
    """A row's bytes do not match its stored checksum, or a store file has the wrong size or header."""


class HeadStoreIOError(HeadStoreError, OSError):
    """An I/O call failed (e.g. ENOSPC). `errno` is the OS error number; the last commit is intact."""
