"""The meta-state format: what a meta-training run saves and what export reads.

A meta-state directory holds

* ``delta_config.json``: the :class:`~deltameta.deltas.config.DeltaConfig`;
* ``deltas.safetensors``: the delta parameters, under their ``model.named_parameters()`` names;
* ``controller.safetensors`` + ``controller.json``: the architecture controller (if any);
* ``fold_stats.safetensors``: TARP fold statistics (optional): ``"<layer>::<op>"`` -> mean of
  ``Σ(x) - I`` over meta-training tokens, ``"<layer>::<op>::zz"`` / ``"::uz"`` -> ``E[z zᵀ]`` /
  ``E[u zᵀ]`` and, with the multiplicative term, ``"::yz"`` -> ``E[W0 x zᵀ]`` (float64, for the
  least-squares fold, see :mod:`deltameta.deltas.fold`; absent in meta-states of older versions,
  which export with the mean fold), ``"__heldout__::<key>"`` ->
  held-out encoded examples (``input_ids``, ``attention_mask``, ``labels``) on which the export
  measures the fold error, and ``"__task_embedding__"`` -> mean task embedding;
* ``base.json``: ``model.deltameta_base.to_dict()``;
* ``meta_state.json``: extras (recipe, metrics, task distribution, ...) and ``inner_loop``: the
  recorded inner loop (see :mod:`deltameta.deltas.inner_loop`);
* ``inner_lrs.safetensors``: Meta-SGD's learned inner rates (optional), by delta name.

A meta-training run directory holds its finished meta-state in ``RUN_DIR/final/``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltameta.atomic import atomic_directory, dumps_json
from deltameta.integrity import check_safetensors
from deltameta.deltas.config import DeltaConfig
from deltameta.deltas.inner_loop import STATE_RATES_FILE, InnerLoopRecord, load_rates, record_from_config, save_rates
from deltameta.deltas.model import delta_parameters, inject_deltas
from deltameta.errors import MetaStateError

FINAL_DIR = "final"
TASK_EMBEDDING_KEY = "__task_embedding__"
HELDOUT_PREFIX = "__heldout__::"
MOMENT_KEYS = ("zz", "uz")


@dataclasses.dataclass
class MetaState:
    """A loaded meta-state (see the module docstring for the files).

    Attributes:
        path: The meta-state directory.
        delta_config: The delta config.
        deltas: Delta tensors by parameter name.
        base: ``base.json`` (keys of :class:`deltameta.base.BaseInfo`).
        extra: ``meta_state.json``.
        controller_state: Controller state dict, or ``None``.
        controller_meta: ``controller.json`` (see ``ArchController.metadata``), or ``None``.
        fold_stats: ``{layer: {op: mean Σ - I}}`` or ``None``.
        task_embedding_mean: Mean task embedding over meta-training, or ``None``.
        inner_loop: The recorded inner loop (older meta-states: derived from the saved config;
            ``None`` when neither exists).
        inner_lrs: Meta-SGD's learned inner rates by delta name, or ``None``.
        fold_moments: ``{layer: {op: {"zz": E[z zᵀ], "uz": E[u zᵀ][, "yz": E[W0 x zᵀ]]}}}``
            (least-squares fold) or ``None``.
        fold_heldout: Held-out encoded examples ``{input_ids, attention_mask, labels}`` for
            measuring the fold error, or ``None``.
    """

    path: Path
    delta_config: DeltaConfig
    deltas: dict[str, torch.Tensor]
    base: dict[str, Any]
    extra: dict[str, Any]
    controller_state: dict[str, torch.Tensor] | None = None
    controller_meta: dict[str, Any] | None = None
    fold_stats: dict[str, dict[str, torch.Tensor]] | None = None
    task_embedding_mean: torch.Tensor | None = None
    inner_loop: InnerLoopRecord | None = None
    inner_lrs: dict[str, torch.Tensor] | None = None
    fold_moments: dict[str, dict[str, dict[str, torch.Tensor]]] | None = None
    fold_heldout: dict[str, torch.Tensor] | None = None


def save_meta_state(
    directory: str | Path,
    model: nn.Module,
    delta_config: DeltaConfig | None = None,
    controller: nn.Module | None = None,
    extra: dict[str, Any] | None = None,
    fold_stats: dict[str, dict[str, torch.Tensor]] | None = None,
    task_embedding_mean: torch.Tensor | None = None,
    inner_loop: InnerLoopRecord | None = None,
    inner_lrs: dict[str, torch.Tensor] | None = None,
    fold_moments: dict[str, dict[str, dict[str, Any]]] | None = None,
    fold_heldout: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a meta-state atomically (a reader sees the old directory or the complete new one).

    Args:
        directory: Destination (e.g. ``RUN_DIR/final`` or ``RUN_DIR/checkpoints/step-100``).
        model: Model with injected deltas and ``deltameta_base``.
        delta_config: The config (default: the one :func:`inject_deltas` attached to the model).
        controller: The :class:`~deltameta.deltas.controller.ArchController`, if any.
        extra: JSON-serialisable extras (recipe, metrics, task distribution, ...).
        fold_stats: ``{layer: {op: mean of Σ(x) - I}}`` over meta-training tokens (TARP fold point).
        task_embedding_mean: Mean task embedding (export's default input to a task controller).
        inner_loop: The inner loop the deltas were meta-trained for (``meta_state.json["inner_loop"]``).
        inner_lrs: Learned inner rates by delta name (Meta-SGD), written to ``inner_lrs.safetensors``.
        fold_moments: ``{layer: {op: {"zz": E[z zᵀ], "uz": E[u zᵀ]}}}`` over the same tokens
            (least-squares fold).
        fold_heldout: Encoded held-out examples (``input_ids``, ``attention_mask``, ``labels``)
            not used for the fold statistics; the export measures the fold error on them.

    Returns:
        The directory.
    """
    config = delta_config or getattr(model, "deltameta_delta_config", None)
    if config is None:
        raise MetaStateError("save_meta_state: the model holds no deltas and no delta_config was given.")
    base = getattr(model, "deltameta_base", None)
    if base is None:
        raise MetaStateError("save_meta_state: the model has no deltameta_base; load it with deltameta.base.load_base.")
    directory = Path(directory)
    tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in delta_parameters(model).items()}
    extra = dict(extra or {})
    if inner_loop is not None:
        extra["inner_loop"] = inner_loop.to_dict()
    with atomic_directory(directory) as tmp:
        (tmp / "delta_config.json").write_text(config.to_json(), encoding="utf-8")
        save_file(tensors, str(tmp / "deltas.safetensors"))
        (tmp / "base.json").write_text(json.dumps(base.to_dict(), indent=2) + "\n", encoding="utf-8")
        (tmp / "meta_state.json").write_text(dumps_json(extra or {}, indent=2) + "\n", encoding="utf-8")
        if inner_lrs:
            save_rates(tmp / STATE_RATES_FILE, inner_lrs)
        if controller is not None:
            state = {k: v.detach().to("cpu").contiguous() for k, v in controller.state_dict().items()}
            save_file(state, str(tmp / "controller.safetensors"))
            (tmp / "controller.json").write_text(json.dumps(controller.metadata(), indent=2) + "\n", encoding="utf-8")
        stats: dict[str, torch.Tensor] = {}
        for layer, ops in (fold_stats or {}).items():
            for op, value in ops.items():
                stats[f"{layer}::{op}"] = value.detach().to("cpu", torch.float32).contiguous()
        for layer, ops in (fold_moments or {}).items():
            for op, entry in ops.items():
                for key in (*MOMENT_KEYS, "yz"):
                    if key in entry:
                        stats[f"{layer}::{op}::{key}"] = entry[key].detach().to("cpu", torch.float64).contiguous()
        for key, value in (fold_heldout or {}).items():
            stats[HELDOUT_PREFIX + key] = value.detach().to("cpu").contiguous()
        if task_embedding_mean is not None:
            stats[TASK_EMBEDDING_KEY] = task_embedding_mean.detach().to("cpu", torch.float32).contiguous()
        if stats:
            save_file(stats, str(tmp / "fold_stats.safetensors"))
    return directory


