"""The one check of a command's output directory: refuse one that holds another run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable

from deltameta.errors import ConfigError


def holds_run(path: Path, markers: Iterable[str]) -> bool:
    """Return whether ``path`` is a directory holding any of ``markers`` (files or folders of a run)."""
    return path.is_dir() and any((path / marker).exists() for marker in markers)


def prepare_output_dir(path: str | Path, markers: Iterable[str], overwrite: bool, command: str = "",
                       resumable: bool = False) -> Path:
    """Check (and with ``overwrite``, clear) a command's output directory.

    Args:
        path: ``output_dir``.
        markers: Files or folders whose presence marks a previous run of the command.
        overwrite: Replace a previous run.
        command: Command name for messages ("a finetune run"); ``""`` says "a run" (and "no
            deltameta run" for unrelated files).
        resumable: Also suggest ``--resume PATH`` for a previous run.

    Returns:
        The directory (created).

    Raises:
        ConfigError: it holds another run (without ``overwrite``), is a file, or holds unrelated
            files (never deleted, even with ``overwrite``).
    """
    path = Path(path).expanduser()
    markers = tuple(markers)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir='{path}' is a file; give a directory.")
    if holds_run(path, markers):
        if not overwrite:
            choices = ["--overwrite to replace it"] + ([f"--resume {path} to continue it"] if resumable else [])
            raise ConfigError(
                f"output_dir='{path}' already holds a {f'{command} run' if command else 'run'}; pass "
                + ", ".join(choices) + ("," if len(choices) > 1 else "") + " or choose another output_dir=..."
            )
        shutil.rmtree(path)
    elif path.is_dir() and any(path.iterdir()):
        raise ConfigError(
            f"output_dir='{path}' is not empty and holds no {command or 'deltameta'} run; refusing to write into it "
            "(even with --overwrite). Choose an empty or new directory."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path
