"""Injecting deltas into a frozen model and addressing them as a flat name -> tensor dict.

The meta-learning engine runs its inner loop with ``torch.func.functional_call(model, params,
...)`` where ``params`` is :func:`delta_parameters` (optionally with a leading task dimension on
every tensor, see :func:`expand_for_tasks`).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import nn

from deltameta.deltas.config import DeltaConfig
from deltameta.deltas.layer import DeltaLinear, is_linear
from deltameta.errors import ConfigError, DeltametaError

#: Attribute under which the injected :class:`DeltaConfig` is kept on the model.
CONFIG_ATTR = "deltameta_delta_config"


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_deltas(model: nn.Module, config: DeltaConfig) -> list[str]:
    """Replace every targeted linear layer of ``model`` in place by a :class:`DeltaLinear`.

    Every base parameter is frozen; only the new delta parameters are trainable.

    Args:
        model: The frozen base (e.g. from :func:`deltameta.base.load_base`).
        config: What to inject where.

    Returns:
        The full module names of the wrapped layers, in model order.

    Raises:
        ConfigError: no linear layer matches ``config.target_modules`` (the message lists the
            candidate names), or the model already holds deltas.
    """
    if delta_layers(model):
        raise ConfigError("this model already holds deltas; load a fresh base before injecting again.")
    linears = [(name, module) for name, module in model.named_modules() if name and is_linear(module)]
    chosen = [(name, module) for name, module in linears if _matches(name, config.target_modules)]
    if not chosen:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
        raise ConfigError(
            f"target_modules={config.target_modules!r} matches no linear layer of the model. "
            f"Linear layer names end in: {', '.join(suffixes)} (e.g. '{linears[0][0] if linears else ''}')."
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    ops = config.layer_ops()
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = DeltaLinear(
            module,
            ops,
            alpha=config.alpha,
            dropout=config.dropout,
            sigma_input=config.tarp_sigma_input,
            multiplicative=config.multiplicative,
        )
        setattr(parent, child, wrapped)
    setattr(model, CONFIG_ATTR, config)
    set_trainable(model, True)
    return [name for name, _ in chosen]


def delta_layers(model: nn.Module) -> dict[str, DeltaLinear]:
    """Return ``{module name: DeltaLinear}`` in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, DeltaLinear)}


def _is_delta_name(name: str) -> bool:
    return any(f".{group}." in f".{name}" for group in ("lora_A", "lora_B", "tarp_sigma", "mult")) and ".base_layer." not in f".{name}"


def delta_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Return every delta parameter under the name ``model.named_parameters()`` gives it.

    The names look like ``model.layers.0.self_attn.q_proj.lora_A.lora-8`` (op name last), so the
    dict can be passed straight to ``torch.func.functional_call(model, params, ...)``. Base and
    controller parameters are not included.
    """
    return {name: p for name, p in model.named_parameters() if _is_delta_name(name) and ".controller." not in f".{name}"}


def set_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Set ``requires_grad`` of every delta parameter (base parameters stay frozen)."""
    for parameter in delta_parameters(model).values():
        parameter.requires_grad_(trainable)


def count_delta_parameters(model: nn.Module) -> int:
    """Return the number of scalar delta parameters."""
    return sum(p.numel() for p in delta_parameters(model).values())


def expand_for_tasks(params: dict[str, torch.Tensor], tasks: int) -> dict[str, torch.Tensor]:
    """Give every delta tensor a leading task dimension ``T`` (a view; gradients sum over tasks).

    Args:
        params: Output of :func:`delta_parameters` (or any name -> tensor dict of deltas).
        tasks: ``T``; the batch passed with these params must hold ``T`` equal contiguous groups.

    Returns:
        ``{name: tensor[T, *shape]}``.
    """
    return {name: p.unsqueeze(0).expand(tasks, *p.shape) for name, p in params.items()}


@contextlib.contextmanager
def apply_op_weights(model: nn.Module, weights: dict[str, torch.Tensor | None]) -> Iterator[None]:
    """Set each named :class:`DeltaLinear`'s op weights for the duration of the block.

    Args:
        model: Model with injected deltas.
        weights: ``{layer name: [n_ops] | [groups, n_ops] | None}``.
    """
    layers = delta_layers(model)
    unknown = sorted(set(weights) - set(layers))
    if unknown:
        raise DeltametaError(f"op weights given for layers that hold no deltas: {', '.join(unknown[:5])}.")
    previous = {name: layers[name].op_weights for name in weights}
    try:
        for name, value in weights.items():
            layers[name].op_weights = value
        yield
    finally:
        for name, value in previous.items():
            layers[name].op_weights = value


