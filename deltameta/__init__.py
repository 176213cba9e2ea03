"""deltameta: meta-learn low-rank adapter deltas on a frozen 4-bit LLM, export them as PEFT adapters.

The most used names are importable from the package root; they are loaded on first use so that
``import deltameta`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_base": "deltameta.base",
    "prepare": "deltameta.base",
    "DeltametaError": "deltameta.errors",
    "load_tasks": "deltameta.tasks",
    "EpisodeSampler": "deltameta.tasks",
    "DeltaConfig": "deltameta.deltas",
    "inject_deltas": "deltameta.deltas",
    "delta_parameters": "deltameta.deltas",
    "ArchController": "deltameta.deltas",
    "export_peft": "deltameta.deltas",
    "load_meta_adapter": "deltameta.deltas",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltameta' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