def resolve_meta_state_dir(path: str | Path) -> Path:
    """Return the meta-state directory for a run directory (``final/``) or a meta-state directory.

    Raises:
        MetaStateError: the path does not exist, or a run directory has no finished state.
    """
    path = Path(path)
    if not path.exists():
        raise MetaStateError(f"'{path}' does not exist; pass a meta-training run directory or a meta-state directory.")
    if not path.is_dir():
        raise MetaStateError(f"'{path}' is a file; pass a meta-training run directory or a meta-state directory.")
    if (path / "delta_config.json").is_file():
        return path
    if (path / FINAL_DIR / "delta_config.json").is_file():
        return path / FINAL_DIR
    raise MetaStateError(f"run dir {path} has no finished state ({FINAL_DIR}/ missing); is it still training?")


def load_meta_state(directory: str | Path) -> MetaState:
    """Load a meta-state (a run directory's ``final/`` is found automatically).

    Raises:
        MetaStateError: missing or malformed files.
    """
    path = resolve_meta_state_dir(directory)

    def read_json(name: str) -> Any:
        file = path / name
        if not file.is_file():
            raise MetaStateError(f"meta-state {path} lacks {name}.")
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise MetaStateError(f"{file} is not valid JSON: {error}") from error

    config = DeltaConfig.from_dict(read_json("delta_config.json"))
    if not (path / "deltas.safetensors").is_file():
        raise MetaStateError(f"meta-state {path} lacks deltas.safetensors.")
    state = MetaState(
        path=path,
        delta_config=config,
        deltas=load_file(str(check_safetensors(path / "deltas.safetensors"))),
        base=read_json("base.json"),
        extra=read_json("meta_state.json") if (path / "meta_state.json").is_file() else {},
    )
    if (path / "controller.safetensors").is_file():
        state.controller_state = load_file(str(check_safetensors(path / "controller.safetensors")))
        state.controller_meta = read_json("controller.json")
    if (path / "fold_stats.safetensors").is_file():
        stats: dict[str, dict[str, torch.Tensor]] = {}
        moments: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        heldout: dict[str, torch.Tensor] = {}
        for key, value in load_file(str(check_safetensors(path / "fold_stats.safetensors"))).items():
            if key == TASK_EMBEDDING_KEY:
                state.task_embedding_mean = value
                continue
            if key.startswith(HELDOUT_PREFIX):
                heldout[key.removeprefix(HELDOUT_PREFIX)] = value
                continue
            layer, _, op = key.partition("::")
            op, _, moment = op.partition("::")
            if moment:
                moments.setdefault(layer, {}).setdefault(op, {})[moment] = value
            else:
                stats.setdefault(layer, {})[op] = value
        state.fold_stats = stats or None
        complete = {layer: {op: entry for op, entry in ops.items() if set(MOMENT_KEYS) <= set(entry)}
                    for layer, ops in moments.items()}
        state.fold_moments = {layer: ops for layer, ops in complete.items() if ops} or None
        state.fold_heldout = heldout if {"input_ids", "attention_mask", "labels"} <= set(heldout) else None
    if isinstance(state.extra.get("inner_loop"), dict):
        state.inner_loop = InnerLoopRecord.from_dict(state.extra["inner_loop"], f"{path / 'meta_state.json'}: inner_loop")
    elif isinstance(state.extra.get("config"), dict) and "inner_steps" in state.extra["config"]:
        state.inner_loop = record_from_config(state.extra["config"])  # a meta-state older than the record
    if (path / STATE_RATES_FILE).is_file():
        state.inner_lrs = load_rates(path / STATE_RATES_FILE)
    return state


