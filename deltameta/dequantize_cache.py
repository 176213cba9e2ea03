"""An explicit, exact cache of dequantized 4-bit weights for evaluation on CPU.

bitsandbytes has no 4-bit matmul kernel on CPU here (the ``kernels`` package is absent and
:func:`deltameta.base` turns the AVX512-BF16 repacking off): every ``Linear4bit`` forward calls
``dequantize_4bit`` and then ``torch.nn.functional.linear`` in the compute dtype, and every
backward dequantizes the weight again. The frozen weights never change during an evaluation, so
:func:`dequantized_weights` dequantizes each once (the same bitsandbytes call) and runs the same
``linear`` on the cached tensor: the outputs and input gradients are bitwise identical to
bitsandbytes' own fallback (tests/test_dequantize_cache.py), at the cost of holding every 4-bit
layer in its compute dtype (:func:`cache_bytes`; about 0.4 GB for smollm2-135m in float32).
On CUDA the 4-bit kernel is the point of quantizing, so ``auto`` leaves it off there.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def _linear4bit_modules(model: torch.nn.Module) -> list[Any]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def cache_enabled(setting: Any, device: torch.device | str) -> bool:
    """Resolve an ``auto|true|false`` setting: ``auto`` means on for CPU only."""
    text = str(setting).lower()
    if text == "auto":
        return torch.device(device).type == "cpu"
    return text in ("true", "1", "yes", "on")


def cache_bytes(model: torch.nn.Module) -> int:
    """Bytes the cache holds for ``model``: every 4-bit layer's weight in its compute dtype."""
    total = 0
    for module in _linear4bit_modules(model):
        state = module.weight.quant_state
        dtype = module.compute_dtype or state.dtype
        total += state.shape.numel() * torch.empty((), dtype=dtype).element_size()
    return total


def _cached_forward(module: Any, weight: torch.Tensor, original: Any):
    """``Linear4bit.forward`` with bitsandbytes' CPU fallback (dequantize, then linear) on ``weight``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        inp_dtype = x.dtype
        if module.compute_dtype is not None:
            x = x.to(module.compute_dtype)
        if x.dtype != weight.dtype or x.device != weight.device or x.numel() == 0:
            return original(x.to(inp_dtype))
        bias = module.bias
        if bias is not None:
            if bias.dtype != x.dtype:
                bias.data = bias.data.to(x.dtype)
            bias = bias.to(module.compute_dtype)
        return torch.nn.functional.linear(x, weight, bias).to(inp_dtype)

    return forward


@contextlib.contextmanager
def dequantized_weights(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, every bitsandbytes ``Linear4bit`` of ``model`` uses a dequantized copy.

    Args:
        model: A model (PEFT-wrapped or not) whose 4-bit layers stay frozen inside the block.
        enabled: ``False`` makes this a no-op (yields 0).

    Yields:
        The bytes held by the cache (0 when disabled or without 4-bit layers).
    """
    modules = _linear4bit_modules(model) if enabled else []
    if not modules:
        yield 0
        return
    import bitsandbytes.functional as bnbF

    held = 0
    patched = []
    try:
        for module in modules:
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                continue  # repacked for the bf16 gemv kernel: not the dequantize fallback, leave it alone
            dtype = module.compute_dtype or state.dtype
            if dtype != state.dtype:
                continue  # the fallback dequantizes straight to the compute dtype; a cast after may differ
            with torch.no_grad():
                weight = bnbF.dequantize_4bit(module.weight.data, state)
            held += weight.numel() * weight.element_size()
            own = module.__dict__.get("forward")
            module.forward = _cached_forward(module, weight, module.forward)
            patched.append((module, own))
        yield held
    finally:
        for module, own in patched:
            if own is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = own
