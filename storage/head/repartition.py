"""Re-partition the rank stores of a head: move whole chunks (a chunk is a dataset shard) from the
stores of K ranks to the stores of K' ranks, crash-consistently.

Design note
-----------
A rank store holds the chunk files of the shards its rank owns (`chunks` attribute), each chunk
with its rows, both moments, step stamps and checksums. Changing the number of ranks changes who
owns which shard, so the chunks move between stores; their bytes never change, so the rows, the
moments and the stamps after the move equal those before, bit for bit.

Preconditions: every old store is clean at commit S (`recover(S)` done, closed); `prepare_old`
does that. Protocol, driven by a journal file (JSON, replaced atomically) beside the run:

  1. journal phase `build`: {old roots, new roots, each new store's chunks, step S}.
  2. build each new store at `<new root>.repartition-new`: the Zarr metadata of the old stores
     (group attributes: the new store's chunks, commits [S]), an empty undo log, and every chunk
     file hard-linked from the old store that holds it (a copy across file systems). The old
     stores are not written: hard links share the bytes, nothing writes them until the switch.
     A kill here: the journal says `build`, so `finish` deletes the half-built stores (roll back).
  3. journal phase `switch` (the commit point of the re-partition; fsync'ed).
  4. rename every old root to `<old root>.repartition-old`, then every new store into its root
     (old and new roots may share names: all old stores move away first). Each rename is
     idempotent to redo, and which ones are done is read off the file system.
  5. write the layout record (the new rank count) atomically; delete the old stores; delete the
     journal. A kill anywhere in 4-5: the journal says `switch`, so `finish` redoes what is left
     (roll forward).
So after a kill at any instant, `finish` leaves either the old layout (intact) or the new one.
Cost: metadata only (links and renames, O(chunks) system calls); no row is read or rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

from diet_engine.storage.faults import fault_point
from diet_engine.storage.head.errors import HeadStoreCorruptionError
from diet_engine.storage.head.file_io import FileIO
from diet_engine.storage.head.zarr_layout import (
    CHECKSUM_ARRAY,
    DATA_ARRAYS,
    STEP_ARRAY,
    UNDO_GROUP,
    HeadLayout,
    make_attrs,
    read_attrs,
)

JOURNAL_FORMAT = 1
LAYOUT_FORMAT = 1
NEW_SUFFIX = ".repartition-new"
OLD_SUFFIX = ".repartition-old"
_ARRAYS = (*DATA_ARRAYS, STEP_ARRAY, CHECKSUM_ARRAY)


# ---- the layout record --------------------------------------------------------------------------


def read_layout(path: str | os.PathLike) -> dict[str, Any] | None:
    """The layout record {format_version, world, step} at `path`, or None if there is none. It names
    the rank count whose stores hold the head (where they are follows from it: the caller's naming
    rule), so a run folder can move."""
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise HeadStoreCorruptionError(f"head layout record {os.fspath(path)} is not valid JSON ({e})") from None
    if doc.get("format_version") != LAYOUT_FORMAT:
        raise ValueError(f"head layout record {os.fspath(path)} has format version {doc.get('format_version')!r}; "
                         f"this code reads version {LAYOUT_FORMAT}")
    return doc


def write_layout(path: str | os.PathLike, world: int, step: int, io: FileIO | None = None) -> None:
    """Record (atomically) that the head lives in the stores of `world` ranks (since commit `step`)."""
    doc = {"format_version": LAYOUT_FORMAT, "world": int(world), "step": int(step)}
    (io or FileIO()).write_file_atomic(os.fspath(path), (json.dumps(doc, indent=2) + "\n").encode())


# ---- preparing the old stores -------------------------------------------------------------------


def prepare_old(roots: Sequence[str], step: int) -> None:
    """Roll each old store back to commit `step` (rows written after the checkpoint go), then close it."""
    from diet_engine.storage.head.zarr_store import ZarrHeadStore  # noqa: PLC0415 - avoids an import cycle

    for root in roots:
        if not os.path.isfile(os.path.join(root, "zarr.json")):
            raise FileNotFoundError(f"head store {root} is missing: the run's head lives in {list(roots)} and "
                                    "re-partitioning needs every one of them on this file system")
        store = ZarrHeadStore.open(root, mode="r+")
        try:
            store.recover(step)
        finally:
            store.close()


# ---- the re-partition -------------------------------------------------------------------------------


def repartition(journal: str | os.PathLike, layout_record: str | os.PathLike, old_roots: Sequence[str],
                new_roots: Sequence[str], new_chunks: Sequence[Sequence[int] | None], step: int,
                io: FileIO | None = None) -> None:
    """Move the chunks of clean old stores (at commit `step`) into new stores; see the module note.

    `new_chunks[j]`: the chunk ids new store j holds (None: every chunk, a one-rank store).
    Finishes (rolls back or forward) any earlier re-partition its journal names first.
    """
    io = io or FileIO()
    journal = os.fspath(journal)
    finish(journal, layout_record, io)
    old_roots = [os.path.abspath(r) for r in old_roots]
    new_roots = [os.path.abspath(r) for r in new_roots]
    if len(new_roots) != len(new_chunks):
        raise ValueError(f"{len(new_roots)} new stores but {len(new_chunks)} chunk lists")
    doc = {"format_version": JOURNAL_FORMAT, "phase": "build", "step": int(step), "old": old_roots,
           "new": new_roots, "chunks": [None if c is None else [int(x) for x in c] for c in new_chunks]}
    _write_journal(journal, doc, io)
    sources = _chunk_sources(old_roots)
    for root, chunks in zip(new_roots, doc["chunks"], strict=True):
        _build(root + NEW_SUFFIX, old_roots, sources, chunks, step, io)
    doc["phase"] = "switch"
    _write_journal(journal, doc, io)  # the commit point: from here on the new layout wins
    _switch(doc, layout_record, io)
    os.unlink(journal)
    io.fsync_dir(os.path.dirname(journal) or ".")


def finish(journal: str | os.PathLike, layout_record: str | os.PathLike, io: FileIO | None = None) -> str | None:
    """Complete a re-partition a kill interrupted: roll back in phase `build`, forward in `switch`.
    Returns the phase found ('build', 'switch') or None when there was no journal."""
    io = io or FileIO()
    journal = os.fspath(journal)
    try:
        with open(journal, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        doc = None  # torn before its first rename: nothing was built yet
    if doc is None or doc.get("phase") == "build":
        for root in (doc or {}).get("new", []):
            shutil.rmtree(root + NEW_SUFFIX, ignore_errors=True)
        os.unlink(journal)
        io.fsync_dir(os.path.dirname(journal) or ".")
        return "build"
    if doc.get("phase") != "switch" or doc.get("format_version") != JOURNAL_FORMAT:
        raise HeadStoreCorruptionError(f"head re-partition journal {journal} is not one this code wrote "
                                       f"(phase {doc.get('phase')!r}, format {doc.get('format_version')!r})")
    _switch(doc, layout_record, io)
    os.unlink(journal)
    io.fsync_dir(os.path.dirname(journal) or ".")
    return "switch"


def _write_journal(path: str, doc: dict[str, Any], io: FileIO) -> None:
    io.write_file_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


def _chunk_sources(old_roots: Sequence[str]) -> dict[int, str]:
    """chunk id → the old store holding its files (each chunk has exactly one owner)."""
    out: dict[int, str] = {}
    for root in old_roots:
        attrs = read_attrs(root)
        lay = HeadLayout.from_meta(root, _meta(attrs))
        chunks = range(lay.num_chunks) if attrs.get("chunks") is None else attrs["chunks"]
        for c in chunks:
            if int(c) in out:
                raise HeadStoreCorruptionError(f"chunk {c} is held by two head stores, {out[int(c)]} and {root}")
            out[int(c)] = root
    return out


def _meta(attrs: dict[str, Any]):
    from diet_engine.storage.head.base import HeadMeta  # noqa: PLC0415

    return HeadMeta.from_dict(attrs["meta"])


def _build(tmp: str, old_roots: Sequence[str], sources: dict[int, str], chunks: list[int] | None, step: int,
           io: FileIO) -> None:
    """New store at `tmp`: the old stores' metadata with its own chunks and commit, chunk files linked."""
    shutil.rmtree(tmp, ignore_errors=True)
    first = old_roots[0]
    attrs = read_attrs(first)
    meta = _meta(attrs)
    if meta.global_step != step:
        raise HeadStoreCorruptionError(f"head store {first} is at commit {meta.global_step}, expected {step}: "
                                       "recover the old stores to the checkpoint's step first")
    lay = HeadLayout.from_meta(tmp, meta)
    want = list(range(lay.num_chunks)) if chunks is None else list(chunks)
    missing = [c for c in want if c not in sources]
    if missing:
        raise HeadStoreCorruptionError(f"chunks {missing[:5]} are held by none of the head stores {list(old_roots)}")
    os.makedirs(os.path.join(tmp, UNDO_GROUP))
    for name in _ARRAYS:
        os.makedirs(os.path.join(tmp, name))
        shutil.copyfile(os.path.join(first, name, "zarr.json"), os.path.join(tmp, name, "zarr.json"))
    shutil.copyfile(os.path.join(first, UNDO_GROUP, "zarr.json"), os.path.join(tmp, UNDO_GROUP, "zarr.json"))
    with open(os.path.join(first, "zarr.json"), "rb") as f:
        group = json.load(f)
    group.setdefault("attributes", {})["diet_head"] = make_attrs(meta, int(attrs.get("seed", 0)), [step],
                                                                 None if chunks is None else want)
    io.write_file_atomic(os.path.join(tmp, "zarr.json"), json.dumps(group, indent=2).encode())
    dirs = {tmp, os.path.join(tmp, UNDO_GROUP)}
    for c in want:
        src = HeadLayout.from_meta(sources[c], meta)
        for name in _ARRAYS:
            a, b = src.chunk_path(name, c), lay.chunk_path(name, c)
            os.makedirs(os.path.dirname(b), exist_ok=True)
            dirs.update({os.path.dirname(b), os.path.join(tmp, name)})
            if os.path.exists(a):  # absent: an all-zero chunk a Zarr writer dropped (legal; reopened as such)
                _link_or_copy(a, b)
        fault_point("repartition")  # tests only: a kill with some chunks of a new store linked
    for d in sorted(dirs, key=len, reverse=True):
        io.fsync_dir(d)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system (or no hard links): a durable copy
        shutil.copyfile(src, dst)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _switch(doc: dict[str, Any], layout_record: str | os.PathLike, io: FileIO) -> None:
    """Steps 4-5 of the protocol; every action is skipped when the file system shows it done."""
    old, new = doc["old"], doc["new"]
    if all(os.path.isdir(r + NEW_SUFFIX) for r in new):  # no new store moved in yet: old ones move away first
        for r in old:
            if os.path.isdir(r) and not os.path.isdir(r + OLD_SUFFIX):
                os.rename(r, r + OLD_SUFFIX)
                io.fsync_dir(os.path.dirname(r))
                fault_point("repartition")  # tests only: a kill between the renames of the switch
    for r in new:
        if os.path.isdir(r + NEW_SUFFIX):
            if os.path.exists(r):
                raise HeadStoreCorruptionError(f"cannot move the re-partitioned head store into {r}: it exists")
            os.rename(r + NEW_SUFFIX, r)
            io.fsync_dir(os.path.dirname(r))
            fault_point("repartition")
    write_layout(layout_record, len(new), doc["step"], io)
    for r in old:
        shutil.rmtree(r + OLD_SUFFIX, ignore_errors=True)


__all__ = ["finish", "prepare_old", "read_layout", "repartition", "write_layout"]
