"""Cheap integrity checks of weight files before they are loaded.

A ``.safetensors`` file cut short by a kill or a full disk would otherwise fail deep inside the
loader with a Rust traceback; :func:`check_safetensors` reads only its header and size and raises
one clear line naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from deltameta.errors import DeltametaError, MetaStateError

_MAX_HEADER = 100 * 2**20


def check_safetensors(path: str | Path, error: type[DeltametaError] = MetaStateError, what: str = "") -> Path:
    """Check that ``path`` is a complete ``.safetensors`` file (header parses, data not truncated).

    Args:
        path: The file.
        error: The :class:`~deltameta.errors.DeltametaError` subclass to raise.
        what: Prefix for the message (e.g. ``"adapter='runs/x'"``).

    Returns:
        ``path``.

    Raises:
        error: the file is missing, truncated or not a safetensors file.
    """
    path = Path(path)
    prefix = f"{what}: " if what else ""
    if not path.is_file():
        raise error(f"{prefix}{path} is missing; the directory is incomplete (was its writing interrupted?).")
    size = path.stat().st_size
    reason = None
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                reason = f"only {size} bytes"
            else:
                (length,) = struct.unpack("<Q", head)
                if length > min(size - 8, _MAX_HEADER):
                    reason = "its header is cut short or invalid"
                else:
                    header = json.loads(handle.read(length).decode("utf-8"))
                    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
                    needed = 8 + length + max(ends, default=0)
                    if needed > size:
                        reason = f"{size} bytes where its header needs {needed}"
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, AttributeError):
        reason = "its header is not valid safetensors"
    if reason is not None:
        raise error(f"{prefix}{path} is truncated or damaged ({reason}); write it again (re-run or re-export).")
    return path
