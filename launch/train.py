"""`diet train`: parse a config, train, evaluate, print the final table."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from diet_engine.engine.config import ConfigError, RunConfig
from diet_engine.engine.run_dir import clear_run_dir, hold_run_lock, resolve_resume
from diet_engine.engine.stopping import PREEMPTED_EXIT_STATUS
from diet_engine.launch.presets import PRESETS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train DIET (no arguments: the embedded default run on the digits data)",
        description="Train DIET. Options are `--section.field=value` (see engine/config.py), e.g. "
        "--model.backbone=resnet50 --train.batch_size=256 --head.store=disk.",
    )
    p.add_argument("--config", help="JSON/YAML config file (applied over the preset)")
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS), help="base preset (default: digits)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder "
                   "(--train.resume=auto: continue if there is a run there, else start one)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
    p.add_argument("--no-eval", action="store_true", help="skip the end-of-run evaluation")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace, overrides: list[str]) -> RunConfig:
    cfg = PRESETS[args.preset]()
    if args.config:
        cfg = RunConfig.load(args.config, base=cfg)
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"unrecognised argument {item!r}: options look like --section.field=value")
        key, value = item[2:].split("=", 1)
        cfg.set(key, value)
    if args.resume:
        cfg.train.resume = "true"
    if cfg.train.run_dir == "runs/default":
        cfg.train.run_dir = f"runs/{cfg.train.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.validate()
    resolve_resume(cfg)  # before anything is written: every rank's CLI sees the same folder
    return cfg


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = build_config(args, overrides)
    run_dir = Path(cfg.train.run_dir)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # (set by the launchers; the process group starts later)
    if main_rank and run_dir.is_dir():
        hold_run_lock(run_dir)  # refuses a folder another trainer is using, before it is cleared or resumed
    if run_dir.exists() and cfg.train.resume != "true" and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not args.overwrite:
            raise ConfigError(f"run folder {run_dir} exists; pass --resume to continue it or --overwrite to replace it")
    if main_rank and args.overwrite and cfg.train.resume != "true" and run_dir.exists():
        kept = clear_run_dir(run_dir)  # refuses unsafe folders; deletes only what the engine wrote
        if kept:
            print(f"diet train: --overwrite kept {len(kept)} entries the engine did not write in {run_dir}: "
                  f"{', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}", file=sys.stderr)
    result = train_and_evaluate(cfg, evaluate=not args.no_eval)
    if result.get("preempted"):
        print(f"diet train: stopped by {result['preempted']} at step {result['steps']}; checkpoint written in "
              f"{run_dir}/checkpoints. Continue with --train.resume=auto (or --resume); exit status "
              f"{PREEMPTED_EXIT_STATUS}", file=sys.stderr)
        return PREEMPTED_EXIT_STATUS
    if result.get("table"):
        print(result["table"])
    return 0


def train_and_evaluate(cfg: RunConfig, evaluate: bool = True) -> dict:
    """Train, export, and (rank 0, labelled splits configured) evaluate trained vs random init."""
    from diet_engine.engine.data import load_manifest  # noqa: PLC0415
    from diet_engine.engine.evaluation.report import evaluate as eval_backbone  # noqa: PLC0415
    from diet_engine.engine.evaluation.report import format_table  # noqa: PLC0415
    from diet_engine.engine.model import build_model  # noqa: PLC0415
    from diet_engine.engine.trainer import Trainer  # noqa: PLC0415

    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        result = trainer.train()
    finally:
        trainer.close()
    result["run_dir"] = str(trainer.run_dir)
    labelled = cfg.eval.enabled and cfg.data.eval_test_manifest
    if result.get("preempted") or not (evaluate and labelled and trainer.is_main):
        return result
    te = time.perf_counter()
    train_m = load_manifest(cfg.data, "eval_train_manifest" if cfg.data.eval_train_manifest else "manifest")
    test_m = load_manifest(cfg.data, "eval_test_manifest")
    name = {"diet": "DIET", "simclr": "SimCLR", "supervised": "Supervised"}[cfg.train.method]
    rows = {f"{name} {cfg.model.backbone} (trained, {trainer.step} steps)":
            eval_backbone(trainer.model, cfg, train_m, test_m, trainer.device)}
    if cfg.eval.random_init_baseline:
        rand = build_model(cfg.model, cfg.data.image_size, cfg.data.channels).to(trainer.device)
        rand.load_state_dict(trainer.initial_state)
        rows[f"{cfg.model.backbone} at random init"] = eval_backbone(rand, cfg, train_m, test_m, trainer.device)
    wall = {"train": result["train_time_s"], "eval": time.perf_counter() - te, "total": time.perf_counter() - t0}
    table = format_table(rows, wall)
    report = {"eval": rows, "wall_time_s": wall, "steps": trainer.step, "device": str(trainer.device),
              "torch": torch.__version__}
    tmp = trainer.run_dir / ".final_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(trainer.run_dir / "final_report.json")
    (trainer.run_dir / "final_report.md").write_text(table + "\n")
    result.update(report, table=table)
    return result

