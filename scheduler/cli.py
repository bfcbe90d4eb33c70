"""The ``mtmm`` command: one subcommand per module ``scheduler.cmd_<name>``.

Each command module defines ``add_parser(subparsers)``, which adds its parser and sets
``func`` (called with the parsed arguments, returns the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order of `mtmm --help`.
_COMMAND_MODULES = [
    "scheduler.cmd_info",
    "scheduler.cmd_plan",
    "scheduler.cmd_train",
    "scheduler.cmd_simulate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtmm",
        description="Fast multi-task multi-modal training: planner, simulator, runtime.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
