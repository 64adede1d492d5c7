"""The one `bunny` command. A thin face: each subcommand parses arguments and calls one
function that a Python user could call the same way.

Subsystems contribute their subcommands through `add_parsers(subparsers)` functions in
their own `cli` modules, imported here lazily so `bunny --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from bunny.errors import BunnyError

# (subcommand group, module providing add_parsers)
_GROUPS = [
    "bunny.convert.cli",
    "bunny.merge.cli",
    "bunny.serve.cli",
    "bunny.eval.cli",
    "bunny.select.cli",
    "bunny.data.cli",
    "bunny.train.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bunny", description="Lightweight multimodal LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name in _GROUPS:
        importlib.import_module(name).add_parsers(sub, groups)
    return parser


def get_group(sub, groups: dict, name: str, help: str):
    """Return the sub-subparsers of group `name` (e.g. `data`), creating it once.

    Several subsystems add commands under one group (`bunny data select` from select/,
    `bunny data mix` from data/), so groups are shared through this helper.
    """
    if name not in groups:
        p = sub.add_parser(name, help=help)
        groups[name] = p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
    return groups[name]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except BunnyError as exc:
        print(f"bunny: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
