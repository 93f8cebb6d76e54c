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

*Sliding window* (`window` shards, `passes` > 1; PIC's sliding-window scheduler adapted to shards).
In step 1 the rank's permuted shards are grouped into windows of `window` consecutive shards; a
window's samples are emitted `passes` times, each pass a fresh permutation of all the window's
samples (seeded by (seed, epoch, first shard of the window, pass)), and the whole window is one
segment, so one stream reads its shards once. A sample thus recurs after about window·R/B steps
(R samples per shard) instead of a whole epoch, while at most `window` shards per stream are in
play: the disk head's chunked streaming order is kept, with `window` chunks open instead of one.
An epoch is `passes` visits of every sample (passes × the steps). passes = 1: the plain order.

*Equal steps on every rank.* steps_per_epoch = the MAXIMUM over ranks of ceil(n_r / B)
(floor with drop_last). A rank with fewer batches extends its epoch by cycling its own samples
again, in the same epoch order, up to steps·B samples (so its extra batches are full). Every
sample of every rank is seen at least once per epoch (exactly once on the longest ranks); short
ranks see a few samples twice. With balanced assignment the excess is < one shard per rank.
With drop_last the longest ranks skip their final partial batch (< B samples, different ones
each epoch); the alternative, steps = the minimum over ranks, would skip up to a shard per rank.

*The epoch in progress when the number of ranks changes* (`epoch_visits`, `continued_plan`).
A run checkpointed at batch b of epoch e on K ranks resumes on K' ranks. The epoch's history is a
list of segments [(K, b), ...] (ranks, batches done), kept in the trainer's checkpoint; the
samples it already visited, with multiplicity, are c(n) = the times n occurs in the first b
batches of the K ranks' plans of that segment (the ordinary plans for the first segment, the
continued plans below for later ones), summed over segments. Rank j of K' continues the epoch with
the samples of its own shards (those `assign_shards(counts, K')` gives it) by water-filling, in
its ordinary K' order o_j of epoch e (step 1 above, no cycling):
    pass 0: the samples of o_j with c = 0; pass 1: those with c <= 1; pass 2: c <= 2; ...
The sequence is cut to L_j samples: L_j = |pass 0| when that rank is one of the longest, else
steps·B, where steps = max over ranks of ceil(|pass 0| / B) (floor with drop_last), so every rank
runs the same number of steps. Then epoch e ends; epoch e + 1 is an ordinary K' plan. With no
history (c = 0) this is exactly the ordinary plan's cycling rule.
Bound (drop_last off): over epoch e every sample is visited at least once (its pass 0 runs in
full), and a sample of new rank j at most max(c_max_j, floor((sum of c over o_j + L_j) / n_j) + 1)
times (n_j = |o_j|; a pass ℓ starts only when every sample of o_j has been visited ℓ times). This
is 2 whenever the history visited no sample twice and the rank's visits of the epoch stay under
two passes, (sum c + L_j) < 2·n_j, as for the ordinary plan of a short rank (excess < n_j);
`continued_bound` computes it. The samples visited twice are the ones the ranks' different epoch
lengths force, as in an ordinary epoch, plus those a rank of K' had to revisit to keep the
steps equal after the re-partition (< B + max_i |pass 0_i| - |pass 0_j| on rank j).
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
                    shuffle: bool, start_batch: int = 0, window: int = 0, passes: int = 1) -> EpochPlan:
    """The plan of one rank's epoch; `start_batch` only drops work for batches < start_batch;
    `window`/`passes`: the sliding window of the design note (passes = 1: off).

    Cost: O(n_r) integer work (permutations), ~20 ms per million samples; no I/O.
    """
    B, S = batch_size, num_streams
    segments = _rank_order(first_index, counts, shards, epoch=epoch, seed=seed, rank=rank, shuffle=shuffle)
    if passes > 1:
        segments = _windows(segments, window, passes, seed=seed, epoch=epoch, shuffle=shuffle)
    order = segments[:]
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


def _rank_order(first_index: np.ndarray, counts: np.ndarray, shards: np.ndarray, *, epoch: int, seed: int,
                rank: int, shuffle: bool) -> list[np.ndarray]:
    """Step 1 of an epoch on one rank: its shards' sample segments in epoch order (each sample once)."""
    order = np.random.default_rng([seed, epoch, 0, rank]).permutation(shards) if shuffle else np.sort(shards)
    segments = []
    for s in order:
        local = (np.random.default_rng([seed, epoch, 1, int(s)]).permutation(int(counts[s])) if shuffle
                 else np.arange(int(counts[s])))
        segments.append(first_index[s] + local.astype(np.int64))
    return segments


def _windows(segments: list[np.ndarray], window: int, passes: int, *, seed: int, epoch: int,
             shuffle: bool) -> list[np.ndarray]:
    """Group shard segments (epoch order) into windows of `window` shards, each window one segment
    holding `passes` permutations of its samples (the design note's sliding window)."""
    if window < 1:
        raise ValueError(f"a sliding window needs window ≥ 1 shard, got {window}")
    out = []
    for w in range(0, len(segments), window):
        samples = np.concatenate(segments[w:w + window])
        key = int(samples.min())  # the window's identity: its lowest global index (shard order is per epoch)
        out.append(np.concatenate([
            np.random.default_rng([seed, epoch, 2, key, p]).permutation(samples) if shuffle else samples
            for p in range(passes)]))
    return out


