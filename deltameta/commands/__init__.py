"""One module per ``deltameta`` subcommand (see :mod:`deltameta.cli`)."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence


def add_recipe_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    config_cls: type,
    *,
    help: str,  # noqa: A002 - mirrors argparse
    description: str,
    examples: Sequence[str],
    recipes: str,
    overwrite_help: str,
    run: Callable[[argparse.Namespace], int],
    options: Sequence[tuple[str, dict[str, Any]]] = (),
) -> argparse.ArgumentParser:
    """Register a recipe-driven subcommand: ``NAME [--config RECIPE] [OPTIONS] [--overwrite] [key=value ...]``.

    Its ``--help`` ends with every key of ``config_cls`` (see :func:`deltameta.config.describe_keys`)
    and the examples.

    Args:
        subparsers: The top-level parser's subparsers.
        name: The subcommand.
        config_cls: The command's config dataclass.
        help: One line for the top-level ``--help``.
        description: The subcommand's description.
        examples: Command lines shown under ``examples:``.
        recipes: Folder of the command's shipped recipes (for ``--config``'s help).
        overwrite_help: Help of ``--overwrite``.
        run: ``args -> exit code``.
        options: The command's own options, ``(flag, add_argument keywords)``, put after ``--config``.

    Returns:
        The subcommand's parser.
    """
    from deltameta.config import describe_keys

    parser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=describe_keys(config_cls) + "\n\nexamples:\n" + "\n".join(f"  {example}" for example in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="RECIPE",
                        help=f"recipe: a YAML file or a shipped recipe's name, e.g. {recipes}/NAME "
                             f"(list them: deltameta recipes ls)")
    for flag, keywords in options:
        parser.add_argument(flag, **keywords)
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see the keys below)")
    parser.set_defaults(func=run)
    return parser
