"""The order of an epoch, from the manifest alone: which global indices form batch k on a rank.

Design note
-----------
*Ranks.* Shards are assigned to ranks once per run (`assign_shards`: greedy largest-first, each
shard to the rank with the fewest samples so far), so a rank owns whole shards and their head rows.

*One epoch on one rank* (`make_epoch_plan`), from `(seed, epoch, rank)` only:
  1. permute the rank's shards; permute the samples inside each shard (identity when shuffle=False);
  2. deal the shard segments round-robin to `num_streams` streams (one per loader worker; 1 for
     num_workers=0): segment j → stream j % S. Each stream reads its shards sequentially;
  3. each stream cuts its sample sequence into full batches; the DataLoader's in-order round-robin
     over workers gives the yield order: stream 0's batch 0, stream 1's batch 0, ..., stream 0's
     batch 1, ... (streams that run out are skipped);
  4. the leftovers (< B samples per stream) are concatenated in stream order and cut into the
     final "tail" batches (the last one partial, or dropped with drop_last).
  Batches are thus shard-clustered: at any time at most S shards (plus boundaries) are in play,
  which is the streaming order the on-disk head store is chunked for. The order depends on
  num_workers (S): resume with the same worker count.

*Equal steps on every rank.* steps_per_epoch = the MAXIMUM over ranks of ceil(n_r / B)
(floor with drop_last). A rank with fewer batches extends its epoch by cycling its own samples
again, in the same epoch order, up to steps·B samples (so its extra batches are full). Every
sample of every rank is seen at least once per epoch (exactly once on the longest ranks); short
ranks see a few samples twice. With balanced assignment the excess is < one shard per rank.
With drop_last the longest ranks skip their final partial batch (< B samples, different ones
each epoch); the alternative, steps = the minimum over ranks, would skip up to a shard per rank.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


def assign_shards(counts: np.ndarray | list[int], world_size: int) -> list[np.ndarray]:
    """Each rank's shard ids (ascending), balanced by sample count.

    Greedy largest-first (LPT): shards by decreasing count (ties: lower id first), each to the rank
    holding the fewest samples so far (ties: lower rank). Deterministic; O(S log W).
    """
    counts = np.asarray(counts, np.int64)
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    heap = [(0, r) for r in range(world_size)]
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for s in np.lexsort((np.arange(len(counts)), -counts)):
        load, r = heapq.heappop(heap)
        owned[r].append(int(s))
        heapq.heappush(heap, (load + int(counts[s]), r))
    return [np.array(sorted(o), np.int64) for o in owned]


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


@dataclass(frozen=True)
class Piece:
    """Part of a work item that lands in one output batch."""

    batch: int  # output batch k (position in the epoch plan)
    offset: int  # first position inside batch k
    lo: int  # slice [lo, hi) of the item's indices
    hi: int


@dataclass
class WorkItem:
    """What a stream (worker) decodes and yields in one go: a full batch, or its leftover."""

    indices: np.ndarray  # (m,) int64 global indices in output order
    pieces: tuple[Piece, ...]


@dataclass
class EpochPlan:
    batches: list[np.ndarray]  # (steps,) arrays of int64 global indices, in yield order
    streams: list[list[WorkItem]]  # per stream, its items in the order it yields them


def make_epoch_plan(first_index: np.ndarray, counts: np.ndarray, shards: np.ndarray, *, steps: int,
                    batch_size: int, epoch: int, seed: int, rank: int, num_streams: int, drop_last: bool,
                    shuffle: bool, start_batch: int = 0) -> EpochPlan:
    """The plan of one rank's epoch; `start_batch` only drops work for batches < start_batch.

    Cost: O(n_r) integer work (permutations), ~20 ms per million samples; no I/O.
    """
    B, S = batch_size, num_streams
    # 1. shard order and within-shard order
    order = np.random.default_rng([seed, epoch, 0, rank]).permutation(shards) if shuffle else np.sort(shards)
    segments = []
    for s in order:
        local = (np.random.default_rng([seed, epoch, 1, int(s)]).permutation(int(counts[s])) if shuffle
                 else np.arange(int(counts[s])))
        segments.append(first_index[s] + local.astype(np.int64))
    n_real = sum(len(g) for g in segments)
    # equal steps: a short rank cycles its own samples (same order) up to steps·B
    extra = steps * B - n_real if num_batches(n_real, B, drop_last) < steps else 0
    j = 0
    while extra > 0:
        g = segments[j % len(order)][:extra]
        segments.append(g)
        extra -= len(g)
        j += 1
    # 2. deal segments to streams; 3. full batches, round-robin over streams
    seqs = [np.concatenate(segments[s::S]) if segments[s::S] else np.zeros(0, np.int64) for s in range(S)]
    nfull = [len(q) // B for q in seqs]
    batches: list[np.ndarray] = []
    streams: list[list[WorkItem]] = [[] for _ in range(S)]
    for r in range(max(nfull, default=0)):
        for s in range(S):
            if r < nfull[s]:
                k = len(batches)
                batches.append(seqs[s][r * B:(r + 1) * B])
                if k >= start_batch:
                    streams[s].append(WorkItem(batches[-1], (Piece(k, 0, 0, B),)))
    # 4. tail: leftovers in stream order, cut into batches
    lefts = [q[n * B:] for q, n in zip(seqs, nfull, strict=True)]
    tail = np.concatenate(lefts)
    n_tail = num_batches(len(tail), B, drop_last)
    k0 = len(batches)
    batches += [tail[t * B:(t + 1) * B] for t in range(n_tail)]
    keep_lo, keep_hi = max(0, start_batch - k0) * B, min(len(tail), n_tail * B)  # kept span of `tail`
    a = 0
    for s, left in enumerate(lefts):
        lo, hi = max(a, keep_lo), min(a + len(left), keep_hi)
        if lo < hi:
            pieces, p = [], lo
            while p < hi:
                t = p // B
                q = min(hi, (t + 1) * B)
                pieces.append(Piece(k0 + t, p - t * B, p - lo, q - lo))
                p = q
            streams[s].append(WorkItem(tail[lo:hi], tuple(pieces)))
        a += len(left)
    if len(batches) != steps:  # invariant of the construction above
        raise AssertionError(f"plan has {len(batches)} batches, expected {steps}")
    return EpochPlan(batches, streams)
