"""The prefetch window over an epoch's plan of batches: one place that says which rows are read ahead.

Before batch k of a plan is used, the rows of batch k + depth are requested (`prefetch`), so an
out-of-core store has `depth` steps to bring them in; the first `depth` batches are requested when
the window opens (depth 0: batch k is requested as it is used). The batches after k (up to
max(depth, 1) of them) are what the step may add as extra negatives. The trainer's head, the
crash-test driver, the store conformance suite and the head benchmarks all drive a store through
this class.

    window = Lookahead(store.prefetch, plan, depth=4)       # prefetches plan[0:4]
    for k in range(len(plan)):
        upcoming = window.advance()                          # prefetches plan[k + 4]; plan[k+1 : k+5]
        block = store.read_rows(np.unique(plan[k])) ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class Lookahead:
    """Prefetch `depth` batches ahead of the batch in use; the position survives a resume via `start`."""

    def __init__(self, prefetch: Callable[[np.ndarray], None], plan: Sequence[np.ndarray], depth: int,
                 start: int = 0) -> None:
        if depth < 0 or not 0 <= start <= len(plan):
            raise ValueError(f"lookahead: need depth >= 0 and 0 <= start <= {len(plan)}, got depth={depth}, "
                             f"start={start}")
        self.prefetch, self.plan, self.depth = prefetch, plan, depth
        self.next = start  # the batch the next `advance` uses
        for k in range(start, min(start + depth, len(plan))):
            prefetch(plan[k])

    def advance(self) -> Sequence[np.ndarray]:
        """Use batch `next`: request the batch `depth` after it and return the (up to max(depth, 1))
        batches that follow it, for extra negatives."""
        k = self.next
        if k >= len(self.plan):
            raise IndexError(f"lookahead: the plan has {len(self.plan)} batches; batch {k} does not exist")
        if k + self.depth < len(self.plan):
            self.prefetch(self.plan[k + self.depth])
        self.next = k + 1
        return self.plan[k + 1 : k + 1 + max(self.depth, 1)]
