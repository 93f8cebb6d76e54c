"""Process-group set-up and the DeepSpeed engine that owns the backbone (and projector).

The head never enters DeepSpeed: it would be all-reduced densely every step. A single-process run
uses the same path with world size 1 (gloo on CPU, nccl on CUDA).

Three things DeepSpeed does not do for us, fixed here:
* checkpoints load through `torch.load(weights_only=True)`; a ZeRO-1/2 optimizer shard pickles three
  plain-data DeepSpeed classes, which are allow-listed for our loads only;
* DeepSpeed writes `client_state` from data-parallel rank 0 only (inside `mp_rank_00_model_states.pt`)
  and hands that same dict to every rank on load; the engine's per-rank state (the record of the
  rank's head rows file when they live in RAM) is therefore also written by each rank to
  `client_state_rank{r}.pt` in the checkpoint folder and read back by that rank;
* `torch.nn.SyncBatchNorm` refuses CPU tensors; `HostSyncBatchNorm` is the same layer that also
  synchronises statistics over gloo (used by the CPU multi-rank runs and tests).

Extra DeepSpeed settings (bucket sizes, overlap_comm, ...) can be merged into the generated config
from a JSON file named by the environment variable `DIET_DEEPSPEED_CONFIG` (`diet launch
--deepspeed_config FILE` sets it on every rank); see `launch/deepspeed_configs/`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

CONFIG_ENV = "DIET_DEEPSPEED_CONFIG"
# keys the engine derives from the run config; a DIET_DEEPSPEED_CONFIG file may not set them
_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "optimizer", "scheduler", "bf16", "fp16", "gradient_clipping")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (env:// rendezvous). Returns (rank, world)."""
    import deepspeed  # noqa: PLC0415 - heavy import, only when training

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
            # plain `diet train`: a world of one. An in-process store needs no port, so concurrent
            # runs on one machine cannot collide on a rendezvous address (EADDRINUSE).
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(train_cfg, optim_cfg, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config of the backbone engine. bf16 runs through torch autocast instead of
    DeepSpeed's `bf16` section, which would also cast BatchNorm parameters.

    `extra` (default: the JSON file named by $DIET_DEEPSPEED_CONFIG, if set) is merged on top;
    its `zero_optimization` section is merged key by key, and train.zero_stage always wins."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": train_cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": optim_cfg.grad_clip,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if extra is None and os.environ.get(CONFIG_ENV):
        extra = load_extra_config(os.environ[CONFIG_ENV])
    for key, value in (extra or {}).items():
        if key == "zero_optimization":
            cfg[key] = {**value, "stage": train_cfg.zero_stage}
        else:
            cfg[key] = value
    return cfg


def load_extra_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON fragment; refuse the keys the run config owns, naming them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_ENV}={path}: no such DeepSpeed config file")
    try:
        extra = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: expected a JSON object of DeepSpeed settings")
    owned = [k for k in extra if k in _OWNED_KEYS]
    if owned:
        raise ValueError(f"{path}: {', '.join(owned)} come from the run config (train.batch_size, "
                         "optim.*, train.precision, optim.grad_clip); remove them from the DeepSpeed file")
    return extra


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_cfg, optim_cfg,
                 load_universal: bool = False):
    """deepspeed.initialize with our optimizer; checkpoints load with weights_only=True.
    `load_universal`: the checkpoint to resume is a DeepSpeed universal one (another rank count)."""
    import deepspeed  # noqa: PLC0415

    config = deepspeed_config(train_cfg, optim_cfg)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    engine, ds_opt, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False,
    )
    engine.checkpoint_engine = _safe_checkpoint_engine()
    _per_rank_client_state(engine)
    return engine, ds_opt


