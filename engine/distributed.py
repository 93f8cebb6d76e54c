"""Process-group set-up and the DeepSpeed engine that owns the backbone (and projector).

The head never enters DeepSpeed: it would be all-reduced densely every step. A single-process run
uses the same path with world size 1 (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (env:// rendezvous). Returns (rank, world)."""
    import deepspeed  # noqa: PLC0415 - heavy import, only when training

    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `diet train`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        backend = "nccl" if device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(train_cfg, optim_cfg) -> dict[str, Any]:
    """The DeepSpeed config of the backbone engine. bf16 runs through torch autocast instead of
    DeepSpeed's `bf16` section, which would also cast BatchNorm parameters."""
    return {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": train_cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": optim_cfg.grad_clip,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_cfg, optim_cfg):
    """deepspeed.initialize with our optimizer; checkpoints load with weights_only=True."""
    import deepspeed  # noqa: PLC0415

    engine, ds_opt, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(train_cfg, optim_cfg),
        dist_init_required=False,
    )
    engine.checkpoint_engine = _safe_checkpoint_engine()
    return engine, ds_opt


def _safe_checkpoint_engine():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: PLC0415

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, but never unpickles arbitrary objects on load."""

        def load(self, path: str, map_location=None):
            return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
