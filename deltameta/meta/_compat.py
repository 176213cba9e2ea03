"""Where the engine finds the delta and task APIs (their public modules, or submodules)."""

from __future__ import annotations

import importlib
from types import ModuleType, SimpleNamespace
from typing import Any

from deltameta.errors import DeltametaError

_DELTA_NAMES = ("inject_deltas", "delta_parameters", "task_embedding", "delta_layers", "apply_op_weights")


def _first(modules: tuple[str, ...], names: tuple[str, ...]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for module_name in modules:
        try:
            module: ModuleType = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            if name not in found and hasattr(module, name):
                found[name] = getattr(module, name)
    return found


def deltas_api(required: bool = True) -> SimpleNamespace | None:
    """Return the delta functions (``inject_deltas``, ``delta_parameters``, ...).

    Args:
        required: Raise when they cannot be imported (else return ``None``).
    """
    found = _first(("deltameta.deltas", "deltameta.deltas.model"), _DELTA_NAMES)
    if "delta_parameters" not in found:
        if required:
            raise DeltametaError("deltameta.deltas is not available (inject_deltas/delta_parameters not found).")
        return None
    return SimpleNamespace(**found)
