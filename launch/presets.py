"""Named run presets. `digits` is the embedded default run of `diet train` with no arguments."""

from __future__ import annotations

from diet_engine.engine.config import RunConfig


def digits() -> RunConfig:
    """ResNet-18 (small stem) on scikit-learn's 8×8 digits upscaled to 16 px, batch CE, a few CPU minutes."""
    cfg = RunConfig()
    cfg.data.manifest = "data/digits/train"
    cfg.data.eval_train_manifest = "data/digits/train"
    cfg.data.eval_test_manifest = "data/digits/test"
    cfg.data.prepare_digits = True
    cfg.data.image_size = 16
    cfg.data.channels = 3
    cfg.data.strength = 1
    # 8 px digits: smaller crops cut strokes away (benchmarks/README.md, "The default run")
    cfg.data.crop_scale_min = 0.8
    cfg.data.flip = False  # digits are not mirror-symmetric
    cfg.data.erasing = 0.0  # erasing a quarter of a 16 px digit removes the digit
    cfg.model.backbone = "resnet18"
    cfg.head.loss = "batch"
    cfg.head.store = "memory"
    cfg.train.batch_size = 128
    cfg.train.epochs = 40  # 480 steps, ~4 min on 2 CPU cores (20 epochs: kNN 97.2%)
    cfg.optim.warmup_epochs = 4
    return cfg


def fashion_mnist() -> RunConfig:
    """DIET through the real path (batch CE, head on disk, exact lazy AdamW) on Fashion-MNIST, in at
    most 30 minutes on 2 CPU cores, then the evaluation table (kNN bank: the full 60,000 train images).

    Data: Debian's `dataset-fashion-mnist` idx files (prepared to shards on first use). Choices, for
    the budget (benchmarks/README.md, "Real data"):
    * 32 px, 1 channel, ResNet-18 with its ImageNet stem (stride 4: 8×8 maps after the stem). The
      small-image stem at 16 px costs ~3× more per image on this CPU for a kNN at random init within
      a point (79.1% vs 78.4% on a held-out 10k of the train split), and the budget buys epochs.
    * crops of ≥ 30% of the area, flips (garments are left-right symmetric), no erasing.
    """
    cfg = RunConfig()
    cfg.data.manifest = "data/fashion-mnist/train"
    cfg.data.eval_train_manifest = "data/fashion-mnist/train"
    cfg.data.eval_test_manifest = "data/fashion-mnist/test"
    cfg.data.prepare_torchvision = "FashionMNIST:/usr/share/datasets/fashion-mnist"
    cfg.data.image_size = 32
    cfg.data.channels = 1
    cfg.data.crop_scale_min = 0.3
    cfg.data.flip = True
    cfg.data.erasing = 0.0
    cfg.model.backbone = "resnet18"
    cfg.model.small_stem = False
    cfg.head.loss = "batch"
    cfg.head.store = "disk"
    cfg.head.optimizer_mode = "exact"
    cfg.train.batch_size = 128
    cfg.train.epochs = 3
    cfg.optim.warmup_epochs = 0.5
    cfg.eval.every_epochs = 1
    return cfg


PRESETS = {"digits": digits, "fashion-mnist": fashion_mnist}
