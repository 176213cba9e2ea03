"""Rebuild the deltameta delta model (real :class:`DeltaLinear` modules) from an export or a meta-state.

A PEFT export computes the static fold of TARP; adapting it as PEFT LoRA moves ``A`` and the
folded ``B Σ̄`` only. To adapt a meta-adapter in its own parameters (``A``, ``B``, the ``Σ`` map,
the multiplicative term), exactly as the meta-train inner loop does, :func:`rebuild_delta_model`
puts the deltas back on a frozen base:

* from a meta-state (``delta_config.json`` + ``deltas.safetensors`` + controller), or
* from an export with ``deltameta.json`` (``deltameta_deltas.safetensors`` holds every delta tensor
  and ``deltameta_controller.safetensors`` the controller): the same model as the meta-state;
* from an older export without ``deltameta.json``: each kept sublayer gets one op (its exported
  one), with ``A``/``B`` of LoRA ops from ``adapter_model.safetensors`` and TARP's ``A``, ``B``,
  ``Σ`` map (and multiplicative term) from the sidecar ``deltameta_tarp.safetensors``.

With ``share_base=True`` the frozen base is not copied: the rebuilt model is a structural copy
whose frozen weights *are* the base's tensors, so the same loaded base can also be wrapped by
PEFT for the static methods.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltameta.deltas.config import DeltaConfig, parse_op
from deltameta.deltas.inner_loop import (
    EXPORT_RATES_FILE,
    InnerLoopRecord,
    check_rates_fit,
    load_rates,
    read_export_record,
)
from deltameta.errors import MetaStateError, ModelLoadError


@dataclasses.dataclass
class DeltaModel:
    """A base with deltameta's delta modules and what is needed to adapt it like meta-training.

    Attributes:
        model: The model with :class:`DeltaLinear` modules.
        params: The delta parameters (live), by ``named_parameters`` name.
        controller: The architecture controller, or ``None``.
        inner_loop: The recorded inner loop, or ``None`` (older export).
        inner_lrs: Learned inner rates by delta name, or ``None``.
        source: Where it was rebuilt from (for reports).
        decisions: The static structure of the export (``{sublayer: op}``), when known.
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    controller: Any = None
    inner_loop: InnerLoopRecord | None = None
    inner_lrs: dict[str, torch.Tensor] | None = None
    source: str = ""
    decisions: dict[str, str] | None = None


def share_base(base: nn.Module) -> nn.Module:
    """A structural copy of ``base`` whose parameters and buffers are the base's own tensors.

    Modules are copied (so deltas can be injected into the copy without touching ``base``); no
    weight is duplicated.
    """
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def _load_values(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(params) - set(values))
    unexpected = sorted(set(values) - set(params))
    if missing or unexpected:
        raise MetaStateError(f"{where} does not fit the rebuilt delta model (missing: {', '.join(missing[:5]) or 'none'}; "
                             f"unexpected: {', '.join(unexpected[:5]) or 'none'}).")
    with torch.no_grad():
        for name, p in params.items():
            value = values[name]
            if value.shape != p.shape:
                raise MetaStateError(f"{where}: delta '{name}' has shape {tuple(value.shape)}, the model expects {tuple(p.shape)}.")
            p.copy_(value.to(p.device, p.dtype))


def _from_config(model: nn.Module, config: DeltaConfig, deltas: dict[str, torch.Tensor], controller_meta, controller_state,
                 where: str):
    from deltameta.deltas.controller import build_controller
    from deltameta.deltas.model import delta_parameters, inject_deltas

    inject_deltas(model, config)
    params = delta_parameters(model)
    _load_values(params, deltas, where)
    controller = None
    if controller_meta is not None:
        controller = build_controller(model, controller_meta, controller_state)
        controller.to(next(iter(params.values())).device)
        for p in controller.parameters():
            p.requires_grad_(False)
    return params, controller


