"""`diet prepare`: write WebDataset shards + manifest.json, or index existing shards.

    diet prepare digits --out data/digits                    # → data/digits/{train,test}/
    diet prepare folder IMAGES --out data/mine [--resize 256] [--skip-bad]
    diet prepare synthetic --out data/synth --num-samples 1281167 [--size 8 --channels 1]
    diet prepare torchvision FashionMNIST --root /usr/share/datasets/fashion-mnist --out data/fashion-mnist
    diet prepare index data/others/ [--out data/others/manifest.json]
"""

from __future__ import annotations

import argparse

# (the registry's names, without importing torch and torchvision for the help text)
TORCHVISION_SETS = ("MNIST", "FashionMNIST", "KMNIST", "EMNIST", "CIFAR10", "CIFAR100", "SVHN", "STL10", "Food101",
                    "Flowers102", "DTD", "OxfordIIITPet", "ImageNet")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="write dataset shards (WebDataset tars + manifest.json)",
                       description="Write WebDataset tar shards with stable global indices and a manifest.")
    src = p.add_subparsers(dest="source", metavar="SOURCE", required=True)

    def common(q: argparse.ArgumentParser, shard_size: int) -> None:
        q.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
        q.add_argument("--shard-size", type=int, default=shard_size,
                       help=f"samples per shard R; also the head store's chunk rows (default {shard_size})")
        q.add_argument("--overwrite", action="store_true", help="replace an existing output")

    q = src.add_parser("digits", help="scikit-learn's 1,797 8×8 handwritten digits, stratified train/test split")
    common(q, 256)
    q.add_argument("--test-fraction", type=float, default=0.2, help="fraction held out as test (default 0.2)")
    q.add_argument("--seed", type=int, default=0, help="split seed (default 0)")

    q = src.add_parser("folder", help="a folder of images: class subfolders (labels) or flat (no labels)")
    q.add_argument("root", help="image folder")
    common(q, 1000)
    q.add_argument("--resize", type=int, default=None, help="resize the shorter side to this many pixels")
    q.add_argument("--format", dest="image_format", choices=("keep", "jpg", "png"), default="keep",
                   help="keep: copy JPEG/PNG bytes when possible (default); jpg/png: re-encode")
    q.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default 95)")
    q.add_argument("--channels", type=int, choices=(1, 3), default=3, help="decode as gray (1) or RGB (3)")
    q.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted in the manifest)")
    q.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")

    q = src.add_parser("synthetic", help="N deterministic tiny images for scale tests")
    common(q, 1000)
    q.add_argument("--num-samples", type=int, required=True, help="N, e.g. 1281167")
    q.add_argument("--size", type=int, default=8, help="image side in pixels (default 8)")
    q.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 gray or 3 RGB (default 1)")
    q.add_argument("--num-classes", type=int, default=10, help="labels are index %% num_classes (default 10)")
    q.add_argument("--seed", type=int, default=0, help="image seed (default 0)")
    q.add_argument("--workers", type=int, default=None, help="writer processes (default: all cores)")

    q = src.add_parser("torchvision", help="a torchvision classification data set, read by its torchvision class",
                       description="Shards of a torchvision.datasets classification data set, one shard set per "
                                   "split in OUT/<split>/, sample n = dataset[n]. Supported: "
                                   + ", ".join(TORCHVISION_SETS) + ". (Fashion-)MNIST idx files may also sit in a "
                                   "flat folder, gzipped or not (Debian: apt-get install dataset-fashion-mnist).")
    q.add_argument("name", metavar="NAME", help="data set: " + ", ".join(TORCHVISION_SETS))
    q.add_argument("--root", required=True, help="folder torchvision reads (its `root`), or a flat folder of idx files")
    common(q, 1000)
    q.add_argument("--split", action="append", default=None,
                   help="split(s) to write, repeated or comma-separated, e.g. train,test (default: the data set's "
                        "train and test splits; also val where it has one)")
    q.add_argument("--variant", default=None, help="EMNIST's split (byclass, balanced, ...) or DTD's partition (1-10)")
    q.add_argument("--download", action="store_true", help="let torchvision download missing files (needs internet)")
    q.add_argument("--workers", type=int, default=None,
                   help="decode processes for data sets stored as image files (default: all cores)")

    q = src.add_parser("index", help="write manifest.json for existing WebDataset shards, without rewriting them")
    q.add_argument("inputs", nargs="+", help="a folder of .tar shards, or shard files")
    q.add_argument("--out", default=None, help="manifest path or folder (default: the shards' folder)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    q.add_argument("--by-position", action="store_true",
                   help="samples carry no index: number them in the listed shard order")
    q.add_argument("--stats-samples", type=int, default=1000, help="images decoded for mean/std (default 1000)")
    q.add_argument("--channels", type=int, choices=(1, 3), default=None, help="decode channels (default: detect)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from diet_engine.storage import shards  # noqa: PLC0415 (torch import only when the command runs)

    if args.source == "digits":
        ms = shards.prepare_digits(args.out, shard_size=args.shard_size, overwrite=args.overwrite,
                                   test_fraction=args.test_fraction, seed=args.seed)
        for name, m in ms.items():
            print(_summary(m, name))
    elif args.source == "folder":
        m = shards.prepare_folder(args.root, args.out, args.shard_size, channels=args.channels, resize=args.resize,
                                  image_format=args.image_format, quality=args.quality, skip_bad=args.skip_bad,
                                  overwrite=args.overwrite, workers=args.workers)
        print(_summary(m))
        if m.source.get("skipped"):
            print(f"skipped {m.source['skipped']} unreadable images (listed in manifest.json)")
    elif args.source == "synthetic":
        m = shards.prepare_synthetic(args.out, args.num_samples, args.shard_size, size=args.size,
                                     channels=args.channels, num_classes=args.num_classes, seed=args.seed,
                                     overwrite=args.overwrite, workers=args.workers)
        print(_summary(m))
    elif args.source == "torchvision":
        splits = [p for v in args.split for p in v.split(",") if p] if args.split else None
        ms = shards.prepare_torchvision(args.name, args.root, args.out, splits, variant=args.variant,
                                        download=args.download, shard_size=args.shard_size, overwrite=args.overwrite,
                                        workers=args.workers)
        for name, m in ms.items():
            print(_summary(m, name))
    else:
        inputs = args.inputs[0] if len(args.inputs) == 1 else args.inputs
        m = shards.index_shards(inputs, args.out, overwrite=args.overwrite, by_position=args.by_position,
                                stats_samples=args.stats_samples, channels=args.channels)
        print(_summary(m))
    return 0


def _summary(m, name: str = "") -> str:
    im = m.image
    labels = f"{m.num_classes} classes" if m.num_classes else "no labels"
    return (f"{m.root}{'' if not name else f' ({name})'}: {m.num_samples} samples in {m.num_shards} shards "
            f"of ≤{m.shard_size}, {im.channels}×{im.height}×{im.width}{'' if im.uniform_size else ' (typical)'}, "
            f"{labels}, mean {im.mean} std {im.std}")
