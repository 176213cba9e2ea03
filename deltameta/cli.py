"""The ``deltameta`` command line.

Each subcommand lives in its own module that exposes ``add_parser(subparsers)``; the parser it
adds sets ``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit
code. Errors derived from :class:`deltameta.errors.DeltametaError` are printed as one clear
message (exit code 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
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


def version_line() -> str:
    """Return ``deltameta X (torch ..., transformers ..., peft ..., bitsandbytes ...)`` without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    from deltameta import __version__

    parts = []
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return f"deltameta {__version__} ({', '.join(parts)})"


class _VersionAction(argparse.Action):
    """``--version``: print :func:`version_line` unwrapped and exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):  # noqa: A002
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="deltameta",
        description="Meta-learn low-rank adapter deltas on a frozen 4-bit LLM and export them as PEFT adapters.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show deltameta's version (and its main libraries') and exit")
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="show debug messages and the warnings, logs and loading bars of the libraries underneath "
             "(hidden by default); may come anywhere on the line",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def parse_command_line(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse a ``deltameta`` command line as :func:`main` does, without running it.

    Args:
        argv: The words after ``deltameta``.
        parser: The parser to use (default: :func:`build_parser`'s).

    Returns:
        The namespace, with ``verbose`` set and every ``key=value`` word in ``overrides``.

    Raises:
        SystemExit: an unrecognized word (argparse's usage error).
    """
    parser = parser or build_parser()
    # --verbose is global and may come anywhere (before `--`), e.g. after the subcommand's options
    cut = argv.index("--") if "--" in argv else len(argv)
    verbose = any(word in ("-v", "--verbose") for word in argv[:cut])
    argv = [word for word in argv[:cut] if word not in ("-v", "--verbose")] + argv[cut:]
    args, extra = parser.parse_known_args(argv)
    args.verbose = verbose
    # `key=value` overrides may come before and after options (`x=1 --overwrite y=2`):
    # argparse stops collecting positionals at the first option, so collect the rest here.
    if extra:
        if hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parse_command_line(list(sys.argv[1:] if argv is None else argv), parser)
    from deltameta.quiet import configure

    configure(verbose=args.verbose)
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
