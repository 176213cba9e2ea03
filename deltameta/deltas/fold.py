"""The static TARP fold: replace ``B Σ(x) A x`` by ``B M A x`` with one fixed ``r x r`` matrix ``M``.

A TARP op computes ``s B u`` with ``z = A x`` and ``u = Σ(x) z``. The PEFT export can only hold a
fixed ``lora_B' = B M``. Two folds are implemented; both are stored as ``M - I`` (the "fold
point", ``sigma_bars`` in :func:`deltameta.deltas.export.export_peft`):

* ``mean``: ``M = mean(Σ(x))`` over the fold tokens (the historical fold);
* ``least_squares`` (default): ``M`` minimises ``E||B Σ(x) z - B M z||²`` over the fold tokens.
  Its normal equations ``Bᵀ B (M C_zz - C_uz) = 0`` are solved by the ordinary least-squares
  ``M = C_uz C_zz⁻¹`` (``C_uz = E[u zᵀ]``, ``C_zz = E[z zᵀ]``) whatever ``B`` is. It is computed as
  a ridge regression shrunk towards the mean fold,
  ``M = Σ̄ + (C_uz - Σ̄ C_zz)(C_zz + λ I)⁻¹`` with ``λ = eps · tr(C_zz) / r``, so that
  directions of ``z`` the fold tokens never span (a rank-deficient ``C_zz``) keep the mean fold.

The multiplicative (IA3-like) term ``m ⊙ W0 x`` has no LoRA form. The least-squares fold
projects it on the span of ``z`` too: with ``y = W0 x`` and ``C_yz = E[y zᵀ]``, the static
``lora_B' = B M + D`` with ``D = diag(m) C_yz (C_zz + λ I)⁻¹ / s`` minimises
``E||s B Σ(x) z + m ⊙ y - s B' z||²`` (for LoRA ops ``Σ(x) = I``, ``M = I``). The exact term stays
in the sidecar (the export warns); the mean fold leaves it out (``D = 0``).

:func:`fold_error` measures a fold on held-out inputs (inputs not used to fit it).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import nn

from deltameta.deltas.model import apply_op_weights, delta_layers, static_export

#: Relative ridge of the least-squares fold (``λ = RIDGE_EPS · tr(C_zz) / r``).
RIDGE_EPS = 1e-6
#: Fold methods, best first.
FOLD_METHODS = ("least_squares", "mean")

Moments = dict[str, dict[str, dict[str, Any]]]


def add_moments(totals: Moments, stats: Moments) -> Moments:
    """Add the sums of :func:`deltameta.deltas.model.collect_fold_moments` into ``totals`` (in place)."""
    for layer, ops in stats.items():
        for op, entry in ops.items():
            slot = totals.setdefault(layer, {}).get(op)
            totals[layer][op] = dict(entry) if slot is None else {k: slot[k] + entry[k] for k in entry}
    return totals


def normalise_moments(totals: Moments) -> tuple[dict[str, dict[str, torch.Tensor]], Moments]:
    """Turn summed statistics into means.

    Returns:
        ``(sigma_means, moments)``: ``{layer: {op: mean Σ(x) - I}}`` (float32) and
        ``{layer: {op: {"zz": E[z zᵀ], "uz": E[u zᵀ], "count": tokens}}}`` (float64).
    """
    means: dict[str, dict[str, torch.Tensor]] = {}
    moments: Moments = {}
    for layer, ops in totals.items():
        for op, entry in ops.items():
            count = max(int(entry["count"]), 1)
            if "sigma" in entry:
                means.setdefault(layer, {})[op] = (entry["sigma"] / count).float()
            if "zz" in entry:
                moments.setdefault(layer, {})[op] = {k: entry[k] / count for k in ("zz", "uz", "yz") if k in entry}
                moments[layer][op]["count"] = int(entry["count"])
    return means, moments


def least_squares_fold(sigma_mean: torch.Tensor, zz: torch.Tensor, uz: torch.Tensor, eps: float = RIDGE_EPS) -> torch.Tensor:
    """Return ``M - I`` of the least-squares fold (see the module docstring).

    Args:
        sigma_mean: Mean of ``Σ(x) - I`` over the fold tokens, ``[r, r]``.
        zz: ``E[z zᵀ]``, ``[r, r]``.
        uz: ``E[u zᵀ]`` with ``u = Σ(x) z``, ``[r, r]``.
        eps: Relative ridge.

    Returns:
        ``M - I`` as float32 ``[r, r]`` (the mean fold when ``C_zz`` is zero).
    """
    r = zz.shape[-1]
    zz = zz.double()
    uz = uz.double()
    bar = torch.eye(r, dtype=torch.float64) + sigma_mean.double()
    ridge = _ridge(zz, eps)
    if ridge is None:
        return sigma_mean.float()
    residual = uz - bar @ zz
    # X (zz + λI) = residual  <=>  (zz + λI) Xᵀ = residualᵀ (zz is symmetric)
    correction = torch.linalg.solve(ridge, residual.T).T
    return (bar + correction - torch.eye(r, dtype=torch.float64)).float()


def _ridge(zz: torch.Tensor, eps: float) -> torch.Tensor | None:
    r = zz.shape[-1]
    trace = float(torch.diagonal(zz).sum())
    if not math.isfinite(trace) or trace <= 0:
        return None
    return zz.double() + (eps * trace / r) * torch.eye(r, dtype=torch.float64)


def multiplicative_offset(m: torch.Tensor, zz: torch.Tensor, yz: torch.Tensor, scaling: float,
                          eps: float = RIDGE_EPS) -> torch.Tensor:
    """Return ``D = diag(m) C_yz (C_zz + λ I)⁻¹ / s`` (``[out, r]``, float32; zeros if ``C_zz = 0``)."""
    ridge = _ridge(zz, eps)
    if ridge is None:
        return torch.zeros(yz.shape, dtype=torch.float32)
    solved = torch.linalg.solve(ridge, yz.double().T).T  # C_yz (C_zz + λI)⁻¹
    return (m.double().unsqueeze(-1) * solved / scaling).float()


def multiplicative_offsets(model: nn.Module, moments: Mapping[str, Mapping[str, Mapping[str, Any]]],
                           kept: Mapping[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {op: D}}`` of the least-squares fold of the multiplicative term for the ``kept`` ops."""
    layers = delta_layers(model)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, op in kept.items():
        layer = layers[name]
        entry = moments.get(name, {}).get(op)
        if not layer.multiplicative or entry is None or "yz" not in entry:
            continue
        m = layer.mult[op].detach().cpu()
        out.setdefault(name, {})[op] = multiplicative_offset(m, entry["zz"].cpu(), entry["yz"].cpu(), layer.scaling[op])
    return out


