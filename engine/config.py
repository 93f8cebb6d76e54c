"""Typed run configuration: one dataclass per component, each field documented beside it.

`RunConfig` is what `diet train` resolves from defaults + a YAML/JSON file + command-line
overrides (`--section.field=value`, e.g. `--optim.lr=2e-3`), validates, and writes into the run
folder as `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option."""


@dataclasses.dataclass
class DataConfig:
    manifest: str = "data/digits/train"
    """training shards: a folder holding manifest.json (or the manifest file itself)."""
    eval_train_manifest: str = ""
    """labelled split used as the kNN bank / probe training set ('' = the training manifest)."""
    eval_test_manifest: str = ""
    """labelled split evaluated by kNN / probe / RankMe ('' = no evaluation)."""
    train_shards: int = 0
    """train on the first K shards of `manifest` only (samples 0..n-1: the head has n rows); 0: all.
    A budget knob: fewer rows, each visited more often in the same time."""
    image_size: int = 16
    """side of the square crops fed to the backbone."""
    channels: int = 3
    """channels fed to the backbone (grayscale data is repeated to 3 when 3)."""
    strength: int = 1
    """augmentation strength of the DIET paper: 1 crop+flip, 2 + colour jitter/grayscale, 3 + blur."""
    crop_scale_min: float = 0.08
    """lower bound of RandomResizedCrop's area scale."""
    flip: bool = True
    """random horizontal flips."""
    erasing: float = 0.25
    """probability of RandomErasing after normalisation (the DIET paper's Algorithm 4: 0.25)."""
    num_workers: int = 0
    """loader worker processes (0: decode in the training process)."""
    window_shards: int = 0
    """sliding window (PIC's data scheduler over shards): visit every `window_shards` consecutive
    shards of the epoch order `window_passes` times before moving on, so a head row is stepped again
    after ~window_shards·shard_size/batch steps instead of an epoch. Used when window_passes > 1."""
    window_passes: int = 1
    """visits of each sample per window, and so per epoch (an epoch has window_passes × the steps);
    1: the plain order."""
    prepare_digits: bool = False
    """prepare the embedded digits shards at `manifest`'s parent if they are missing."""
    prepare_torchvision: str = ""
    """'NAME:ROOT' (e.g. 'FashionMNIST:/usr/share/datasets/fashion-mnist'): if the shards are missing,
    write them with `diet prepare torchvision NAME --root ROOT` at `manifest`'s parent ('' = never)."""


@dataclasses.dataclass
class ModelConfig:
    backbone: str = "resnet18"
    """any torchvision classification model name; its classifier is removed."""
    small_stem: bool | None = None
    """3×3 stride-1 stem without max-pool for small images (None: on when image_size ≤ 64)."""
    projector: str = ""
    """'' for none, or 'mlp' for the s-DIET 3-layer MLP projector."""
    projector_hidden: int = 2048
    """hidden width of the projector."""
    projector_out: int = 256
    """output width of the projector (the head's d when a projector is used)."""
    normalize: bool = False
    """L2-normalise features before the head (s-DIET)."""
    sync_batchnorm: bool = False
    """convert BatchNorm to SyncBatchNorm (multi-rank runs)."""


@dataclasses.dataclass
class HeadConfig:
    loss: str = "batch"
    """'batch': softmax over the batch's rows (s-DIET); 'full': over all N rows (DIET)."""
    store: str = "memory"
    """'dense': nn.Parameter + torch.optim.AdamW (reference); 'memory': lazy optimizer, rows in RAM;
    'disk': lazy optimizer, rows in a Zarr store on disk (out of core)."""
    store_path: str = ""
    """Zarr head store for store='disk' ('' = <run_dir>/head.zarr)."""
    memory_budget_mb: int = 1024
    """host memory budget of the disk store's buffers and caches."""
    lookahead: int = 4
    """batches of rows prefetched ahead by the disk store."""
    label_smoothing: float = 0.8
    """label smoothing of the cross-entropy (DIET default 0.8)."""
    logit_scale: float = 1.0
    """logits = scale · z·w (useful with normalised features)."""
    extra_negatives: int = 0
    """batch loss: add up to this many rows of upcoming batches as extra negatives."""
    lr_scale: float = 1.0
    """the head's learning rate = the backbone's schedule × this. A row gets one update per epoch
    (N/B steps apart), so it learns far slower than the backbone; the exact lazy optimizer applies
    any per-group schedule exactly."""
    weight_decay: float = -1.0
    """the head's decoupled weight decay (-1: optim.weight_decay)."""
    init: str = "random"
    """'random': U(±1/sqrt(d)) rows (the papers); 'feature': a row becomes its sample's feature z at
    the sample's first visit (moments zero), so it starts as the sample's own target (a memory-bank
    start; use with model.normalize and a logit_scale)."""
    optimizer_mode: str = "exact"
    """lazy optimizer catch-up: 'exact' (equals dense AdamW) or 'paper' (s-DIET Eq. 18/20)."""
    seed: int = 0
    """seed of the head's initial weights."""


