"""Training checkpoints: atomic, last-N, and complete enough for a bit-exact resume.

A checkpoint is a directory ``RUN_DIR/checkpoints/step-NNNNNN/`` holding ``trainer_state.pt``:
the meta-parameters (deltas, Meta-SGD learning rates), the controller, both optimizers, the
learning-rate scheduler, the episode sampler's position, every random generator state (Python,
NumPy, torch CPU/CUDA; the controller's Gumbel noise is seeded per episode and needs none) and the
trainer's counters. Nothing in it depends on the number of processes, so a run can resume on
another world size (see :mod:`deltameta.meta.distributed`). It is
written into a temporary sibling and renamed into place, so a reader (or a crash) never sees half
a checkpoint, and loaded with ``torch.load(weights_only=True)`` (no pickled code).
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from deltameta.atomic import atomic_directory
from deltameta.errors import DeltametaError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(DeltametaError):
    """A checkpoint is missing or unreadable."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Return ``RUN_DIR/checkpoints/step-NNNNNN``."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Return ``(step, directory)`` of every complete checkpoint, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Return the newest complete checkpoint directory, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Capture every random generator state (tensors and plain values only)."""
    import numpy as np

    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np

    version, values, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in values.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step`` and keep only the newest ``keep``.

    Args:
        run_dir: The run directory.
        step: Number of completed outer steps.
        state: Tensors, numbers, strings, lists and dicts only.
        keep: Number of checkpoints to keep (older ones are removed after the new one is complete).

    Returns:
        The checkpoint directory.
    """
    target = checkpoint_dir(run_dir, step)
    with atomic_directory(target) as tmp:
        torch.save(state, tmp / STATE_FILE)
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint directory (or its state file) without unpickling code.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"checkpoint '{path}' has no {STATE_FILE}; is it a complete checkpoint directory?")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means an unreadable checkpoint
        raise CheckpointError(f"checkpoint '{file}' is damaged or not a deltameta checkpoint ({_reason(error)})") from None


def _reason(error: Exception) -> str:
    """One line of why ``torch.load`` failed, without torch's advice to load unsafely."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if not first or "weights_only" in first or "Weights only load failed" in first:
        first = "it holds data that is not a plain checkpoint" if "Weights only" in str(error) else "unreadable"
    return f"{type(error).__name__}: {first[:200]}"
