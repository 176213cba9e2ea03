"""The recipes shipped with deltameta (package data), found by name.

A recipe is named by its path under this package without the suffix
(``meta_train/smollm2_135m_tarp_builtin``) or, when unique, by its base name
(``smollm2_135m_tarp_builtin``). :func:`resolve_recipe` accepts such a name, a path to any YAML
file, or an old checkout path (``recipes/meta_train/smollm2_135m_tarp_builtin.yaml``), from any
directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from deltameta.errors import ConfigError

ROOT = Path(__file__).resolve().parent
SUFFIXES = (".yaml", ".yml")


def shipped_recipes() -> dict[str, Path]:
    """Return ``{name: path}`` of every shipped recipe, sorted by name (``kind/basename``)."""
    found = {}
    for path in sorted(ROOT.glob("*/*")):
        if path.suffix in SUFFIXES and path.is_file():
            found[f"{path.parent.name}/{path.stem}"] = path
    return found


def recipe_purpose(path: str | Path) -> str:
    """Return a recipe's one-line purpose: the first line of its header comment."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            return text.rstrip(".")
    return ""


def resolve_recipe(given: str | Path) -> Path:
    """Return the file of a recipe given as a path or a shipped recipe's name.

    Args:
        given: An existing YAML file, a shipped recipe name (``meta_train/smollm2_135m_tarp_builtin``
            or a unique base name, with or without ``.yaml``), or ``recipes/<kind>/<name>.yaml``
            (the path in a source checkout before recipes moved into the package).

    Returns:
        The recipe's path.

    Raises:
        ConfigError: no such file or recipe (the closest shipped names are suggested), or a base
            name that several shipped recipes share.
    """
    path = Path(given).expanduser()
    if path.is_file():
        return path
    name = str(given).replace("\\", "/").strip()
    if name.startswith("./"):
        name = name[2:]
    if name.startswith("recipes/"):
        name = name[len("recipes/"):]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    recipes = shipped_recipes()
    if name in recipes:
        return recipes[name]
    by_base = [key for key in recipes if key.split("/", 1)[1] == name]
    if len(by_base) == 1:
        return recipes[by_base[0]]
    if len(by_base) > 1:
        raise ConfigError(f"recipe '{given}' is ambiguous: it names {', '.join(by_base)}; give one of those.")
    candidates = list(recipes) + [key.split("/", 1)[1] for key in recipes]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"recipe '{given}' does not exist: it is neither a file nor a shipped recipe.{hint} "
        "List the shipped ones with: deltameta recipes ls"
    )
