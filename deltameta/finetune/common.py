"""Pieces shared by ``finetune`` and ``evaluate``: the base, PEFT adapters, losses."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltameta.errors import ConfigError

logger = logging.getLogger(__name__)

#: Default sublayers of a fresh LoRA (the meta-train default).
DEFAULT_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def load_frozen_base(config: Any):
    """Load the frozen base named by a config (``model``, ``quantization``, ``compute_dtype``, ...)."""
    from deltameta.base import load_base, resolve_device

    dtype = None if config.compute_dtype == "auto" else config.compute_dtype
    return load_base(config.model, config.quantization, compute_dtype=dtype, double_quant=config.double_quant,
                     device=resolve_device(config.device), seed=config.seed)


def fresh_lora_config(rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0, base_id: str | None = None):
    """Return a standard PEFT ``LoraConfig`` for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_id)


def attach_adapter(model: nn.Module, name: str, peft_dir: Path | None = None, lora_config: Any = None) -> nn.Module:
    """Add a trainable adapter ``name`` to ``model`` (wrapping it in a ``PeftModel`` the first time).

    Args:
        model: The frozen base, or a ``PeftModel`` already wrapping it.
        name: Adapter name (no dots).
        peft_dir: Load the adapter from this PEFT directory (``is_trainable=True``), or
        lora_config: create a fresh one with this ``LoraConfig``.

    Returns:
        The ``PeftModel``.
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        if peft_dir is not None:
            model.load_adapter(str(peft_dir), adapter_name=name, is_trainable=True)
        else:
            model.add_adapter(name, lora_config)
        return model
    if peft_dir is not None:
        return PeftModel.from_pretrained(model, str(peft_dir), adapter_name=name, is_trainable=True)
    return get_peft_model(model, lora_config, adapter_name=name)


def adapter_parameters(peft_model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Return the LoRA parameters of adapter ``name`` in a ``PeftModel``."""
    marker = f".{name}."
    params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n and (marker in n or n.endswith("." + name))}
    if not params:
        raise ConfigError(f"adapter '{name}' has no LoRA parameters in the model (target modules matched nothing?).")
    return params


def activate(peft_model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Make ``name`` the active adapter; only its parameters require gradients.

    Returns:
        Its parameters.
    """
    peft_model.set_adapter(name)
    params = adapter_parameters(peft_model, name)
    chosen = {id(p) for p in params.values()}
    for p in peft_model.parameters():
        p.requires_grad_(id(p) in chosen)
    return params


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], device: Any, autocast: bool = False) -> torch.Tensor:
    """Answer-only LM loss of an encoded batch (:func:`deltameta.meta.functional.lm_loss_fn` with the model's own weights)."""
    from deltameta.meta import functional as F

    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        return F.lm_loss_fn(model, use_cache=False)({}, batch)


def logits_fn(model: nn.Module, autocast: bool = False):
    """Return the scorers' ``logits_fn`` of ``model`` (no grad; see :data:`deltameta.tasks.scoring.LogitsFn`).

    A boolean 4-D mask is passed on as is to SDPA attention and turned into an additive float
    mask for eager attention. The cache is used only when one is passed.
    """

    cache_keyword = _cache_keyword(model)

    def run(ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None = None,
            past_key_values: Any = None, logits_to_keep: int = 0) -> torch.Tensor:
        if mask.dim() == 4 and mask.dtype == torch.bool and _attention_kind(model) == "eager":
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min)
        cache = {cache_keyword: past_key_values} if past_key_values is not None else {}
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **cache,
                         use_cache=past_key_values is not None, logits_to_keep=logits_to_keep).logits.float()

    return run


def _cache_keyword(model: nn.Module) -> str:
    """The forward keyword of the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``.

    Newer transformers renamed the argument and warn on the old name (removal announced for 5.40).
    """
    from deltameta.base import forward_accepts

    return "cache" if forward_accepts(model, "cache") else "past_key_values"


def _attention_kind(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "sdpa")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's input embeddings."""
    return model.get_input_embeddings().weight.device

