"""Atomic, durable writes: a reader sees the old content or the new, never half of either.

Checkpoints, exports and prepared models are written into a temporary sibling, every file and
folder in it is ``fsync``-ed, then it is renamed into place and the parent folder is synced, so
an interrupted write (even a power loss) leaves what was there before intact. A directory that
already exists is swapped with the new one in a single ``renameat2(RENAME_EXCHANGE)`` where the
system has it, so the path never disappears; elsewhere the old one is renamed aside, the new one
in, and the old one removed. Temporary siblings left by a killed process are recognised by their
names and removed by :func:`clean_stale` (run at the start and resume of every run).

Files and folders are created with the usual permissions (``0644`` / ``0755`` under the default
umask), not the ``0600`` / ``0700`` of :mod:`tempfile`, so other users can read an export.
JSON is written strictly: ``NaN`` and infinities become ``null``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

#: Names of the temporary siblings this module creates: ``.NAME.XXXX.tmp`` and ``.NAME.old.PID``.
_TEMP_NAME = re.compile(r"^\..+\.(tmp|old\.\d+)$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    """``fsync`` a file or directory (directories where the system allows opening them)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """``fsync`` every file and folder under ``path`` (folders after their content), then ``path``."""
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                _fsync_path(Path(root) / name)
            for name in dirs:
                _fsync_path(Path(root) / name)
    _fsync_path(path)


def _usual_modes(directory: Path) -> None:
    """Give everything under ``directory`` the modes the umask allows (some writers create ``0600`` files)."""
    mask = _umask()
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                os.chmod(path, (0o666 | (path.stat().st_mode & 0o111)) & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2``); return whether it was done."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - old C library
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_directory(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the complete directory ``new`` at ``path`` so that ``path`` always exists.

    Args:
        new: A finished (synced) directory beside ``path``.
        path: The destination; an existing directory there is replaced and removed.
    """
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
        _fsync_path(path.parent)
        return
    if _exchange(new, path):  # ``new`` now holds the old content
        _fsync_path(path.parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    old = path.parent / f".{path.name}.old.{os.getpid()}"  # pragma: no cover - systems without renameat2
    if old.exists():
        shutil.rmtree(old)
    os.replace(path, old)
    os.replace(new, path)
    _fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale(directory: str | os.PathLike, depth: int = 2) -> list[Path]:
    """Remove temporary siblings a killed process left under ``directory`` (``depth`` levels).

    An aside copy (``.NAME.old.PID``) whose ``NAME`` is missing is renamed back instead (a kill
    between the two renames of :func:`replace_directory`'s fallback).

    Returns:
        The paths removed or restored.
    """
    directory = Path(directory)
    cleaned: list[Path] = []
    if not directory.is_dir():
        return cleaned
    for child in sorted(directory.iterdir()):
        if _TEMP_NAME.match(child.name):
            if ".old." in child.name and child.is_dir():
                original = child.parent / child.name[1:].rsplit(".old.", 1)[0]
                if not original.exists():
                    os.replace(child, original)
                    cleaned.append(child)
                    continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
            cleaned.append(child)
        elif depth > 1 and child.is_dir() and not child.is_symlink():
            cleaned += clean_stale(child, depth - 1)
    return cleaned


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a synced temporary file, ``os.replace`` and a synced folder.

    Args:
        path: Destination file (created ``0666 & ~umask``).
        text: UTF-8 content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def strict_json(data: Any) -> Any:
    """Return ``data`` with every non-finite float replaced by ``None`` (valid strict JSON)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def dumps_json(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict_json` ``(data)`` with ``allow_nan=False`` (non-JSON values as ``str``)."""
    kwargs.setdefault("default", str)
    return json.dumps(strict_json(data), allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented strict JSON (see :func:`dumps_json`) via :func:`atomic_write_text`.

    Args:
        path: Destination file.
        data: JSON-serialisable data.
    """
    atomic_write_text(path, dumps_json(data, indent=2) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a text file and ``fsync`` it (a kill loses at most this line)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` when the block succeeds.

    The previous content of ``path`` (if any) is kept until the new directory is complete and
    synced; on an exception the temporary directory is removed and ``path`` is left untouched.

    Args:
        path: Final directory (created ``0777 & ~umask``).

    Yields:
        The temporary directory to fill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _usual_modes(tmp)
        fsync_tree(tmp)
        _test_pause("directory", path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


def _test_pause(point: str, path: Path) -> None:
    """Test hook: with ``DELTAMETA_TEST_PAUSE_AT=POINT:NAME``, announce and sleep before ``NAME`` lands.

    Real-kill tests set it to stop a subprocess while it writes, e.g. ``directory:step-000002``
    (a checkpoint) or ``directory:peft`` (the export), and kill it on the announcement. Unset (always,
    outside tests) it does nothing.
    """
    wanted = os.environ.get("DELTAMETA_TEST_PAUSE_AT")
    if wanted and wanted == f"{point}:{path.name}":
        import sys
        import time

        print(f"DELTAMETA_TEST_PAUSED {wanted}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("DELTAMETA_TEST_PAUSE_SECONDS", "60")))
