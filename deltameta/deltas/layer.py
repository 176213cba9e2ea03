"""``DeltaLinear``: a frozen linear layer (``nn.Linear`` or bitsandbytes ``Linear4bit``) plus deltas.

Output of a wrapped layer::

    y = W0 x + sum_op w_op * delta_op(x)

with, per op of rank ``r`` and scaling ``s = alpha / r``:

* ``lora``: ``delta(x) = s * B A x``;
* ``tarp``: ``delta(x) = s * B Σ(x) A x`` with ``Σ(x) = I + reshape(W_σ z)``, ``z = A x``
  (``projected``) or ``z = x`` (``token``); ``W_σ`` starts at zero so TARP starts as LoRA;
* optionally (``multiplicative``) ``+ m ⊙ W0 x`` (IA3-like row scaling, ``m`` starts at zero);
* ``skip``: nothing.

``w`` comes from :attr:`DeltaLinear.op_weights` (set by the architecture controller); without a
controller there is a single op with weight 1.

Task-batched parameters: when a delta tensor carries a leading task dimension ``T`` (``lora_A``
``[T, r, in]``, ``lora_B`` ``[T, out, r]``, ``tarp_sigma`` ``[T, r*r, r|in]``, ``mult`` ``[T, out]``),
the input batch is read as ``T`` equal contiguous groups of examples and the delta is computed
with batched matmuls, one parameter set per group.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from deltameta.deltas.config import OpSpec
from deltameta.errors import DeltametaError


def is_linear(module: nn.Module) -> bool:
    """Return whether ``module`` is a linear layer a delta can wrap (``nn.Linear`` or ``Linear4bit``)."""
    if isinstance(module, nn.Linear):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is optional
        return False
    return isinstance(module, bnb.nn.Linear4bit)


class DeltaLinear(nn.Module):
    """A frozen linear layer with one or more adapter-delta branches (one per op).

    Attributes:
        base_layer: The wrapped frozen layer (the same object, never copied).
        lora_A: ``op -> [r, in]`` (PEFT init: Kaiming-uniform).
        lora_B: ``op -> [out, r]`` (zeros).
        tarp_sigma: ``op -> [r*r, r]`` (projected) or ``[r*r, in]`` (token), TARP ops only (zeros).
        mult: ``op -> [out]`` row scaling of ``W0 x`` when ``multiplicative`` (zeros).
        op_weights: ``None`` (single op, weight 1), ``[n_ops]``, or ``[G, n_ops]`` where ``G``
            divides the batch (per example, or per task group of a task-batched call).
        static_b_offset: In static mode, optional ``op -> D`` (``[out, r]``): the static delta is
            ``s (B Σ̄ + D) A x`` (the least-squares fold of the multiplicative term, see
            :mod:`deltameta.deltas.fold`).
        static_sigma: When not ``None`` (a dict ``op -> Σ̄ - I``, ``[r, r]``), the layer computes the
            static export: TARP uses the fixed ``Σ̄`` and the multiplicative term is left out.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        ops: list[OpSpec],
        alpha: float,
        dropout: float = 0.0,
        sigma_input: str = "projected",
        multiplicative: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.op_specs = list(ops)
        self.op_names = [op.name for op in ops]
        self.alpha = float(alpha)
        self.sigma_input = sigma_input
        self.multiplicative = multiplicative
        self.scaling = {op.name: self.alpha / op.rank for op in ops if op.kind != "skip"}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.tarp_sigma = nn.ParameterDict()
        self.mult = nn.ParameterDict()
        device = next(base_layer.parameters()).device
        for op in ops:
            if op.kind == "skip":
                continue
            self.lora_A[op.name] = nn.Parameter(torch.empty(op.rank, self.in_features, device=device))
            self.lora_B[op.name] = nn.Parameter(torch.zeros(self.out_features, op.rank, device=device))
            if op.kind == "tarp":
                source = op.rank if sigma_input == "projected" else self.in_features
                self.tarp_sigma[op.name] = nn.Parameter(torch.zeros(op.rank * op.rank, source, device=device))
            if multiplicative:
                self.mult[op.name] = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.reset_delta_parameters()
        self.op_weights: torch.Tensor | None = None
        self.static_sigma: dict[str, torch.Tensor] | None = None
        self.static_b_offset: dict[str, torch.Tensor] | None = None
        self._sigma_stats: dict[str, Any] | None = None

    def reset_delta_parameters(self) -> None:
        """Re-initialise like PEFT: A Kaiming-uniform (a=√5), B, W_σ and m zero."""
        with torch.no_grad():
            for name, weight in self.lora_A.items():
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                self.lora_B[name].zero_()
            for weight in self.tarp_sigma.values():
                weight.zero_()
            for weight in self.mult.values():
                weight.zero_()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ops={self.op_names}, alpha={self.alpha}"

    # ----------------------------------------------------------------------------------------

    def _op_weight(self, index: int, x: torch.Tensor) -> torch.Tensor | float | None:
        """Weight of op ``index`` broadcastable against the delta output, or ``None`` if structurally 0."""
        weights = self.op_weights
        if weights is None:
            if len(self.op_names) == 1:
                return 1.0
            raise DeltametaError(
                f"this DeltaLinear holds {len(self.op_names)} ops ({', '.join(self.op_names)}) but no op "
                "weights were set; wrap the forward in `controller.apply(model, weights)` (or "
                "`apply_op_weights`)."
            )
        if weights.shape[-1] != len(self.op_names):
            raise DeltametaError(
                f"op weights have {weights.shape[-1]} entries in the last dimension, but the layer has "
                f"{len(self.op_names)} ops ({', '.join(self.op_names)})."
            )
        if weights.dim() == 1:
            w = weights[index]
        elif weights.dim() == 2:
            groups, batch = weights.shape[0], x.shape[0]
            if batch % groups:
                raise DeltametaError(f"op weights have {groups} rows, which does not divide the batch of {batch}.")
            w = weights[:, index].repeat_interleave(batch // groups).view(batch, *([1] * (x.dim() - 1)))
        else:
            raise DeltametaError(f"op weights must be [n_ops] or [groups, n_ops], got shape {tuple(weights.shape)}.")
        if not w.requires_grad and not bool(torch.any(w != 0)):
            return None
        return w.to(x.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        total = None
        dropped = None
        for index, spec in enumerate(self.op_specs):
            if spec.kind == "skip":
                continue
            weight = self._op_weight(index, x)
            if weight is None:
                continue
            if dropped is None:
                dropped = self.lora_dropout(x)
            delta = self.delta(spec, dropped, result)
            delta = delta * weight if not isinstance(weight, float) or weight != 1.0 else delta
            total = delta if total is None else total + delta
        if total is None:
            return result
        return result + total.to(result.dtype)

    def delta(self, spec: OpSpec, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Compute one op's delta in the input dtype.

        Args:
            spec: The op.
            x: Adapter input (after dropout), ``[..., in]``.
            base_out: ``W0 x`` (for the multiplicative term).

        Returns:
            ``[..., out]`` in ``x.dtype``.
        """
        name, dtype = spec.name, x.dtype
        a = self.lora_A[name].to(dtype)
        b = self.lora_B[name].to(dtype)
        batched = a.dim() == 3
        if batched:
            tasks = a.shape[0]
            if x.shape[0] % tasks:
                raise DeltametaError(
                    f"task-batched deltas have T={tasks} task slices, but the batch of {x.shape[0]} examples "
                    "is not a multiple of T (the batch must hold T equal contiguous groups)."
                )
            xs = x.reshape(tasks, -1, self.in_features)
        else:
            xs = x
        z = torch.matmul(xs, a.transpose(-1, -2))
        if spec.kind == "tarp":
            u = self._tarp(spec, xs, z, batched)
        else:
            u = z
        out = torch.matmul(u, b.transpose(-1, -2)) * self.scaling[name]
        if self._sigma_stats is not None and not batched and self._sigma_stats.get("moments") is not None and (
                spec.kind == "tarp" or self.multiplicative):
            self._collect_moments(name, z, u, base_out if self.multiplicative else None)
        if self.static_sigma is not None and self.static_b_offset and name in self.static_b_offset:
            offset = self.static_b_offset[name].to(dtype)
            out = out + torch.matmul(z, offset.transpose(-1, -2)) * self.scaling[name]
        if self.multiplicative and self.static_sigma is None:
            m = self.mult[name].to(dtype)
            if batched:
                out = out + base_out.to(dtype).reshape(out.shape) * m.unsqueeze(1)
            else:
                out = out + base_out.to(dtype) * m
        if batched:
            out = out.reshape(*x.shape[:-1], self.out_features)
        return out

    def _tarp(self, spec: OpSpec, xs: torch.Tensor, z: torch.Tensor, batched: bool) -> torch.Tensor:
        """Return ``Σ(x) z`` (or ``Σ̄ z`` in static mode)."""
        r = spec.rank
        if self.static_sigma is not None:
            if batched:
                raise DeltametaError("static (exported) TARP forward does not take task-batched deltas.")
            sigma_bar = self.static_sigma[spec.name].to(z.dtype)
            return z + torch.matmul(z, sigma_bar.transpose(-1, -2))
        w = self.tarp_sigma[spec.name].to(z.dtype)
        source = z if self.sigma_input == "projected" else xs
        s = torch.matmul(source, w.transpose(-1, -2))
        s = s.reshape(*s.shape[:-1], r, r)
        if self._sigma_stats is not None and not batched:
            self._collect(spec.name, s)
        return z + torch.matmul(s, z.unsqueeze(-1)).squeeze(-1)

    def _tokens(self, t: torch.Tensor, trailing: int = 1) -> torch.Tensor:
        """``t`` ``[..., *trailing dims]`` flattened to its non-pad tokens (fold statistics)."""
        mask = self._sigma_stats.get("mask")
        lead = t.shape[: t.dim() - trailing]
        if mask is not None and tuple(mask.shape) == tuple(lead):
            return t[mask.bool()]
        return t.reshape(-1, *t.shape[t.dim() - trailing:])

    def _collect(self, name: str, s: torch.Tensor) -> None:
        """Accumulate the sum of ``Σ(x) - I`` over the tokens of one forward (mean fold)."""
        stats = self._sigma_stats
        s = self._tokens(s.detach().float(), trailing=2)
        total, count = stats["sums"].get(name, (0.0, 0))
        stats["sums"][name] = (s.sum(0) + total, count + s.shape[0])

    def _collect_moments(self, name: str, z: torch.Tensor, u: torch.Tensor, y: torch.Tensor | None) -> None:
        """Accumulate, in float64, the sums of ``z zᵀ``, ``u zᵀ`` (``u = Σ(x) z``; ``z`` for LoRA)
        and, with the multiplicative term, ``y zᵀ`` (``y = W0 x``), plus the token count
        (least-squares fold, see :func:`deltameta.deltas.model.collect_fold_moments`)."""
        moments = self._sigma_stats["moments"]
        zf = self._tokens(z.detach().double())
        uf = self._tokens(u.detach().double())
        entry = {"zz": zf.T @ zf, "uz": uf.T @ zf, "count": zf.shape[0]}
        if y is not None:
            entry["yz"] = self._tokens(y.detach().double()).T @ zf
        old = moments.get(name)
        moments[name] = entry if old is None else {k: old[k] + v for k, v in entry.items()}
