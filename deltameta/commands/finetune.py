"""``deltameta finetune``: registered so that ``--help`` works; not implemented yet (issue 6)."""

from __future__ import annotations

import argparse

from deltameta.errors import DeltametaError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``finetune``."""
    parser = subparsers.add_parser(
        "finetune",
        help="(not implemented yet) see issue 6",
        description="Not implemented yet: single-GPU fine-tuning and few-shot evaluation arrive with issue 6.",
    )
    parser.add_argument("--config", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    raise DeltametaError("'deltameta finetune' is not implemented yet (planned in issue 6); nothing was run.")
