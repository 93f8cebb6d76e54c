"""The `diet` command line: thin wrappers that parse arguments and call the engine.

    diet train [--config FILE] [--section.field=VALUE ...]   # no arguments: the embedded default run
    diet prepare {digits,folder,synthetic,torchvision,index} ...
    diet eval --backbone runs/X/backbone.safetensors ...
    diet head export ...
"""

from __future__ import annotations

import argparse
import sys

from diet_engine.engine.config import ConfigError
from diet_engine.engine.stopping import TrainingDivergedError
from diet_engine.storage.head.errors import HeadStoreError

# Failures of the user's input, files or disk: one `diet <command>: error:` line, exit status 2.
# Anything else is a bug and keeps its traceback.
_EXPECTED = (ConfigError, HeadStoreError, TrainingDivergedError, FileNotFoundError, FileExistsError, ValueError,
             PermissionError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diet", description="DIET self-supervised learning at any data-set size.",
                                     epilog="--debug (anywhere): show the traceback of an expected error too.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from diet_engine.launch import eval as eval_cmd  # noqa: PLC0415
    from diet_engine.launch import prepare, train  # noqa: PLC0415

    train.add_parser(sub)
    prepare.add_parser(sub)
    eval_cmd.add_parser(sub)
    for optional in ("head", "bench", "launcher"):
        try:
            mod = __import__(f"diet_engine.launch.{optional}", fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the embedded default run
    debug = "--debug" in argv  # tracebacks for expected errors too (reporting a bug)
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    takes_overrides = args.command == "train"
    if rest and not takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args, rest) if takes_overrides else args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"diet {args.command}: interrupted", file=sys.stderr)
        return 130
    except _EXPECTED as e:
        if debug:
            raise
        print(f"diet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
