"""The one check of a command's output directory: refuse one that holds another run.

A previous run is replaced (with ``--overwrite``) only after the new run's config, data, model and
adapters have all been checked: :func:`prepare_output_dir` checks and deletes nothing, the command
sets itself up, then :func:`start_fresh` swaps the old run for an empty directory in one atomic
step (see :func:`deltameta.atomic.replace_directory`), so the old run stays intact until the new
one can start.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

from deltameta.errors import ConfigError


def holds_run(path: Path, markers: Iterable[str]) -> bool:
    """Return whether ``path`` is a directory holding any of ``markers`` (files or folders of a run)."""
    return path.is_dir() and any((path / marker).exists() for marker in markers)


def prepare_output_dir(path: str | Path, markers: Iterable[str], overwrite: bool, command: str = "",
                       resumable: bool = False) -> Path:
    """Check a command's output directory (deleting nothing; see :func:`start_fresh`).

    Args:
        path: ``output_dir``.
        markers: Files or folders whose presence marks a previous run of the command.
        overwrite: Replace a previous run.
        command: Command name for messages ("a finetune run"); ``""`` says "a run" (and "no
            deltameta run" for unrelated files).
        resumable: Also suggest ``--resume PATH`` for a previous run.

    Returns:
        The directory (created, unless it holds a previous run to be replaced by :func:`start_fresh`).

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
        return path
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(
            f"output_dir='{path}' is not empty and holds no {command or 'deltameta'} run; refusing to write into it "
            "(even with --overwrite). Choose an empty or new directory."
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def start_fresh(path: str | Path, markers: Iterable[str], keep: Iterable[str] = ()) -> Path:
    """Replace a previous run in ``path`` by an empty directory, atomically (after the new run's checks).

    Args:
        path: The output directory, as checked by :func:`prepare_output_dir` with ``overwrite``.
        markers: Files or folders whose presence marks a previous run.
        keep: Entries the new run already wrote there during its setup (e.g. an exported start
            adapter); they are moved into the new directory.

    Returns:
        The (now empty, or untouched if it held no run) directory.
    """
    from deltameta.atomic import replace_directory

    path = Path(path).expanduser()
    if holds_run(path, tuple(markers)):
        empty = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        empty.chmod(path.stat().st_mode & 0o7777)
        for name in keep:
            if (path / name).exists():
                (empty / name).parent.mkdir(parents=True, exist_ok=True)
                (path / name).replace(empty / name)
        replace_directory(empty, path)
    path.mkdir(parents=True, exist_ok=True)
    return path
