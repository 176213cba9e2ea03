"""TARP's exact dynamic part on top of a ``PeftModel`` that holds several adapters.

:func:`deltameta.deltas.load_meta_adapter` registers the sidecar's forward hooks unconditionally,
which suits a model with one adapter. Here the hooks are gated: they add
``s B (Σ(x) - Σ̄) A x`` only while ``gate()`` is true, so one loaded base can serve the static
and the dynamic variant of a meta-adapter (and other adapters) in the same process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from torch import nn

from deltameta.errors import DeltametaError


def attach_dynamic(peft_model: nn.Module, peft_dir: str | Path, gate: Callable[[], bool] | None = None) -> list:
    """Register the sidecar hooks of the export in ``peft_dir`` on ``peft_model``'s LoRA modules.

    The dynamic tensors (the meta-learned ``A``, ``B``, ``Σ`` map and fold point ``Σ̄``) are fixed;
    fine-tuning the PEFT adapter trains the static (folded) part only.

    Args:
        peft_model: A ``PeftModel`` holding the adapter loaded from ``peft_dir``.
        peft_dir: An export of :func:`deltameta.deltas.export_peft` with a sidecar.
        gate: Called on every forward; the dynamic term is added only when it returns true
            (default: always).

    Returns:
        The hook handles (``handle.remove()`` detaches them); empty when there is no sidecar.

    Raises:
        DeltametaError: a sidecar without its JSON description.
    """
    from safetensors.torch import load_file

    from deltameta.deltas.export import SIDECAR, SIDECAR_META, _dynamic_hook

    peft_dir = Path(peft_dir)
    if not (peft_dir / SIDECAR).is_file():
        return []
    if not (peft_dir / SIDECAR_META).is_file():
        raise DeltametaError(f"'{peft_dir}' has {SIDECAR} but lacks {SIDECAR_META}.")
    meta = json.loads((peft_dir / SIDECAR_META).read_text(encoding="utf-8"))
    tensors = load_file(str(peft_dir / SIDECAR))
    root = peft_model.base_model.model
    handles = []
    for name, info in meta["layers"].items():
        module = root.get_submodule(name)
        device = next(module.parameters()).device
        parts = {k.removeprefix(name + "."): v.to(device) for k, v in tensors.items()
                 if k.startswith(name + ".") and "." not in k.removeprefix(name + ".")}
        hook = _dynamic_hook(info, parts)
        if gate is not None:
            hook = _gated(hook, gate)
        handles.append(module.register_forward_hook(hook))
    return handles


def _gated(hook, gate: Callable[[], bool]):
    def run(module, args, output):
        return hook(module, args, output) if gate() else output

    return run
