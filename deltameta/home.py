"""Where deltameta keeps its caches ($DELTAMETA_HOME, default ``~/.cache/deltameta``)."""

from __future__ import annotations

import os
from pathlib import Path


def deltameta_home() -> Path:
    """Return the cache root, honouring ``$DELTAMETA_HOME``.

    Returns:
        The directory (not created here).
    """
    env = os.environ.get("DELTAMETA_HOME")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/deltameta").expanduser()


def models_dir() -> Path:
    """Return the directory that holds prepared (converted and quantized) base models."""
    return deltameta_home() / "models"


def downloads_dir() -> Path:
    """Return the directory that holds downloaded model wheels and the files read out of them."""
    return deltameta_home() / "downloads"
