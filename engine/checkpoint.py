"""Checkpoints: a consistent cut of backbone, optimizer, loader position and head.

Layout under `<run_dir>/checkpoints/`: one folder per checkpoint `step_00001234/` written by
DeepSpeed (`save_checkpoint` with the engine's own state in `client_state`), and a `latest` file.
A head whose rows live in RAM also writes them there, one file per rank (`head_rank{r}.safetensors`,
block by block: storage/head/rows_file.py); `client_state` keeps only its metadata, size and checksums.

Protocol for step S (crash-safe at every instant):
  1. `head.commit(S)`: every head row durable at S (the disk store keeps undo data back to the
     previous commit, so a crash before step 3 can still roll it back).
  2. every rank writes its head files (`head.save_files`: temp name, fsync, rename) into
     `checkpoints/.tmp-step_S/`, then DeepSpeed writes its files there (every rank), then rank 0
     renames the folder to `step_S/` (atomic on POSIX).
  3. rank 0 replaces `latest` (temp name + rename), then prunes old checkpoints.
Resume reads `latest`, loads it with `torch.load(weights_only=True)` (never unpickling objects),
the head's files (`head.load_files`, checked against their recorded sizes and checksums) and
`head.recover(S)`; it first deletes unfinished checkpoints (newer than `latest`, with whatever
head files they hold), and with no checkpoint at all it rolls the head back to its creation (`recover(0)`).
A checkpoint written by another number of ranks loads too (engine/reshard.py): the backbone from
DeepSpeed's universal copy `universal/<tag>` (ZeRO-1/2), the head through `head_loader`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from diet_engine.engine.distributed import barrier
from diet_engine.storage.faults import fault_point

FORMAT_VERSION = 3  # 2: the head's state is its store's own (`{'store': ...}`); 3: a memory store's rows in a file
UNIVERSAL_DIR = "universal"  # checkpoints/universal/<tag>: a DeepSpeed universal copy (engine/reshard.py)
BACKBONE_FORMAT_VERSION = 1  # the exported backbone file (safetensors + metadata)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the previous one is intact."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(run_dir: str | Path) -> str | None:
    f = checkpoint_dir(run_dir) / "latest"
    if not f.exists():
        return None
    tag = f.read_text().strip()
    if not (checkpoint_dir(run_dir) / tag).is_dir():
        raise FileNotFoundError(f"{f} names checkpoint {tag!r}, which does not exist")
    return tag


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    """Checkpoints of a run's stateful components, written and read with the protocol above.

    `engine`: the DeepSpeed engine (backbone, its optimizer, objective parameters), which writes the
    checkpoint folder. `position`: where training stands (the trainer: step, epoch, batch in epoch,
    world size), stored at the top of DeepSpeed's `client_state`. `head`: the DIET head (or None),
    committed before the folder is written and recovered after it is read; its checkpoint is its
    own (`save_files`: an in-memory store's rows as a file of the folder, metadata only for a store
    durable by itself).
    """

    def __init__(self, run_dir: str | Path, engine, *, position: Stateful, head=None, is_main: bool = True,
                 keep: int = 2, universal: bool = False, head_loader=None) -> None:
        self.run_dir, self.root = Path(run_dir), checkpoint_dir(run_dir)
        self.engine, self.position, self.head = engine, position, head
        self.is_main, self.keep = is_main, keep
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0  # names its head file
        # resuming on another rank count (engine/reshard.py): load DeepSpeed's universal copy of the
        # checkpoint, and load the head with `head_loader(head, folder, client_state)`
        self.universal, self.head_loader = universal, head_loader

    def save(self, step: int) -> Path:
        """Checkpoint the components at `step` (a no-op if that step is already saved)."""
        root = self.root
        tag = tag_for(step)
        final = root / tag
        if final.is_dir():
            return final
        if self.head is not None:
            self.head.commit(step)
        tmp_tag = f".tmp-{tag}"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(root / tmp_tag, ignore_errors=True)
        barrier()
        try:
            (root / tmp_tag).mkdir(parents=True, exist_ok=True)
            # a memory head's rows go to this rank's file, block by block (no copy of the head)
            head = self.head.save_files(root / tmp_tag, f"head_rank{self.rank}") if self.head is not None else None
            client_state = {"format_version": FORMAT_VERSION, **self.position.state_dict(), "head": head}
            self.engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            if self.is_main:
                shutil.rmtree(root / tmp_tag, ignore_errors=True)  # nothing half-written stays (and the space is freed)
            prev = latest_tag(self.run_dir)
            raise CheckpointWriteError(
                f"could not write checkpoint {tag} in {root} ({e}); the last complete checkpoint is "
                f"{prev or 'none (the run restarts from the beginning)'}: free space (or fix the folder) and "
                "continue with --resume") from e
        fault_point("checkpoint")  # tests only (storage/faults.py): head committed at S, step_S not renamed
        barrier()
        if self.is_main:
            (root / tmp_tag).rename(final)
            fault_point("latest")  # tests only: step_S complete, `latest` still names the previous one
            _atomic_write_text(root / "latest", tag + "\n")
            _prune(root, self.keep)
        barrier()
        return final

    def load(self) -> int:
        """Load the newest checkpoint into the components; the step it was taken at (0: none, fresh start)."""
        tag = latest_tag(self.run_dir)
        if self.is_main:
            _discard_unfinished(self.root, tag)
        barrier()
        if tag is None:  # killed before its first checkpoint: start over, the head as created (step 0)
            if self.head is not None:
                self.head.recover(0)
            return 0
        if self.universal:
            from diet_engine.engine.distributed import weights_only_loads  # noqa: PLC0415

            with weights_only_loads():  # DeepSpeed's universal loader calls torch.load(weights_only=False)
                path, client_state = self.engine.load_checkpoint(
                    str(self.root / UNIVERSAL_DIR), tag=tag, load_optimizer_states=True,
                    load_lr_scheduler_states=False)
            _load_buffers(self.engine, self.root / tag)
        else:
            path, client_state = self.engine.load_checkpoint(
                str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None or client_state is None:
            raise RuntimeError(f"could not load checkpoint {tag} from {self.root}")
        if client_state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"checkpoint {tag}: format version {client_state.get('format_version')} "
                             f"!= {FORMAT_VERSION} supported by this build")
        position = {k: v for k, v in client_state.items() if k not in ("format_version", "head")}
        self.position.load_state_dict(position)
        step = int(position["step"])
        if self.head is not None:
            if self.head_loader is not None:  # saved by another rank count
                self.head_loader(self.head, self.root / tag, client_state)
            else:
                self.head.load_files(self.root / tag, client_state["head"])  # in-memory heads: the rows file
            self.head.recover(step)  # disk heads: roll rows written after the checkpoint back
        return step


def _load_buffers(engine, folder: Path) -> None:
    """Buffers (BatchNorm's running statistics) from the checkpoint's module state: DeepSpeed's
    universal load restores parameters and optimizer state only (measured on deepspeed 0.19.8: the
    running statistics kept their initial values)."""
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model states")
    saved = engine.checkpoint_engine.load(str(files[0]), map_location="cpu")["module"]
    with torch.no_grad():
        for name, buf in engine.module.named_buffers():
            if name not in saved:
                raise KeyError(f"{files[0]}: the checkpoint's module has no buffer {name!r}")
            buf.copy_(saved[name])


def read_client_state(folder: str | Path) -> dict:
    """Rank 0's `client_state` of a checkpoint folder (the trainer's position and head entry), read
    from DeepSpeed's model states file with weights_only=True."""
    folder = Path(folder)
    files = sorted(folder.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model states")
    from diet_engine.engine.distributed import _deepspeed_checkpoint_globals  # noqa: PLC0415

    with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
        state = torch.load(files[0], map_location="cpu", weights_only=True)  # never unpickles objects
    keys = ("format_version", "step", "epoch", "batch_in_epoch", "world_size", "nonfinite_skipped",
            "epoch_segments", "lrs", "head")
    return {k: state[k] for k in keys if k in state}


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _discard_unfinished(root: Path, tag: str | None) -> None:
    """Remove what a killed run left beyond `latest`: `.tmp-step_*` folders and `step_*` folders
    renamed but never named by `latest` (`save` would take such a folder for a finished save)."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        newer = p.name.startswith("step_") and (tag is None or p.name > tag)
        if p.is_dir() and (p.name.startswith(".tmp-") or newer):
            shutil.rmtree(p)


def export_backbone(model: torch.nn.Module, cfg, path: str | Path) -> Path:
    """Write the backbone's state dict as safetensors (temp name + rename), with how to rebuild it."""
    from safetensors.torch import save_file  # noqa: PLC0415

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    small = cfg.model.small_stem if cfg.model.small_stem is not None else cfg.data.image_size <= 64
    meta = {"format_version": str(BACKBONE_FORMAT_VERSION), "backbone": cfg.model.backbone,
            "small_stem": json.dumps(small),
            "in_channels": str(cfg.data.channels), "image_size": str(cfg.data.image_size)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_backbone(path: str | Path) -> torch.nn.Module:
    """Rebuild the torchvision backbone (classifier removed) and load exported weights."""
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    from diet_engine.engine.model import build_backbone  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported backbone at {path}")
    try:  # safetensors parses a header and raw tensors only: nothing is unpickled
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # SafetensorError (not an OSError): a damaged or truncated file
        raise ValueError(f"{path} is not a readable safetensors file ({e}); export it again with `diet train`") from e
    if "backbone" not in meta:
        raise ValueError(f"{path} has no 'backbone' metadata; was it written by `diet train`?")
    try:
        small_stem, in_channels = json.loads(meta.get("small_stem", "false")), int(meta.get("in_channels", "3"))
    except ValueError as e:
        raise ValueError(f"{path}: malformed metadata small_stem/in_channels ({e})") from e
    net, _ = build_backbone(meta["backbone"], small_stem=small_stem, in_channels=in_channels)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:  # missing/unexpected keys or shapes: another architecture than its metadata says
        first = str(e).strip().splitlines()
        raise ValueError(f"{path}: its weights do not fit a {meta['backbone']} backbone "
                         f"(small_stem={small_stem}, in_channels={in_channels}): {' '.join(first[:2])[:300]}") from e
    return net