@dataclasses.dataclass
class OptimConfig:
    name: str = "adamw"
    """'adamw' (default) or 'sgd' (momentum)."""
    lr: float = 1e-3
    """base learning rate at batch size 256; scaled by batch_size/256."""
    weight_decay: float = 0.05
    """decoupled weight decay (AdamW) or coupled L2 (SGD)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    warmup_epochs: float = 10.0
    """linear warm-up length in epochs (a fraction of an epoch is fine)."""
    warmup_fraction: float = 0.0
    """if > 0: warm-up as a fraction of all steps (overrides warmup_epochs)."""
    final_lr_fraction: float = 0.0
    """cosine decays to base_lr × this."""
    grad_clip: float = 0.0
    """clip the backbone's gradient norm (0: off)."""


@dataclasses.dataclass
class TrainConfig:
    method: str = "diet"
    """'diet', or a memory baseline: 'simclr' (two views, NT-Xent) or 'supervised' (linear classifier on labels)."""
    epochs: int = 30
    """training epochs."""
    max_steps: int = 0
    """stop after this many steps (0: run all epochs)."""
    batch_size: int = 128
    """samples per step per rank."""
    seed: int = 0
    """seed of the backbone init and the data order."""
    run_dir: str = "runs/default"
    """output folder: config, metrics, checkpoints, exported backbone."""
    checkpoint_every: int = 0
    """save a checkpoint every K steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """number of most recent checkpoints kept."""
    resume: str = "false"
    """'true': continue from the newest checkpoint in run_dir; 'auto': do so when run_dir holds a run
    and start a new one otherwise (a requeued cluster job needs no edited command line); 'false': a
    new run. Either resume refuses a config that changes the head or the data (see allow_changes)."""
    preempt_signal: str = "SIGTERM"
    """signal that stops the run cleanly: every rank finishes its step, a checkpoint is written and
    `diet train` exits with status 75 ('SIGTERM', 'SIGUSR1', 'SIGUSR2' or 'none'; SLURM sends SIGTERM
    on preemption, or a chosen signal before the time limit with --signal=USR1@120)."""
    max_nonfinite_steps: int = 5
    """a step whose loss or gradients are not finite is skipped (backbone, head rows and moments
    untouched, counted in metrics.csv as nonfinite_skipped); more than this many in a row stop the
    run with the last checkpoint intact. -1: no check (saves one host-device sync per step)."""
    allow_changes: str = ""
    """resume only: comma-separated options (or sections) that may differ from the saved run's
    config, accepting a resume that no longer equals the uninterrupted run (e.g.
    'data.num_workers'); by default any option that changes the trajectory must be unchanged."""
    precision: str = "fp32"
    """'fp32', 'bf16' (torch autocast for the backbone; the head stays fp32) or 'fp64' (everything
    in float64: reference runs and equivalence tests, where fp32 rounding would be amplified by
    training's chaotic dynamics)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage for the backbone (0, 1 or 2)."""
    batch_ce: str = "local"
    """'local': batch CE over each rank's rows; 'global': over all ranks' rows."""
    log_every: int = 10
    """write metrics every K steps."""
    progress: bool = True
    """show a progress bar."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    simclr_temperature: float = 0.2
    """NT-Xent temperature for method='simclr'."""
    # --- SimCLR baseline: its projector lives in the objective so DeepSpeed owns it
    simclr_projector_hidden: int = 2048
    """hidden width of SimCLR's 2-layer projector (method='simclr')."""
    simclr_projector_out: int = 128
    """output width of SimCLR's projector, where NT-Xent is computed (method='simclr')."""
    num_classes: int = 0
    """classes of the linear classifier for method='supervised' (0: the manifest's label names)."""


@dataclasses.dataclass
class EvalConfig:
    enabled: bool = True
    """evaluate at the end of training when labelled splits are configured."""
    knn_k: int = 20
    """neighbours of the kNN classifier."""
    knn_temperature: float = 0.07
    """votes weighted by exp(sim / T)."""
    probe_epochs: int = 100
    """linear-probe epochs on frozen, standardised features."""
    random_init_baseline: bool = True
    """also evaluate the same backbone at random initialisation."""
    batch_size: int = 256
    """feature-extraction batch size."""
    every_epochs: int = 0
    """online kNN monitor: every K epochs (and before the first), log `eval/knn` (top-1 on fixed
    subsets of the evaluation splits) to metrics.csv and TensorBoard; 0: off. It does not change the
    training trajectory."""
    online_bank: int = 10000
    """samples of the bank split (data.eval_train_manifest) the online kNN uses (0: all)."""
    online_queries: int = 5000
    """samples of the query split (data.eval_test_manifest) the online kNN classifies (0: all)."""


@dataclasses.dataclass
class RunConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Values of `d` applied over `base` (default: the dataclass defaults)."""
        cfg = base if base is not None else cls()
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(d).__name__}")
        for section, values in d.items():
            if section not in _SECTIONS:
                raise ConfigError(f"unknown config section {section!r} (expected one of {sorted(_SECTIONS)})")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a mapping")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        return cfg

    def set(self, dotted: str, value: Any) -> None:
        """Set `section.field` from a Python value or a command-line string, type-checked."""
        if "." not in dotted:
            raise ConfigError(f"option {dotted!r} must look like section.field, e.g. optim.lr")
        section, key = dotted.split(".", 1)
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in {dotted!r}")
        obj = getattr(self, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if key not in fields:
            raise ConfigError(f"unknown option {dotted!r}; {section} has: {', '.join(fields)}")
        hint = typing.get_type_hints(type(obj))[key]
        setattr(obj, key, _coerce(dotted, value, hint))

    def validate(self) -> None:
        """Raise ConfigError naming the offending option."""
        resume = str(self.train.resume).lower()
        self.train.resume = _RESUME_ALIASES.get(resume, resume)
        checks = [
            (self.train.resume in ("false", "true", "auto"), "train.resume", "'true', 'false' or 'auto'"),
            (self.train.preempt_signal in ("SIGTERM", "SIGUSR1", "SIGUSR2", "none"), "train.preempt_signal",
             "'SIGTERM', 'SIGUSR1', 'SIGUSR2' or 'none'"),
            (self.train.max_nonfinite_steps >= -1, "train.max_nonfinite_steps", ">= -1 (-1: no check)"),
            (self.head.loss in ("batch", "full"), "head.loss", "'batch' or 'full'"),
            (self.head.store in ("dense", "memory", "disk"), "head.store", "'dense', 'memory' or 'disk'"),
            (not (self.head.loss == "full" and self.head.store != "dense"), "head.loss",
             "'batch' when head.store is 'memory' or 'disk' (full CE needs every row: use head.store=dense)"),
            (0.0 <= self.head.label_smoothing < 1.0, "head.label_smoothing", "a value in [0, 1)"),
            (self.head.optimizer_mode in ("exact", "paper"), "head.optimizer_mode", "'exact' or 'paper'"),
            (self.head.lr_scale > 0, "head.lr_scale", "> 0"),
            (self.head.weight_decay >= 0 or self.head.weight_decay == -1, "head.weight_decay", ">= 0, or -1"),
            (self.head.init in ("random", "feature"), "head.init", "'random' or 'feature'"),
            (self.head.extra_negatives >= 0, "head.extra_negatives", ">= 0"),
            (self.head.lookahead >= 0, "head.lookahead", ">= 0"),
            (self.optim.name in ("adamw", "sgd"), "optim.name", "'adamw' or 'sgd'"),
            (self.optim.lr > 0, "optim.lr", "> 0"),
            (self.optim.weight_decay >= 0, "optim.weight_decay", ">= 0"),
            (self.optim.warmup_epochs >= 0, "optim.warmup_epochs", ">= 0"),
            (0 <= self.optim.warmup_fraction < 1, "optim.warmup_fraction", "in [0, 1)"),
            (self.train.method in ("diet", "simclr", "supervised"), "train.method", "'diet', 'simclr' or 'supervised'"),
            (self.train.epochs >= 1, "train.epochs", ">= 1"),
            (self.train.batch_size >= 1, "train.batch_size", ">= 1"),
            (bool(self.train.run_dir.strip()), "train.run_dir", "a folder (it is empty)"),
            (self.train.max_steps >= 0, "train.max_steps", ">= 0"),
            (self.train.checkpoint_every >= 0, "train.checkpoint_every", ">= 0"),
            (self.train.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1"),
            (self.train.precision in ("fp32", "bf16", "fp64"), "train.precision", "'fp32', 'bf16' or 'fp64'"),
            (self.train.zero_stage in (0, 1, 2), "train.zero_stage", "0, 1 or 2"),
            (self.train.batch_ce in ("local", "global"), "train.batch_ce", "'local' or 'global'"),
            (self.train.device in ("auto", "cpu", "cuda"), "train.device", "'auto', 'cpu' or 'cuda'"),
            (self.train.simclr_temperature > 0, "train.simclr_temperature", "> 0"),
            (self.train.simclr_projector_hidden >= 1, "train.simclr_projector_hidden", ">= 1"),
            (self.train.simclr_projector_out >= 1, "train.simclr_projector_out", ">= 1"),
            (self.train.num_classes >= 0, "train.num_classes", ">= 0 (0: from the manifest)"),
            (self.data.strength in (1, 2, 3), "data.strength", "1, 2 or 3"),
            (self.data.channels in (1, 3), "data.channels", "1 or 3"),
            (self.data.image_size >= 4, "data.image_size", ">= 4"),
            (0 < self.data.crop_scale_min <= 1, "data.crop_scale_min", "in (0, 1]"),
            (0.0 <= self.data.erasing <= 1.0, "data.erasing", "a probability in [0, 1]"),
            (self.data.num_workers >= 0, "data.num_workers", ">= 0"),
            (self.data.train_shards >= 0, "data.train_shards", ">= 0 (0: all)"),
            (self.data.window_passes >= 1, "data.window_passes", ">= 1 (1: no sliding window)"),
            (self.data.window_passes == 1 or self.data.window_shards >= 1, "data.window_shards",
             ">= 1 when data.window_passes > 1"),
            (self.model.projector in ("", "mlp"), "model.projector", "'' or 'mlp'"),
            (self.eval.knn_k >= 1, "eval.knn_k", ">= 1"),
            (self.eval.every_epochs >= 0, "eval.every_epochs", ">= 0 (0: off)"),
            (not self.eval.every_epochs or bool(self.data.eval_test_manifest), "eval.every_epochs",
             "0 when data.eval_test_manifest is not set (the online kNN classifies its samples)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                section, key = name.split(".")
                value = getattr(getattr(self, section), key)
                raise ConfigError(f"invalid {name}={value!r}: expected {expected}")

    def save(self, path: str | Path) -> None:
        """Write the resolved config as JSON (temp name + rename)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, base: RunConfig | None = None) -> RunConfig:
        """Read a JSON (or YAML) config file, applied over `base`."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml  # noqa: PLC0415
            except ImportError as e:  # pragma: no cover
                raise ConfigError(f"{path}: reading YAML needs PyYAML; use a .json config") from e
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"config file {path} is not valid JSON: {e}") from e
        try:
            return cls.from_dict(data, base)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from e


_RESUME_ALIASES = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}
_SECTIONS = {f.name for f in dataclasses.fields(RunConfig)}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.strip("()[] ").split(",") if v.strip()]
            return tuple(a(v) for a, v in zip(args, value, strict=True))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid value {value!r} for {name}: expected {getattr(hint, '__name__', hint)}") from e
    return value
