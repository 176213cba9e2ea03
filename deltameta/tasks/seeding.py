"""Seeds derived from a base seed and labels, stable across processes and Python versions."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """Return a 63-bit seed determined by ``parts`` (e.g. ``(seed, "episode", 17)``).

    Unlike ``hash()``, the value does not depend on ``PYTHONHASHSEED``, so every process (and a
    resumed run) derives the same seed.

    Args:
        *parts: Integers and strings; their ``repr`` is hashed.

    Returns:
        A non-negative integer below ``2**63``.
    """
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1
