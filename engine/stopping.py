"""How a run stops early: on request (a preemption signal) or because training diverged.

Preemption: a signal becomes a request to stop at the next step boundary.

SLURM (and most schedulers) warn a job before they end it: preemption and `scancel` send SIGTERM
(then SIGKILL after the grace time), and `#SBATCH --signal=USR1@120` sends SIGUSR1 120 s before the
time limit. With `train.preempt_signal` set to that signal, the handler only records it; every
rank finishes the step it is in, the ranks agree (one all-reduce of a flag per step when there is
more than one rank), the run writes a checkpoint through the normal crash-consistent path and
`diet train` exits with `PREEMPTED_EXIT_STATUS` (75, EX_TEMPFAIL: "try again"), which the SLURM
scripts of launch/slurm/ turn into a requeue. A second signal while the checkpoint is written is
reported and ignored; a SIGKILL at any moment leaves the previous checkpoint, as always.

Divergence: a step whose loss or gradients are not finite is skipped by the trainer; more than
`train.max_nonfinite_steps` in a row raise `TrainingDivergedError` (the CLI's one-line error, exit
status 2) and leave the last checkpoint as it was.
"""

from __future__ import annotations

import signal
import sys
import threading

PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL (sysexits.h): stopped on request, checkpoint written, resume
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class TrainingDivergedError(RuntimeError):
    """Too many steps in a row with a non-finite loss or gradients; the last checkpoint is intact."""


class StopRequest:
    """Context manager: while inside, `train.preempt_signal` sets a flag instead of ending the process."""

    def __init__(self, signal_name: str, device="cpu", world: int = 1) -> None:
        if signal_name != "none" and signal_name not in SIGNALS:
            raise ValueError(f"train.preempt_signal={signal_name!r}: expected one of {SIGNALS} or 'none'")
        self.name, self.device, self.world = signal_name, device, world
        self.received: str | None = None  # the signal that asked this rank to stop
        self._old = None

    def __enter__(self) -> StopRequest:
        # handlers can only be installed from the main thread (a Trainer driven from another thread
        # then simply runs without preemption support)
        if self.name != "none" and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(getattr(signal, self.name), self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(getattr(signal, self.name), self._old)
            self._old = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"diet train: {self.received} received: finishing this step, then writing a checkpoint",
                  file=sys.stderr, flush=True)
        else:  # e.g. SLURM's second warning: the checkpoint in progress must not be cut short
            print(f"diet train: {signal.Signals(signum).name} received again: already stopping", file=sys.stderr,
                  flush=True)

    def requested(self) -> bool:
        """Whether any rank was signalled. Collective when world > 1 (every rank calls it at every step):
        an all-reduce of one int; on CUDA also a host-device sync."""
        flag = self.received is not None
        if self.world == 1:
            return flag
        import torch  # noqa: PLC0415 - the CLI imports this module for its error type; keep that light
        import torch.distributed as dist  # noqa: PLC0415

        if dist.is_initialized():
            t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())  # host-device sync
            if flag and self.received is None:
                self.received = "another rank's signal"
        return flag
