"""``deltameta recipes ls`` and ``deltameta recipes cp NAME DEST``: the shipped recipes."""

from __future__ import annotations

import argparse
from pathlib import Path

from deltameta.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``recipes ls`` and ``recipes cp``."""
    parser = subparsers.add_parser(
        "recipes",
        help="list the shipped recipes or copy one for editing",
        description="The recipes shipped with deltameta. Pass a name to --config from any directory "
        "(deltameta meta-train --config meta_train/smollm2_135m_tarp_bigbench), or copy one to edit it.",
    )
    actions = parser.add_subparsers(dest="recipes_command", metavar="ACTION")
    listing = actions.add_parser("ls", help="list recipe names and their purpose",
                                 description="List every shipped recipe: its name (for --config) and one-line purpose.")
    listing.set_defaults(func=_ls)
    copy = actions.add_parser(
        "cp",
        help="copy a recipe to edit it",
        description="Copy a shipped recipe to DEST (a file, or an existing directory to copy into); then run "
        "it with --config DEST.",
    )
    copy.add_argument("name", metavar="NAME", help="recipe name, e.g. finetune/smollm2_135m_cpu (see recipes ls)")
    copy.add_argument("dest", metavar="DEST", help="destination file or existing directory")
    copy.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    copy.set_defaults(func=_cp)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)
    return parser


def _ls(args: argparse.Namespace) -> int:
    from deltameta.recipes import recipe_purpose, shipped_recipes

    recipes = shipped_recipes()
    width = max(len(name) for name in recipes)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_purpose(path)}")
    return 0


def _cp(args: argparse.Namespace) -> int:
    from deltameta.atomic import atomic_write_text
    from deltameta.recipes import ROOT, resolve_recipe

    source = resolve_recipe(args.name)
    if ROOT not in source.resolve().parents:
        raise ConfigError(f"'{args.name}' is not a shipped recipe (see deltameta recipes ls).")
    dest = Path(args.dest).expanduser()
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not args.overwrite:
        raise ConfigError(f"{dest} exists; pass --overwrite to replace it.")
    if not dest.parent.is_dir():
        raise ConfigError(f"cannot copy to {dest}: directory {dest.parent} does not exist.")
    atomic_write_text(dest, source.read_text(encoding="utf-8"))
    print(f"copied {source.parent.name}/{source.stem} to {dest}; run it with: "
          f"deltameta {source.parent.name.replace('_', '-')} --config {dest}")
    return 0