def _water_fill(order: np.ndarray, visits: np.ndarray, length: int) -> np.ndarray:
    """Passes over `order` (pass ℓ: the samples visited ≤ ℓ times so far), cut to `length`."""
    out, have, level = [], 0, 0
    c = visits[order]
    while have < length:
        part = order[c <= level]
        out.append(part[: length - have])
        have += len(out[-1])
        level += 1
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _pass0_sizes(first_index, counts, owners, visits) -> list[int]:
    return [int(sum(int((visits[first_index[s]:first_index[s] + counts[s]] == 0).sum()) for s in o)) for o in owners]


def continued_steps(first_index: np.ndarray, counts: np.ndarray, owners: list[np.ndarray], visits: np.ndarray,
                    batch_size: int, drop_last: bool) -> int:
    """Steps left in an epoch whose samples were visited `visits` (N,) times, on `len(owners)` ranks."""
    return max(num_batches(n, batch_size, drop_last) for n in _pass0_sizes(first_index, counts, owners, visits))


def continued_plan(first_index: np.ndarray, counts: np.ndarray, shards: np.ndarray, visits: np.ndarray, *,
                   steps: int, batch_size: int, epoch: int, seed: int, rank: int, num_streams: int, drop_last: bool,
                   shuffle: bool, start_batch: int = 0) -> EpochPlan:
    """The rest of epoch `epoch` on one rank after a change of rank count (design note above):
    `steps` batches of its shards' samples by water-filling over `visits` (N,); batch k is
    streamed by stream k mod num_streams. Cost: O(n_r)."""
    B = batch_size
    order = np.concatenate(_rank_order(first_index, counts, shards, epoch=epoch, seed=seed, rank=rank,
                                       shuffle=shuffle))
    n0 = int((visits[order] == 0).sum())
    length = n0 if num_batches(n0, B, drop_last) == steps and not drop_last else steps * B
    seq = _water_fill(order, visits, length) if len(order) else np.zeros(0, np.int64)
    batches = [seq[k * B:(k + 1) * B] for k in range(steps)]
    streams: list[list[WorkItem]] = [[] for _ in range(num_streams)]
    for k in range(start_batch, steps):
        streams[k % num_streams].append(WorkItem(batches[k], (Piece(k, 0, 0, len(batches[k])),)))
    return EpochPlan(batches, streams)


def epoch_plans(first_index: np.ndarray, counts: np.ndarray, world: int, visits: np.ndarray | None, *,
                batch_size: int, epoch: int, seed: int, num_streams: int, drop_last: bool,
                shuffle: bool) -> list[EpochPlan]:
    """Every rank's plan of `epoch` on `world` ranks: ordinary (visits None) or continued."""
    owners = assign_shards(counts, world)
    kw = dict(batch_size=batch_size, epoch=epoch, seed=seed, num_streams=num_streams, drop_last=drop_last,
              shuffle=shuffle)
    if visits is None:
        steps = max(num_batches(int(counts[o].sum()), batch_size, drop_last) for o in owners)
        return [make_epoch_plan(first_index, counts, o, steps=steps, rank=r, **kw) for r, o in enumerate(owners)]
    steps = continued_steps(first_index, counts, owners, visits, batch_size, drop_last)
    return [continued_plan(first_index, counts, o, visits, steps=steps, rank=r, **kw) for r, o in enumerate(owners)]


def epoch_visits(first_index: np.ndarray, counts: np.ndarray, segments: list[tuple[int, int]], *,
                 batch_size: int, epoch: int, seed: int, num_streams: int, drop_last: bool,
                 shuffle: bool) -> np.ndarray | None:
    """(N,) int64 visits of each sample in the first batches of `epoch` that `segments`
    [(ranks, batches done), ...] ran; None for no history (an ordinary epoch). Cost: O(N) per segment."""
    if not segments:
        return None
    counts = np.asarray(counts, np.int64)
    visits = None
    for world, done in segments:
        plans = epoch_plans(first_index, counts, int(world), visits, batch_size=batch_size, epoch=epoch, seed=seed,
                            num_streams=num_streams, drop_last=drop_last, shuffle=shuffle)
        seen = [b for p in plans for b in p.batches[:int(done)]]
        add = np.bincount(np.concatenate(seen), minlength=int(counts.sum())) if seen else 0
        visits = (np.zeros(int(counts.sum()), np.int64) if visits is None else visits) + add
    return visits


def continued_bound(first_index: np.ndarray, counts: np.ndarray, shards: np.ndarray, visits: np.ndarray,
                    length: int) -> int:
    """The design note's bound on any sample's visits over the epoch, for one rank continuing it
    with `length` samples."""
    own = np.concatenate([np.arange(first_index[s], first_index[s] + counts[s]) for s in shards])
    c = visits[own]
    return max(int(c.max(initial=0)), (int(c.sum()) + length) // len(own) + 1)
