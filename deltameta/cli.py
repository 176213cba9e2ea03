"""The ``deltameta`` command line.

Each subcommand lives in its own module that exposes ``add_parser(subparsers)``; the parser it
adds sets ``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit
code. Errors derived from :class:`deltameta.errors.DeltametaError` are printed as one clear
message (exit code 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from deltameta.errors import DeltametaError

#: Modules that define subcommands, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "deltameta.commands.meta_train",
    "deltameta.commands.finetune",
    "deltameta.commands.evaluate",
    "deltameta.commands.export",
    "deltameta.commands.tasks",
    "deltameta.commands.models",
    "deltameta.commands.recipes",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="deltameta",
        description="Meta-learn low-rank adapter deltas on a frozen 4-bit LLM and export them as PEFT adapters.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come before and after options (`x=1 --overwrite y=2`):
    # argparse stops collecting positionals at the first option, so collect the rest here.
    if extra:
        if hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except DeltametaError as error:
        print(f"deltameta {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deltameta {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
