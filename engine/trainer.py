"""The training loop: `Trainer.train()` → `train_step()` → `forward_backward()`.

One DIET step at optimizer step t (1-based), in three files (this one, engine/objectives.py and
engine/head.py) plus the kernels and the store they call:
    head.start_epoch(plan, k0)                # once per epoch: the head's prefetch window
    z = model(augment(x))                     # objectives.py: backbone under DeepSpeed, (B, d)
    loss = head.loss(z, index, t)             # head.py: rows gathered + caught up to t-1, batch or full CE
    engine.backward(loss)                     # dz → backbone grads; dR → head row grads
    engine.step(); head.step(t)               # backbone optimizer step; lazy head step t + scatter
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from diet_engine.engine.checkpoint import CheckpointManager, export_backbone, latest_tag
from diet_engine.engine.config import RunConfig
from diet_engine.engine.data import build_train_loader, load_manifest
from diet_engine.engine.distributed import barrier, build_engine, host_sync_batchnorm, init_distributed
from diet_engine.engine.global_ce import GlobalBatchCE
from diet_engine.engine.head import Head, build_head, head_meta, open_train_store
from diet_engine.engine.metrics import MetricsLogger
from diet_engine.engine.model import build_model
from diet_engine.engine.objectives import build_objective
from diet_engine.engine.optim import build_optimizer
from diet_engine.engine.reshard import (
    continued_lrs,
    continued_position,
    convert_to_universal,
    load_memory_head,
    needs_universal,
    nominal_lrs,
    record_head_layout,
    remove_universal,
    repartition_disk_head,
    saved_position,
    steps_per_epoch,
)
from diet_engine.engine.run_dir import check_resume, hold_run_lock, mark_run_dir, release_run_lock, resolve_resume
from diet_engine.engine.stopping import StopRequest, TrainingDivergedError
from diet_engine.kernels import batch_cross_entropy


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


class Trainer:
    """Builds everything from a `RunConfig` and runs (or resumes) training."""

    def __init__(self, cfg: RunConfig) -> None:
        cfg.validate()
        resolve_resume(cfg)  # train.resume=auto: 'true' if run_dir holds a run, else 'false'
        self.cfg = cfg
        self.manifest = load_manifest(cfg.data)  # bad data paths fail here, before any process-group start-up
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world = init_distributed(self.device)
        self.is_main = self.rank == 0
        self.run_dir = Path(cfg.train.run_dir)
        self._took_run_lock = self.is_main and hold_run_lock(self.run_dir)  # one trainer per run folder
        try:
            self._build(cfg)
        except BaseException:
            self._release_run_lock()
            raise

    def _build(self, cfg: RunConfig) -> None:
        """Everything from the config, in order: run folder, data, schedule, model + engine, head, position."""
        if cfg.train.resume == "true":
            check_resume(self.run_dir, cfg)  # every rank, before anything is written
        if self.is_main:
            mark_run_dir(self.run_dir, cfg)
            cfg.save(self.run_dir / "config.json")
        barrier()

        # data, and where a resumed run stands (it may have run on another rank count: engine/reshard.py)
        self.loader = build_train_loader(cfg, self.manifest, self.rank, self.world)
        self.steps_per_epoch = self.loader.steps_per_epoch()
        saved = saved_position(self.run_dir) if cfg.train.resume == "true" else None
        self.resharded = saved is not None and int(saved["world_size"]) != self.world
        if self.resharded and cfg.head.store == "dense" and cfg.train.method == "diet":
            raise ValueError(f"head.store=dense: the run was checkpointed on {saved['world_size']} ranks and each rank "
                             f"holds its own dense head; resume it on {saved['world_size']} ranks (a memory or disk "
                             "head can change the rank count)")
        # schedule over the nominal run (max_steps only truncates it, so a short run is a prefix)
        self.lrs, self.lrs_continued = self._schedule(saved)
        full = len(self.lrs)
        self.total_steps = min(full, cfg.train.max_steps) if cfg.train.max_steps else full
        if self.is_main:  # the head's lazy optimizer needs the schedule to export rows later
            tmp = self.run_dir / ".lr_schedule.npy.tmp"
            with tmp.open("wb") as f:
                np.save(f, self.lrs)
            tmp.replace(self.run_dir / "lr_schedule.npy")

        # model + DeepSpeed engine (backbone, projector)
        torch.manual_seed(cfg.train.seed)
        channels = cfg.data.channels
        self.dtype = torch.float64 if cfg.train.precision == "fp64" else torch.float32  # parameters and head
        self.model = build_model(cfg.model, cfg.data.image_size, channels).to(self.device, self.dtype)
        host_sync_batchnorm(self.model)  # distributed: SyncBatchNorm that also runs on CPU/gloo (no-op without it)
        self.initial_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        self.objective = build_objective(cfg, self.model, self.manifest, self.device).to(self.dtype)
        params = [p for p in list(self.model.parameters()) + list(self.objective.parameters()) if p.requires_grad]
        opt = build_optimizer(params, cfg.optim, float(self.lrs[0]))
        if self.dtype == torch.float64:
            _allow_fp64_gradient_reduction()
        module = _Joint(self.model, self.objective)
        universal = needs_universal(saved, self.world, cfg.train.zero_stage)
        if universal and self.is_main:  # ZeRO-1/2 optimizer partitions of K ranks → DeepSpeed's universal form
            convert_to_universal(self.run_dir, latest_tag(self.run_dir))
        barrier()
        self.engine, self.optimizer = build_engine(module, opt, cfg.train, cfg.optim, load_universal=universal)

        # head (DIET only); a disk head saved by another rank count moves to this one's stores first
        disk = cfg.train.method == "diet" and cfg.head.store == "disk"
        if disk and cfg.train.resume == "true" and self.is_main:
            repartition_disk_head(cfg, self.run_dir, self.world, self.manifest.shard_counts(),
                                  int(saved["step"]) if saved else 0, saved)
        barrier()
        self.head: Head | None = self.build_head() if cfg.train.method == "diet" else None
        barrier()
        if disk and self.is_main:
            record_head_layout(cfg, self.run_dir, self.world, int(saved["step"]) if saved else 0)

        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main)
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of `epoch` already consumed
        self.nonfinite_skipped = 0  # steps not applied because their loss or gradients were not finite
        self.nonfinite_in_row = 0
        self.online = None  # the online kNN monitor (eval.every_epochs), rank 0
        if cfg.eval.every_epochs and self.is_main:
            from diet_engine.engine.evaluation.online import OnlineKnn  # noqa: PLC0415

            which = "eval_train_manifest" if cfg.data.eval_train_manifest else "manifest"
            self.online = OnlineKnn(cfg, load_manifest(cfg.data, which), load_manifest(cfg.data, "eval_test_manifest"),
                                    self.device)
        self.epoch_segments: list[tuple[int, int]] = []  # history of `epoch` on other rank counts (plan.py)
        head_loader = None
        if self.resharded and cfg.head.store == "memory":
            m, k = self.manifest, int(saved["world_size"])
            head_loader = lambda head, folder, client: load_memory_head(  # noqa: E731
                head, folder, k, client["head"], np.asarray(m.shard_counts()), np.asarray(m.first_indices()))
        self.checkpoints = CheckpointManager(self.run_dir, self.engine, position=self, head=self.head,
                                             is_main=self.is_main, keep=cfg.train.keep_checkpoints,
                                             universal=universal, head_loader=head_loader)
        if cfg.train.resume == "true":
            self.checkpoints.load()
        if universal:
            barrier()
            if self.is_main:
                remove_universal(self.run_dir)

    def _schedule(self, saved: dict | None) -> tuple[np.ndarray, bool]:
        """The per-step learning rates (and whether they differ from the nominal schedule): the
        nominal one, the one saved with the checkpoint, or, on another rank count, the saved past
        followed by this rank count's schedule at the same epoch progress (engine/reshard.py)."""
        cfg = self.cfg
        nominal = nominal_lrs(cfg, self.steps_per_epoch, self.world)
        if saved is None:
            return nominal, False
        epoch, _, segments = continued_position(saved, self.world)
        self.loader.continue_epoch(epoch, segments)  # the rest of an epoch begun on other rank counts
        past = saved.get("lrs")
        past = None if past is None else np.asarray(past, np.float64)
        if not self.resharded:
            return (past, True) if past is not None else (nominal, False)
        k = int(saved["world_size"])
        if past is None:
            counts = np.asarray(self.manifest.shard_counts())
            past = nominal_lrs(cfg, steps_per_epoch(counts, k, cfg.train.batch_size), k)
        lrs = continued_lrs(cfg, past, int(saved["step"]), epoch, self.loader.epoch_progress(epoch),
                            self.loader.steps_in_epoch(epoch), self.steps_per_epoch, self.world)
        return lrs, True

    def build_head(self) -> Head:
        """This rank's head: its store (RAM, or its own Zarr store on disk) and its batch CE (global
        across ranks with train.batch_ce=global)."""
        cfg = self.cfg
        n, d = self.manifest.num_samples, self.model.out_dim
        store = None
        if cfg.head.store != "dense":
            meta = head_meta(cfg, n, d, self.dtype, self.manifest.shard_size)
            store = open_train_store(cfg, meta, run_dir=self.run_dir, rank=self.rank, world=self.world,
                                     owned_rows=self.loader.owned_rows() if self.world > 1 else None)
        ce = GlobalBatchCE() if cfg.train.batch_ce == "global" and self.world > 1 else batch_cross_entropy
        return build_head(cfg, self.lrs, num_rows=n, dim=d, store=store, ce=ce, world=self.world,
                          device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Where training stands: optimizer steps done, epoch, batches of it consumed, ranks, the
        steps skipped as non-finite (their count in metrics.csv goes on after a resume), the epoch's
        history on other rank counts and, once it is not the nominal one, the lr schedule."""
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "world_size": self.world, "nonfinite_skipped": self.nonfinite_skipped,
                 "epoch_segments": [[k, b] for k, b in self.epoch_segments]}
        if self.lrs_continued:
            state["lrs"] = torch.from_numpy(np.asarray(self.lrs, np.float64))  # (T,) float64
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state saved on any rank count (`continued_position`: on another one the epoch continues)."""
        self.epoch, self.batch_in_epoch, self.epoch_segments = continued_position(state, self.world)
        self.step = int(state["step"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Train to `total_steps`, or until the preemption signal: then checkpoint and return
        with `preempted` naming the signal (the CLI exits with status 75)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.train.progress and self.is_main),
                   desc=f"{cfg.train.method} {cfg.model.backbone}", dynamic_ncols=True)
        seen, window_t = 0, time.perf_counter()
        last_loss = float("nan")
        preempted = None
        with StopRequest(cfg.train.preempt_signal, self.device, self.world) as stop:
            if self.step == 0:
                self.monitor()  # the curve's epoch 0: the backbone at random init
            while self.step < self.total_steps and preempted is None:
                if self.head is not None:
                    self.head.start_epoch(self.loader.plan(self.epoch), self.batch_in_epoch)
                for batch in self.loader.epoch(self.epoch, start_batch=self.batch_in_epoch):
                    loss = self.train_step(batch)  # None: a non-finite step, skipped
                    self.batch_in_epoch += 1
                    seen += len(batch[1]) * self.world
                    if loss is not None and (self.step % cfg.train.log_every == 0 or self.step == self.total_steps):
                        last_loss = float(loss)  # host-device sync
                        now = time.perf_counter()
                        ips = seen / max(now - window_t, 1e-9)
                        seen, window_t = 0, now
                        row = {"loss": last_loss, "lr": float(self.lrs[self.step - 1]), "img_per_s": ips,
                               "epoch": self.epoch + self.batch_in_epoch / max(self._epoch_steps(), 1),
                               "nonfinite_skipped": self.nonfinite_skipped}
                        if self.head is not None:
                            row.update({f"head/{k}": v for k, v in self.head.stats().items()})
                        self.metrics.log(self.step, row)
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{ips:.0f}")
                    if loss is not None:
                        bar.update(1)
                    if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                        self.save_checkpoint()  # a no-op when this step is saved already
                    if stop.requested():  # collective on several ranks: every rank stops at the same step
                        preempted = stop.received
                        break
                    if self.step >= self.total_steps:
                        break
                if self.batch_in_epoch >= self._epoch_steps():
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self.epoch_segments = []
                    if self.epoch % max(cfg.eval.every_epochs, 1) == 0 or self.step >= self.total_steps:
                        window_t += self.monitor()  # img/s counts training time only
            bar.close()
            train_time = time.perf_counter() - t0
            self.save_checkpoint()  # a second signal meanwhile is reported and ignored (see StopRequest)
        if preempted is None:
            self.export_backbone()
        self.metrics.close()
        return {"steps": self.step, "train_time_s": train_time, "final_loss": last_loss, "preempted": preempted,
                "nonfinite_skipped": self.nonfinite_skipped}

    def monitor(self) -> float:
        """Online kNN (eval.every_epochs): logged at the current step with the epoch and its own time
        (returned, in seconds)."""
        if self.online is None:
            return 0.0
        t0 = time.perf_counter()
        knn = self.online(self.model)
        self.metrics.log(self.step, {"epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
                                     "eval/knn": knn, "eval/time_s": time.perf_counter() - t0})
        print(f"diet train: epoch {self.epoch}: online kNN {100 * knn:.2f}% ({self.online.sizes[0]} bank, "
              f"{self.online.sizes[1]} queries)", file=sys.stderr, flush=True)
        return time.perf_counter() - t0

    def _epoch_steps(self) -> int:
        """Batches of the current epoch (fewer when it continues an epoch begun on other rank counts)."""
        return self.loader.steps_in_epoch(self.epoch)

    def train_step(self, batch) -> torch.Tensor | None:
        """One optimizer step t = self.step + 1 over the batch; None if the step was not applied
        because its loss or gradients were not finite (backbone, head rows and moments untouched)."""
        t = self.step + 1
        lr = float(self.lrs[t - 1])
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss = self.forward_backward(batch, t)
        if loss is None:
            self._skip_nonfinite(t)
            return None
        self.engine.step()
        if self.head is not None:
            self.head.step(t)  # lazy step t on the batch's rows + write-behind
        self.step = t
        self.nonfinite_in_row = 0
        return loss.detach()

    def forward_backward(self, batch, t: int) -> torch.Tensor | None:
        """Loss and gradients of step t; None (nothing applied) when the loss or a gradient is not finite."""
        x, index = batch[0].to(self.device, self.dtype, non_blocking=True), batch[1]
        labels = batch[2] if len(batch) > 2 else None
        guard = self.cfg.train.max_nonfinite_steps >= 0
        # the forward pass moves BatchNorm's running statistics: keep them to undo a skipped step
        # (a copy of the model's buffers per step, ~0.2 MB for ResNet-50)
        buffers = [b.detach().clone() for b in self.engine.module.buffers()] if guard else []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16"):
            loss = self.objective.loss(self.engine, x, index.numpy(), labels, t, self.head)
        if guard and not self._all_ranks(torch.isfinite(loss.detach())):
            self._restore_buffers(buffers)  # before backward: DeepSpeed's gradient buffers are untouched
            return None
        self.engine.backward(loss)
        # ZeRO-0: every gradient is a `.grad` that can be checked and dropped. ZeRO-1/2 reduce them
        # into the optimizer's own partitions during backward, so there the loss check above is the guard.
        if guard and self.cfg.train.zero_stage == 0 and not self._all_ranks(self._grads_finite()):
            self.engine.zero_grad()  # drops every backbone `.grad`: nothing of step t is applied
            self._restore_buffers(buffers)
            return None
        return loss

    def _restore_buffers(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for b, old in zip(self.engine.module.buffers(), saved, strict=True):
                b.copy_(old)

    def _grads_finite(self) -> torch.Tensor:
        """Every gradient this rank holds is finite: the backbone's `.grad` and the head's rows."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if self.head is not None:
            grads += self.head.grads()
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.stack([torch.isfinite(g).all() for g in grads]).all()

    def _all_ranks(self, ok: torch.Tensor) -> bool:
        """True on every rank iff `ok` is true on every rank: one all-reduce (several ranks) and a
        host-device sync per call, the price of deciding before the step is applied."""
        if self.world > 1:
            flag = ok.to(torch.int32).reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = flag[0]
        return bool(ok)  # host-device sync

    def _skip_nonfinite(self, t: int) -> None:
        if self.head is not None:
            self.head.discard()  # the rows gathered for step t go back unwritten
        self.nonfinite_skipped += 1
        self.nonfinite_in_row += 1
        if self.is_main:
            print(f"diet train: step {t}: loss or gradients not finite; step skipped "
                  f"({self.nonfinite_in_row} in a row, {self.nonfinite_skipped} in all)", file=sys.stderr, flush=True)
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_in_row > limit:
            last = latest_tag(self.run_dir)
            raise TrainingDivergedError(
                f"{self.nonfinite_in_row} steps in a row (from step {t}) had a non-finite loss or gradients "
                f"(train.max_nonfinite_steps={limit}); nothing of them was applied, and the last checkpoint "
                f"({last or 'none'}) is intact: lower optim.lr, check the data, then continue with --resume")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step)

    def export_backbone(self) -> Path | None:
        if not self.is_main:
            return None
        return export_backbone(self.model, self.cfg, self.run_dir / "backbone.safetensors")

    def close(self) -> None:
        if self.head is not None:
            self.head.close()
        self._release_run_lock()

    def _release_run_lock(self) -> None:
        if self._took_run_lock:
            release_run_lock(self.run_dir)
            self._took_run_lock = False


class _Joint(torch.nn.Module):
    """What DeepSpeed owns: the model plus any trainable objective parameters (never the head)."""

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _allow_fp64_gradient_reduction() -> None:
    """DeepSpeed's accelerators list the dtypes they all-reduce; fp64 reference runs need float64,
    which gloo and nccl both reduce. Extends the list once (only for train.precision=fp64)."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    acc = get_accelerator()
    if torch.float64 not in acc.supported_dtypes():
        base = acc.supported_dtypes
        acc.supported_dtypes = lambda: [*base(), torch.float64]


__all__ = ["Trainer", "TrainingDivergedError", "resolve_device"]
