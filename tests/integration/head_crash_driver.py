"""Crash-test driver for the on-disk head store: a deterministic training loop that can be SIGKILLed.

Each step t: gather the batch's rows (prefetched `--lookahead` steps ahead) → a deterministic
optimizer update → scatter them back; every `--commit-every` steps `store.commit(t)` and then a
"backbone checkpoint" `ckpt.json` written atomically (temp + rename), exactly the trainer's order.
Started again after a kill, it resumes like the trainer: reads ckpt.json (step S'), opens the
store, `recover(S')`, optionally dumps the recovered state (`--dump-recovered`), and continues.

`--slow scatter|commit|recover` slows the matching file calls (a FileIO hook) so that a kill lands
inside that window; progress lines on stdout (`STEP t`, `COMMIT t`, `CKPT t`, `RECOVERED S`,
`DONE`) let the test pick its moment. `--hold-at T` makes one moment certain rather than likely:
after step T's rows are handed to the OS (uncommitted, so the undo log holds their pre-images) the
driver prints `HELD T` and waits to be killed. `run_reference()` runs the same sequence in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from diet_engine.storage.head import FileIO, HeadMeta, HeadStore, Lookahead, MemoryHeadStore, RowBlock, ZarrHeadStore

N, D, R, B = 2000, 32, 128, 96
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.05


def meta() -> HeadMeta:
    return HeadMeta(num_rows=N, dim=D, optimizer={"kind": "adamw", "lr": LR}, chunk_rows=R)


def batch(order: str, t: int, seed: int) -> np.ndarray:
    """Sorted unique rows of step t (1-based): random, or streaming through shuffled shards."""
    if order == "random":
        return np.unique(np.random.default_rng([seed, t]).integers(0, N, B))
    per_epoch = -(-N // B)
    epoch, k = divmod(t - 1, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    perm = np.concatenate([c * R + rng.permutation(min(R, N - c * R)) for c in rng.permutation(-(-N // R))])
    return np.unique(perm[k * B : (k + 1) * B])


class _Update:
    """Deterministic AdamW on the block (fp32, CPU, bit-reproducible), or the project's LazyAdamW."""

    def __init__(self, kind: str, steps: int) -> None:
        self.lazy = None
        if kind == "lazy":
            from diet_engine.kernels.lazy_optim import LazyAdamW

            self.lazy = LazyAdamW(np.full(steps + 1, LR), betas=BETAS, eps=EPS, weight_decay=WD)

    def __call__(self, b: RowBlock, t: int, seed: int) -> None:
        g = torch.randn(b.weight.shape, generator=torch.Generator().manual_seed(seed * 100_003 + t))
        if self.lazy is not None:
            self.lazy.step(b.rows, g, t)
            return
        b.weight.mul_(1 - LR * WD)
        b.exp_avg.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
        b.exp_avg_sq.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
        b.weight.addcdiv_(b.exp_avg, b.exp_avg_sq.sqrt().add_(EPS), value=-LR)
        b.step.fill_(t)


def train(store: HeadStore, start: int, steps: int, args, on_commit=None, say=lambda s: None) -> None:
    """Steps start+1 .. steps; commit every args.commit_every steps (then on_commit(t)); block
    after step `args.hold_at` once its writes have reached the OS (see --hold-at)."""
    hold_at = getattr(args, "hold_at", None)
    update = _Update(args.optimizer, steps)
    plan = [batch(args.order, k, args.seed) for k in range(1, steps + 1)]  # plan[t - 1]: step t's rows
    window = Lookahead(store.prefetch, plan, args.lookahead, start)
    for t in range(start + 1, steps + 1):
        window.advance()
        b = store.read_rows(plan[t - 1])
        update(b, t, args.seed)
        store.write_rows(b)
        say(f"STEP {t}")
        if t == hold_at and t % args.commit_every:
            store.drain()  # step t's writes (and their undo records) are in the files now
            say(f"HELD {t}")
            while True:
                time.sleep(1)  # until SIGKILL
        if t % args.commit_every == 0 or t == steps:
            say(f"COMMIT {t}")
            store.commit(t)
            if on_commit is not None:
                on_commit(t)


def full_state(store: HeadStore) -> dict[str, np.ndarray]:
    b = store.read_rows(np.arange(N))  # verifies every row's checksum on the disk store
    return {"w": b.weight.numpy(), "m": b.exp_avg.numpy(), "v": b.exp_avg_sq.numpy(), "s": b.step.numpy()}


def run_reference(args) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The uninterrupted run in memory: state at every commit step, and the final state."""
    store = MemoryHeadStore(meta(), seed=args.seed)
    snaps = {0: full_state(store)}
    train(store, 0, args.steps, args, on_commit=lambda t: snaps.__setitem__(t, full_state(store)))
    return snaps, full_state(store)


class _SlowIO(FileIO):
    """Widens one window: data writes (`scatter`), fdatasync (`commit`), or replay writes (`recover`)."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.recovering = False

    def pwritev(self, fd, bufs, offset):
        data = sum(len(b) for b in bufs) >= D * 4  # a row or more of weight/exp_avg/exp_avg_sq
        if data and (self.phase == "scatter" or (self.phase == "recover" and self.recovering)):
            time.sleep(0.0003)
        super().pwritev(fd, bufs, offset)

    def fdatasync(self, fd):
        if self.phase == "commit":
            time.sleep(0.004)
        super().fdatasync(fd)


def _write_ckpt(path: Path, step: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="folder of head.zarr and ckpt.json")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--commit-every", type=int, default=10)
    p.add_argument("--lookahead", type=int, default=2)
    p.add_argument("--order", choices=("random", "streaming"), default="random")
    p.add_argument("--optimizer", choices=("adamw", "lazy"), default="adamw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow", choices=("none", "scatter", "commit", "recover"), default="none")
    p.add_argument("--hold-at", type=int, help="after this (non-commit) step's writes, print HELD and wait for a kill")
    p.add_argument("--dump-recovered", help="write the state right after recovery to this .npz")
    p.add_argument("--dump-final", help="write the final state to this .npz")
    args = p.parse_args(argv)

    def say(s: str) -> None:
        print(s, flush=True)

    root, ckpt = Path(args.dir), Path(args.dir) / "ckpt.json"
    io = _SlowIO(args.slow)
    path = root / "head.zarr"
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    if (path / "zarr.json").exists():  # creation is atomic: the store exists whole or not at all
        store = ZarrHeadStore.open(path, meta(), io=io)
        io.recovering = True
        say(f"RECOVERING {start} undo_records={store.uncommitted_records}")
        store.recover(start)
        io.recovering = False
    else:
        store = ZarrHeadStore.create(path, meta(), seed=args.seed, io=io)
    say(f"RECOVERED {start}")
    if args.dump_recovered:
        np.savez(args.dump_recovered, step=start, **full_state(store))
    train(store, start, args.steps, args, on_commit=lambda t: (_write_ckpt(ckpt, t), say(f"CKPT {t}")), say=say)
    if args.dump_final:
        np.savez(args.dump_final, **full_state(store))
    store.close()
    say("DONE")


if __name__ == "__main__":
    main()