def fold_points(
    sigma_means: Mapping[str, Mapping[str, torch.Tensor]],
    moments: Mapping[str, Mapping[str, Mapping[str, Any]]] | None,
    method: str = "least_squares",
) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {op: M - I}}`` of ``method`` for every op of ``sigma_means``.

    ``least_squares`` needs ``moments`` for the op (callers fall back to ``mean`` otherwise).
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for layer, ops in sigma_means.items():
        for op, mean in ops.items():
            if method == "least_squares":
                entry = moments[layer][op]
                out.setdefault(layer, {})[op] = least_squares_fold(mean.cpu(), entry["zz"].cpu(), entry["uz"].cpu())
            else:
                out.setdefault(layer, {})[op] = mean.detach().float().cpu()
    return out


def _zero_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Op weights that switch every delta off (the base model)."""
    return {name: torch.zeros(len(layer.op_names)) for name, layer in delta_layers(model).items()}


@torch.no_grad()
def fold_error(
    model: nn.Module,
    heldout: Mapping[str, torch.Tensor],
    folds: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
    op_context: Callable[[], ContextManager] | None = None,
    chunk: int = 4,
    offsets: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]] | None = None,
) -> dict[str, Any]:
    """Measure static folds against the dynamic (meta-trained) model on held-out inputs.

    Per fold: ``relative_logit_error = ||logits_static - logits_dynamic|| / ||logits_dynamic -
    logits_base||`` (Frobenius, over non-pad positions: the error relative to what the adapter
    changes), and ``loss_gain_kept = (loss_base - loss_static) / (loss_base - loss_dynamic)`` (mean
    loss over the answer tokens, ``labels != -100``; ``None`` when the adapter gains nothing).

    Args:
        model: Model with injected deltas.
        heldout: ``{input_ids, attention_mask, labels}`` ``[N, L]``.
        folds: ``{method: {layer: {op: M - I}}}``.
        op_context: Factory of the context that sets the exported structure (controller op weights).
        chunk: Examples per forward.
        offsets: ``{method: {layer: {op: D}}}`` (multiplicative term, see the module docstring).

    Returns:
        ``{"examples", "tokens", "answer_tokens", "loss_base", "loss_dynamic", "folds": {method:
        {"relative_logit_error", "loss_static", "loss_gain_kept"}}}``.
    """
    op_context = op_context or contextlib.nullcontext
    device = model.get_input_embeddings().weight.device
    ids, mask, labels = (heldout[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    sq = {m: 0.0 for m in folds}
    change = 0.0
    loss_sum = {"base": 0.0, "dynamic": 0.0, **{m: 0.0 for m in folds}}
    answer = 0
    for start in range(0, ids.shape[0], chunk):
        part = slice(start, start + chunk)
        kwargs = {"input_ids": ids[part], "attention_mask": mask[part], "use_cache": False}
        keep = mask[part].bool()
        targets = labels[part][:, 1:]
        answer += int((targets != -100).sum())

        def loss_of(logits: torch.Tensor) -> float:
            return float(torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=-100, reduction="sum"))

        with op_context():
            dynamic = model(**kwargs).logits.float()
            with apply_op_weights(model, _zero_weights(model)):
                base = model(**kwargs).logits.float()
            statics = {}
            for method, bars in folds.items():
                moved = {l: {o: b.to(device) for o, b in ops.items()} for l, ops in (offsets or {}).get(method, {}).items()}
                with static_export(model, {l: {o: b.to(device) for o, b in ops.items()} for l, ops in bars.items()}, moved):
                    statics[method] = model(**kwargs).logits.float()
        change += float((dynamic - base)[keep].pow(2).sum())
        loss_sum["base"] += loss_of(base)
        loss_sum["dynamic"] += loss_of(dynamic)
        for method, logits in statics.items():
            sq[method] += float((logits - dynamic)[keep].pow(2).sum())
            loss_sum[method] += loss_of(logits)
    n = max(answer, 1)
    loss = {k: v / n for k, v in loss_sum.items()}
    gain = loss["base"] - loss["dynamic"]
    result: dict[str, Any] = {
        "examples": int(ids.shape[0]),
        "tokens": int(mask.sum()),
        "answer_tokens": answer,
        "loss_base": loss["base"],
        "loss_dynamic": loss["dynamic"],
        "folds": {},
    }
    for method in folds:
        result["folds"][method] = {
            "relative_logit_error": math.sqrt(sq[method] / change) if change > 0 else None,
            "loss_static": loss[method],
            "loss_gain_kept": (loss["base"] - loss[method]) / gain if gain != 0 else None,
        }
    return result