@contextlib.contextmanager
def static_export(model: nn.Module, sigma_bars: dict[str, dict[str, torch.Tensor]],
                  b_offsets: dict[str, dict[str, torch.Tensor]] | None = None) -> Iterator[None]:
    """Compute the forward that the exported (static) PEFT adapter computes.

    TARP uses the fixed fold ``Σ̄ = I + sigma_bars[layer][op]`` (the fold matrix ``M``) and the
    multiplicative term is left out (it is not expressible in LoRA), except for its
    least-squares projection ``b_offsets`` added to ``B``: the static delta is ``s (B Σ̄ + D) A x``.

    Args:
        model: Model with injected deltas.
        sigma_bars: ``{layer name: {op: Σ̄ - I}}`` (missing layers/ops fold at ``Σ̄ = I``).
        b_offsets: ``{layer name: {op: D [out, r]}}`` (missing: none).
    """
    layers = delta_layers(model)
    try:
        for name, layer in layers.items():
            bars = dict(sigma_bars.get(name, {}))
            for op, weight in layer.tarp_sigma.items():
                r = layer.lora_A[op].shape[-2]
                bars.setdefault(op, torch.zeros(r, r, device=weight.device))
            layer.static_sigma = bars
            layer.static_b_offset = dict((b_offsets or {}).get(name, {})) or None
        yield
    finally:
        for layer in layers.values():
            layer.static_sigma = None
            layer.static_b_offset = None


@torch.no_grad()
def collect_sigma_means(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **forward_kwargs
) -> dict[str, dict[str, tuple[torch.Tensor, int]]]:
    """Run ``model`` once and return, per TARP op, the sum of ``Σ(x) - I`` over non-pad tokens.

    Use it to compute the TARP fold point: ``Σ̄ - I = sum / count``. Sums over several calls can
    be added up (the engine can keep a running sum during meta-training and save the means as
    fold statistics, see :func:`deltameta.deltas.state.save_meta_state`).

    Args:
        model: Model with injected deltas (op weights already set when a controller is used).
        input_ids: ``[B, L]``.
        attention_mask: ``[B, L]``; tokens where it is 0 are not counted.
        **forward_kwargs: Passed to ``model``.

    Returns:
        ``{layer name: {op: (sum [r, r], token count)}}`` for layers with TARP ops.
    """
    stats = _collect_tarp_stats(model, input_ids, attention_mask, False, **forward_kwargs)
    return {name: dict(entry["sums"]) for name, entry in stats.items() if entry["sums"]}


@torch.no_grad()
def collect_fold_moments(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **forward_kwargs
) -> dict[str, dict[str, dict[str, torch.Tensor | int]]]:
    """Run ``model`` once and return, per TARP op, the sums that the least-squares fold needs.

    With ``z = A x`` and ``u = Σ(x) z`` per non-pad token: ``sigma`` (sum of ``Σ(x) - I``,
    ``[r, r]``, float32), ``zz`` (sum of ``z zᵀ``), ``uz`` (sum of ``u zᵀ``), float64, and
    ``count`` (tokens). With the multiplicative term, every op (LoRA ones too, ``u = z``, no
    ``sigma``) also gets ``yz`` (sum of ``y zᵀ``, ``y = W0 x``, ``[out, r]``). Sums over several
    calls add up; see :mod:`deltameta.deltas.fold`.

    Args:
        model: Model with injected deltas (op weights already set when a controller is used).
        input_ids: ``[B, L]``.
        attention_mask: ``[B, L]``; tokens where it is 0 are not counted.
        **forward_kwargs: Passed to ``model``.

    Returns:
        ``{layer name: {op: {"sigma", "zz", "uz", "count"[, "yz"]}}}`` for the active ops.
    """
    stats = _collect_tarp_stats(model, input_ids, attention_mask, True, **forward_kwargs)
    out: dict[str, dict[str, dict[str, torch.Tensor | int]]] = {}
    for name, entry in stats.items():
        for op, moments in entry["moments"].items():
            out.setdefault(name, {})[op] = dict(moments)
            if op in entry["sums"]:
                out[name][op]["sigma"] = entry["sums"][op][0]
    return out


def _collect_tarp_stats(model, input_ids, attention_mask, moments: bool, **forward_kwargs) -> dict[str, dict]:
    layers = {n: l for n, l in delta_layers(model).items() if len(l.tarp_sigma) or (moments and l.multiplicative)}
    stats = {name: {"mask": attention_mask, "sums": {}, **({"moments": {}} if moments else {})} for name in layers}
    try:
        for name, layer in layers.items():
            layer._sigma_stats = stats[name]
        model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    finally:
        for layer in layers.values():
            layer._sigma_stats = None
    return stats


@torch.no_grad()
def task_embedding(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Return the task embedding: the mean frozen input embedding over all non-pad support tokens.

    Args:
        model: The (frozen) model; its ``get_input_embeddings()`` is used.
        input_ids: ``[N, L]`` support examples (or ``[L]``).
        attention_mask: ``[N, L]``; pad tokens (0) are left out.

    Returns:
        ``[hidden]`` in fp32.
    """
    embedding = model.get_input_embeddings()
    vectors = embedding(input_ids).float()
    if attention_mask is None:
        return vectors.reshape(-1, vectors.shape[-1]).mean(0)
    mask = attention_mask.to(vectors.dtype).unsqueeze(-1)
    count = mask.sum()
    if count == 0:
        raise DeltametaError("task_embedding: the support set has no non-pad token.")
    return (vectors * mask).reshape(-1, vectors.shape[-1]).sum(0) / count