def _per_rank_client_state(engine) -> None:
    """Make `client_state` rank-specific: each rank also saves its own dict beside DeepSpeed's files
    and gets it back on load (DeepSpeed alone would give every rank the dict of rank 0)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return
    rank = dist.get_rank()
    ds_save, ds_load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
        client_state = {} if client_state is None else client_state
        out = ds_save(save_dir, tag=tag, client_state=client_state, save_latest=save_latest, **kwargs)
        tag = tag if tag is not None else f"global_step{engine.global_steps}"
        folder = Path(save_dir) / str(tag)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".client_state_rank{rank}.pt.tmp"
        torch.save(client_state, tmp)  # temp name + rename; the caller renames the folder after a barrier
        tmp.replace(folder / f"client_state_rank{rank}.pt")
        return out

    def load_checkpoint(load_dir, tag=None, **kwargs):
        path, client_state = ds_load(load_dir, tag=tag, **kwargs)
        if path is not None and client_state is not None and int(client_state.get("world_size", world)) != world:
            return path, client_state  # saved by another rank count: rank 0's (engine/reshard.py builds the rest)
        if path is not None:
            own = Path(path).parent / f"client_state_rank{rank}.pt"
            if not own.is_file():
                raise FileNotFoundError(f"{own}: this rank's part of checkpoint {Path(path).parent.name} is "
                                        "missing (written by an older build, or by a different world size?)")
            client_state = torch.load(own, map_location="cpu", weights_only=True)
        return path, client_state

    # instance attributes shadow the engine's methods for this engine only
    engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint


def _deepspeed_checkpoint_globals() -> list:
    """The few plain-data DeepSpeed classes a ZeRO-1/2 optimizer shard pickles (measured on
    deepspeed 0.19: the static loss scaler, the stage enum and fp32 fragment addresses). Allowed
    only inside our loads; nothing else is ever unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    extra = [LossScaler, ZeroStageEnum, fragment_address]
    try:  # dynamic loss scaling (fp16 configs) pickles this subclass
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler  # noqa: PLC0415

        extra.append(DynamicLossScaler)
    except ImportError:  # pragma: no cover - older/newer DeepSpeed layouts
        pass
    return extra


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside runs with weights_only=True (TORCH_FORCE_WEIGHTS_ONLY_LOAD) and the
    allow-listed DeepSpeed classes: DeepSpeed's universal-checkpoint converter and loader call
    torch.load(weights_only=False) on files of our own run, which we still never unpickle as objects."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with _allowed(_deepspeed_checkpoint_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _allowed(extra: list):
    """`safe_globals` for the classes not allowed yet: torch's context removes its classes on exit,
    which would also disallow them for an enclosing context that allowed the same ones."""
    have = set(torch.serialization.get_safe_globals())
    return torch.serialization.safe_globals([g for g in extra if g not in have])


def _safe_checkpoint_engine():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: PLC0415

    allowed = _deepspeed_checkpoint_globals()

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, but never unpickles arbitrary objects on load: tensors,
        containers and primitives, plus the plain-data DeepSpeed classes listed above."""

        def load(self, path: str, map_location=None):
            with _allowed(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine()


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is the sum of gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class HostSyncBatchNorm(nn.SyncBatchNorm):
    """`nn.SyncBatchNorm` that also works on CPU tensors (gloo): batch statistics over all ranks.

    On CUDA it is torch's layer unchanged. On CPU, in training with W > 1 ranks: two all-reduces
    per call (Σx and n, then Σ(x - mean)²; two passes, as accurate as BatchNorm on one process),
    the biased variance normalises, the unbiased one updates `running_var`, as in torch's layer.
    Same parameters and buffers as `nn.SyncBatchNorm`, so state dicts are interchangeable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        group = self.process_group or dist.group.WORLD
        if not (self.training and dist.is_initialized() and dist.get_world_size(group) > 1):
            return nn.modules.batchnorm._BatchNorm.forward(self, x)  # plain BatchNorm (world 1, eval)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # fp32 statistics under autocast
        first = _AllReduceSum.apply(torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() // c)]), group)  # (C+1,)
        n = first[-1]
        mean = first[:c] / n  # (C,)
        xc = xf - mean.view(shape)
        var = _AllReduceSum.apply((xc * xc).sum(dims), group) / n  # (C,) biased
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        y = y.to(x.dtype)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return y


def host_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Let every `nn.SyncBatchNorm` of `model` also run on CPU (see HostSyncBatchNorm); in place."""
    for m in model.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = HostSyncBatchNorm  # same state, forward that knows gloo
    return model


def rank_store_path(store_path: str, run_dir: str | Path, rank: int, world: int) -> str:
    """The on-disk head store of this rank: each rank owns its shards' rows, so each has its own store
    (a single writer per chunk; node-local disks work).

    ''      → <run_dir>/head.zarr (one rank) or <run_dir>/head-rank{r}.zarr
    'PATH'  → PATH (one rank) or PATH/head-rank{r}.zarr
    'PATH/x-{rank}.zarr' → '{rank}' replaced by the rank (e.g. a node-local scratch folder)
    """
    if "{rank}" in store_path:
        return store_path.replace("{rank}", str(rank))
    if not store_path:
        return str(Path(run_dir) / ("head.zarr" if world == 1 else f"head-rank{rank}.zarr"))
    return store_path if world == 1 else str(Path(store_path) / f"head-rank{rank}.zarr")


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
