"""Test-only fault injection: SIGKILL this process the n-th time it reaches a named point.

    DIET_FAULT_KILL="scatter:17"                 # die inside the 17th chunk scatter of head rows
    DIET_FAULT_KILL="checkpoint:2,scatter:40"    # whichever comes first

Points (each a `fault_point(name)` call):
  * `scatter` (storage/head/row_io.py `RowIO.scatter`): one chunk's rows have their new `weight`
    written in place, their moments, step stamps and checksums not yet: torn rows that the undo
    log must roll back. Write-behind and recovery both scatter, so both count.
  * `checkpoint` (engine/checkpoint.py `save`): the head is committed at S and DeepSpeed's files
    are written to `.tmp-step_S/`, not yet renamed: resume must use the previous checkpoint and
    roll the head back to the one-but-newest commit.
  * `latest` (engine/checkpoint.py `save`): `step_S/` renamed into place, `latest` not yet updated:
    resume must use the previous checkpoint and not mistake the orphan `step_S/` for a saved step.
  * `rows` (storage/head/rows_file.py `write_rows_file`): a memory head's rows file of checkpoint S
    half written (its first block) under its temp name in `.tmp-step_S/`: resume must use the
    previous checkpoint. Reached once per rows file.
  * `repartition` (storage/head/repartition.py): once per chunk linked into a new rank store and
    once per rename of the switch: a kill inside the re-partition of the head between rank counts,
    which must leave the old layout (build phase) or the new one (switch phase) after `finish`.
Counts are per process. tests/integration/test_train_sigkill.py uses this to land kills inside
these windows deterministically (random-moment kills cover the rest). With the variable unset, as
always outside that test, `fault_point` costs one check of an empty dict.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "DIET_FAULT_KILL"
POINTS = ("scatter", "checkpoint", "latest", "rows", "repartition")


def _parse(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition(":")
        if name not in POINTS or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{ENV}={spec!r}: expected comma-separated POINT:N with POINT in {POINTS} and N ≥ 1, "
                             f"got {item!r}")
        out[name] = int(n)
    return out


_KILL_AT = _parse(os.environ.get(ENV, ""))
_counts: dict[str, int] = {}
_lock = threading.Lock()  # points are reached from the caller's and the write-behind thread


def fault_point(name: str) -> None:
    """SIGKILL this process (no cleanup, no flush) if `name` is armed and reached for the n-th time."""
    if not _KILL_AT or name not in _KILL_AT:
        return
    with _lock:
        _counts[name] = n = _counts.get(name, 0) + 1
    if n == _KILL_AT[name]:
        os.kill(os.getpid(), signal.SIGKILL)