def build_from_meta_state(state: MetaState | str | Path, device: str | None = "cpu"):
    """Load the base named in ``base.json``, inject the deltas and load their values.

    Args:
        state: A :class:`MetaState` or a directory.
        device: Device to load on.

    Returns:
        ``(model, tokenizer, controller)``; ``controller`` is ``None`` without one.
    """
    from deltameta.base import load_base
    from deltameta.deltas.controller import build_controller

    if not isinstance(state, MetaState):
        state = load_meta_state(state)
    base = state.base
    kwargs: dict[str, Any] = {
        "quantization": base.get("quantization", "nf4"),
        "compute_dtype": base.get("compute_dtype"),
        "double_quant": bool(base.get("double_quant", False)),
        "device": device,
    }
    if base.get("seed") is not None:
        kwargs["seed"] = base["seed"]
    model, tokenizer = load_base(base["name"], **kwargs)
    inject_deltas(model, state.delta_config)
    params = delta_parameters(model)
    missing = sorted(set(params) - set(state.deltas))
    unexpected = sorted(set(state.deltas) - set(params))
    if missing or unexpected:
        raise MetaStateError(
            f"deltas.safetensors in {state.path} does not fit the injected model "
            f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})."
        )
    with torch.no_grad():
        for name, p in params.items():
            value = state.deltas[name]
            if value.shape != p.shape:
                raise MetaStateError(f"delta '{name}' has shape {tuple(value.shape)} in {state.path}, the model expects {tuple(p.shape)}.")
            p.copy_(value.to(p.device, p.dtype))
    controller = None
    if state.controller_meta is not None:
        controller = build_controller(model, state.controller_meta, state.controller_state)
    return model, tokenizer, controller
