"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

:func:`save_state` splits a nested state (dicts, lists, tuples, numbers, strings, ``None`` and
tensors, e.g. an optimizer's or scheduler's ``state_dict()``) into ``NAME.safetensors`` (every
tensor, under its path) and ``NAME.json`` (the structure, with ``{"__tensor__": KEY}`` in place of
each tensor; dicts with non-string keys and tuples are tagged so they come back as they were).
:func:`load_state` reverses it exactly. Neither file can carry code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deltameta.errors import DeltametaError


class StateFileError(DeltametaError):
    """A state file is missing, unreadable or malformed."""


def _flatten(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "root"
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and "__tensor__" not in value:
            return {k: _flatten(v, f"{path}.{k}", tensors) for k, v in value.items()}
        return {"__items__": [[k, _flatten(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at '{path}' (tensors, numbers, strings, lists, dicts only)")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {k: _unflatten(v, tensors) for k, v in value["__items__"]}
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    return value


def save_state(directory: str | Path, name: str, state: Any) -> None:
    """Write ``state`` as ``DIRECTORY/NAME.safetensors`` + ``DIRECTORY/NAME.json``.

    Write into a directory from :func:`deltameta.atomic.atomic_directory` for an atomic save.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton), encoding="utf-8")


def load_state(directory: str | Path, name: str) -> Any:
    """Read what :func:`save_state` wrote.

    Raises:
        StateFileError: a file is missing or unreadable.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        skeleton = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / f"{name}.safetensors"))
        return _unflatten(skeleton, tensors)
    except (OSError, ValueError, KeyError) as error:
        raise StateFileError(f"cannot read the saved state '{directory / name}' ({type(error).__name__}: {error}).") from None
