"""Glue between the run config and the shard loader: manifests, transforms, loaders."""

from __future__ import annotations

from pathlib import Path

from diet_engine.engine.augment import make_eval_transform, make_train_transform
from diet_engine.engine.simclr import TwoViews
from diet_engine.storage.shards import Manifest, ShardLoader, prepare_digits


def load_manifest(data_cfg, which: str = "manifest") -> Manifest:
    """Load the manifest named by `data_cfg.<which>`; prepare the embedded digits if asked and missing."""
    path = Path(getattr(data_cfg, which))
    if data_cfg.prepare_digits and not _manifest_file(path).exists():
        root = path.parent if path.name in ("train", "test") else path
        prepare_digits(root, overwrite=False)
    if data_cfg.prepare_torchvision and not _manifest_file(path).exists():
        from diet_engine.storage.shards import prepare_torchvision  # noqa: PLC0415

        name, _, source = data_cfg.prepare_torchvision.partition(":")
        if not source:
            raise ValueError(f"data.prepare_torchvision={data_cfg.prepare_torchvision!r}: expected NAME:ROOT")
        root = path.parent if path.name in ("train", "test") else path
        prepare_torchvision(name, source, root, progress=False)
    if not _manifest_file(path).exists():
        raise FileNotFoundError(
            f"data.{which}: no manifest at {_manifest_file(path)}; create shards with `diet prepare` first"
        )
    manifest = Manifest.load(path)
    if which == "manifest" and data_cfg.train_shards:
        manifest = manifest.first_shards(data_cfg.train_shards)
    return manifest


def _manifest_file(path: Path) -> Path:
    return path if path.suffix == ".json" else path / "manifest.json"


def manifest_stats(manifest: Manifest) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] units, from the manifest's image statistics."""
    return list(manifest.mean), list(manifest.std)


def _norm_for(channels: int, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    if len(mean) == channels:
        return mean, std
    if len(mean) == 1:  # grayscale data fed as 3 channels
        return mean * channels, std * channels
    return [sum(mean) / len(mean)] * channels, [sum(std) / len(std)] * channels


def train_transform(cfg, manifest: Manifest):
    mean, std = _norm_for(cfg.data.channels, *manifest_stats(manifest))
    transform = make_train_transform(cfg.data.image_size, cfg.data.strength, mean, std,
                                     crop_scale=(cfg.data.crop_scale_min, 1.0), flip=cfg.data.flip,
                                     erasing=cfg.data.erasing,
                                     channels=cfg.data.channels)
    if cfg.train.method == "simclr":  # SimCLR baseline: two augmented views → (2, C, H, W) per sample
        transform = TwoViews(transform)
    return transform


def eval_transform(cfg, manifest: Manifest):
    mean, std = _norm_for(cfg.data.channels, *manifest_stats(manifest))
    return make_eval_transform(cfg.data.image_size, mean, std, channels=cfg.data.channels)


def build_train_loader(cfg, manifest: Manifest, rank: int = 0, world: int = 1) -> ShardLoader:
    return ShardLoader(manifest, cfg.train.batch_size, train_transform(cfg, manifest), seed=cfg.train.seed,
                       num_workers=cfg.data.num_workers, rank=rank, world_size=world, drop_last=False,
                       with_labels=cfg.train.method == "supervised", window_shards=cfg.data.window_shards,
                       window_passes=cfg.data.window_passes)


def build_eval_loader(cfg, manifest: Manifest, train_manifest: Manifest) -> ShardLoader:
    """Deterministic, manifest-ordered, labelled loader (normalised with the training statistics)."""
    return ShardLoader(manifest, cfg.eval.batch_size, eval_transform(cfg, train_manifest), seed=0,
                       num_workers=cfg.data.num_workers, with_labels=True, shuffle=False)
