"""`diet eval`: kNN, linear probe and RankMe of an exported backbone on labelled splits."""

from __future__ import annotations

import argparse
import json

import torch

from diet_engine.engine.config import RunConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate an exported backbone (kNN, linear probe, RankMe)")
    p.add_argument("--backbone", required=True, help="backbone.safetensors written by `diet train`")
    p.add_argument("--train", required=True, help="labelled split used as kNN bank / probe training set (shard folder)")
    p.add_argument("--test", required=True, help="labelled split to evaluate (shard folder)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the training size)")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    p.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs (default 100)")
    p.add_argument("--random-init", action="store_true", help="also evaluate the same architecture at random init")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from safetensors import safe_open  # noqa: PLC0415

    from diet_engine.engine.checkpoint import load_backbone  # noqa: PLC0415
    from diet_engine.engine.data import load_manifest  # noqa: PLC0415
    from diet_engine.engine.evaluation.report import evaluate, format_table  # noqa: PLC0415
    from diet_engine.engine.model import DietModel, build_backbone  # noqa: PLC0415

    net = load_backbone(args.backbone)
    with safe_open(args.backbone, "pt") as f:
        meta = f.metadata()
    cfg = RunConfig()
    cfg.data.manifest = args.train
    cfg.data.eval_train_manifest, cfg.data.eval_test_manifest = args.train, args.test
    cfg.data.image_size = args.image_size or int(meta.get("image_size", 224))
    cfg.data.channels = int(meta.get("in_channels", 3))
    cfg.eval.knn_k, cfg.eval.probe_epochs = args.k, args.probe_epochs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_m = load_manifest(cfg.data, "eval_train_manifest")
    test_m = load_manifest(cfg.data, "eval_test_manifest")
    rows = {meta["backbone"]: evaluate(DietModel(net, 0).to(device), cfg, train_m, test_m, device)}
    if args.random_init:
        torch.manual_seed(0)
        rand, _ = build_backbone(meta["backbone"], small_stem=json.loads(meta.get("small_stem", "false")),
                                 in_channels=cfg.data.channels)
        rows[f"{meta['backbone']} (random init)"] = evaluate(DietModel(rand, 0).to(device), cfg, train_m, test_m,
                                                             device)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows, {}))
    return 0