def _from_old_export(model: nn.Module, directory: Path) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """One op per kept sublayer, from ``adapter_model.safetensors`` and the TARP sidecar."""
    from safetensors.torch import load_file

    from deltameta.deltas.export import SIDECAR, SIDECAR_META
    from deltameta.deltas.layer import DeltaLinear, is_linear
    from deltameta.deltas.model import CONFIG_ATTR, delta_parameters

    adapter_cfg = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    weights = load_file(str(directory / "adapter_model.safetensors"))
    sidecar_meta = {"layers": {}}
    sidecar: dict[str, torch.Tensor] = {}
    if (directory / SIDECAR).is_file():
        if not (directory / SIDECAR_META).is_file():
            raise ModelLoadError(f"'{directory}' has {SIDECAR} but lacks {SIDECAR_META}.")
        sidecar_meta = json.loads((directory / SIDECAR_META).read_text(encoding="utf-8"))
        sidecar = load_file(str(directory / SIDECAR))
    targets = adapter_cfg.get("target_modules") or []
    if not isinstance(targets, list):
        raise ModelLoadError(f"'{directory}': target_modules is a pattern, not a list of sublayers; "
                             "it is not a deltameta export and cannot be rebuilt as a delta model.")
    rank_pattern = adapter_cfg.get("rank_pattern") or {}
    alpha_pattern = adapter_cfg.get("alpha_pattern") or {}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    decisions: dict[str, str] = {}
    values: dict[str, torch.Tensor] = {}
    for name in targets:
        module = model.get_submodule(name)
        if not is_linear(module):
            raise ModelLoadError(f"'{directory}': sublayer '{name}' is not a linear layer of the base.")
        info = sidecar_meta["layers"].get(name)
        if info is not None:
            op = parse_op(info["op"])
            alpha = float(info["scaling"]) * op.rank
            sigma_input = info.get("sigma_input", "projected")
            multiplicative = bool(info.get("multiplicative", False))
        else:
            rank = int(rank_pattern.get(name, adapter_cfg.get("r", 8)))
            op = parse_op(f"lora-{rank}")
            alpha = float(alpha_pattern.get(name, adapter_cfg.get("lora_alpha", 16.0)))
            sigma_input, multiplicative = "projected", False
        layer = DeltaLinear(module, [op], alpha=alpha, sigma_input=sigma_input, multiplicative=multiplicative)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        decisions[name] = op.name
        if op.kind == "tarp":
            values[f"{name}.lora_A.{op.name}"] = sidecar[f"{name}.lora_A"]
            values[f"{name}.lora_B.{op.name}"] = sidecar[f"{name}.lora_B"]
            values[f"{name}.tarp_sigma.{op.name}"] = sidecar[f"{name}.tarp_sigma"]
        else:
            values[f"{name}.lora_A.{op.name}"] = weights[f"base_model.model.{name}.lora_A.weight"]
            values[f"{name}.lora_B.{op.name}"] = weights[f"base_model.model.{name}.lora_B.weight"]
        if multiplicative:
            values[f"{name}.mult.{op.name}"] = sidecar[f"{name}.mult"]
    setattr(model, CONFIG_ATTR, None)
    params = delta_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    _load_values(params, values, f"export '{directory}'")
    return params, decisions


def rebuild_delta_model(base: nn.Module, peft_dir: str | Path | None = None, meta_state: str | Path | None = None,
                        share: bool = True) -> DeltaModel:
    """Put a meta-adapter's deltas back on ``base`` as :class:`DeltaLinear` modules.

    Args:
        base: The frozen base (not wrapped by PEFT yet when ``share`` is used afterwards by PEFT:
            call this first).
        peft_dir: An export of :func:`deltameta.deltas.export_peft` (``deltameta.json`` used when
            present, else the sidecar + adapter weights of an older export).
        meta_state: A meta-state directory (used when the export has no ``deltameta.json``).
        share: Inject into :func:`share_base` of ``base`` (``base`` itself stays untouched);
            otherwise inject into ``base`` in place.

    Returns:
        The :class:`DeltaModel` (delta parameters require grad; everything else is frozen).

    Raises:
        MetaStateError, ModelLoadError: missing or inconsistent files.
    """
    from safetensors.torch import load_file

    from deltameta.deltas.export import CONTROLLER_FILE, DELTAS_FILE

    if peft_dir is None and meta_state is None:
        raise ModelLoadError("rebuild_delta_model needs an export directory or a meta-state.")
    model = share_base(base) if share else base
    record = read_export_record(peft_dir) if peft_dir is not None else None
    if record is not None and (Path(peft_dir) / DELTAS_FILE).is_file():
        directory = Path(peft_dir)
        config = DeltaConfig.from_dict(record["delta_config"])
        controller_state = load_file(str(directory / CONTROLLER_FILE)) if record.get("controller") else None
        params, controller = _from_config(model, config, load_file(str(directory / DELTAS_FILE)), record.get("controller"),
                                          controller_state, f"{directory / DELTAS_FILE}")
        inner = InnerLoopRecord.from_dict(record["inner_loop"], f"{directory}/deltameta.json") if record.get("inner_loop") else None
        rates = load_rates(directory / EXPORT_RATES_FILE) if (directory / EXPORT_RATES_FILE).is_file() else None
        result = DeltaModel(model, params, controller, inner, rates, f"export {directory} (deltameta.json)",
                            dict(record.get("decisions") or {}))
    elif meta_state is not None:
        from deltameta.deltas.state import load_meta_state

        state = load_meta_state(meta_state)
        params, controller = _from_config(model, state.delta_config, state.deltas, state.controller_meta,
                                          state.controller_state, f"{state.path / 'deltas.safetensors'}")
        result = DeltaModel(model, params, controller, state.inner_loop, state.inner_lrs, f"meta-state {state.path}")
    else:
        params, decisions = _from_old_export(model, Path(peft_dir))
        result = DeltaModel(model, params, None, None, None,
                            f"export {peft_dir} (no deltameta.json: one op per kept sublayer from the sidecar)", decisions)
    if result.inner_lrs:
        check_rates_fit(result.inner_lrs, result.params, result.source)
    return result
