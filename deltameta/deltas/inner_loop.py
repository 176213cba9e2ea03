"""The recorded inner loop: what a meta-adapter was meta-trained to be adapted with.

A meta-adapter is an initialisation for a particular inner loop (algorithm, number of steps,
optimizer and its settings, learning rate(s), clipping, shots). That record travels with the
adapter:

* in the meta-state: ``meta_state.json["inner_loop"]`` and, for Meta-SGD, the learned rates in
  ``inner_lrs.safetensors``;
* in every PEFT export: ``deltameta.json`` (key ``inner_loop``) and the learned rates in
  ``deltameta_inner_lrs.safetensors``; the model card lists it too.

Learned rates are stored under the delta parameter names of the meta-state
(``model.layers.0.self_attn.q_proj.lora_A.lora-8``); their shape broadcasts against the delta
tensor (a scalar per tensor, or per element). :func:`peft_rate_name` maps them to the names of
the exported PEFT LoRA tensors.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from deltameta.errors import MetaStateError

#: Version of the ``inner_loop`` record (bumped on incompatible changes).
INNER_LOOP_SCHEMA = 1
#: Learned inner rates in a meta-state directory.
STATE_RATES_FILE = "inner_lrs.safetensors"
#: Learned inner rates in a PEFT export directory.
EXPORT_RATES_FILE = "deltameta_inner_lrs.safetensors"
#: Prefix of Meta-SGD's rate parameters (``MetaSGD.extra_parameters()`` names).
METASGD_PREFIX = "metasgd_lr."


@dataclasses.dataclass
class InnerLoopRecord:
    """What the meta-train inner loop was.

    Attributes:
        algorithm: ``fomaml``, ``maml``, ``reptile``, ``metasgd``, ``multitask`` or ``none``.
        steps: Inner optimizer steps on the support set.
        optimizer: ``sgd`` or ``adam``.
        lr: Inner learning rate (Meta-SGD: the initial value; the learned ones are in ``rates``).
        clip: Inner gradient global-norm threshold (``None``: off).
        first_order: Whether the inner loop dropped second-order terms.
        shots: Support examples per task.
        query_size: Query examples per task.
        betas: Adam's ``(beta1, beta2)`` (``adam`` only, else ``None``).
        eps: Adam's epsilon (``adam`` only, else ``None``).
        learned_rates: Whether per-tensor (or per-element) learned rates exist (Meta-SGD).
        max_length: Token limit per example in meta-training.
        query_context: ``none``, or ``support``: every query prompt carried the support examples as
            in-context demonstrations (records without the field: ``none``).
    """

    algorithm: str
    steps: int
    optimizer: str = "sgd"
    lr: float = 0.05
    clip: float | None = None
    first_order: bool = True
    shots: int | None = None
    query_size: int | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    learned_rates: bool = False
    max_length: int | None = None
    query_context: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON dict (``schema`` first)."""
        data = {"schema": INNER_LOOP_SCHEMA, **dataclasses.asdict(self)}
        if data["betas"] is not None:
            data["betas"] = [float(b) for b in data["betas"]]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "inner_loop") -> "InnerLoopRecord":
        """Read a record written by :meth:`to_dict`.

        Raises:
            MetaStateError: a newer schema, or a missing/ill-typed field (named).
        """
        schema = data.get("schema", INNER_LOOP_SCHEMA)
        if not isinstance(schema, int) or schema > INNER_LOOP_SCHEMA:
            raise MetaStateError(f"{where}: schema {schema!r} is newer than this deltameta reads "
                                 f"({INNER_LOOP_SCHEMA}); upgrade deltameta.")
        for key, kind in (("algorithm", str), ("steps", int)):
            if not isinstance(data.get(key), kind):
                raise MetaStateError(f"{where}: field '{key}' is {data.get(key)!r}; expected a {kind.__name__}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        if values.get("betas") is not None:
            values["betas"] = tuple(float(b) for b in values["betas"])
        if values.get("query_context", "none") not in ("none", "support"):
            raise MetaStateError(f"{where}: field 'query_context' is {values['query_context']!r}; "
                                 "expected 'none' or 'support'.")
        return cls(**values)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`deltameta.meta.functional.adapt` selecting the optimizer."""
        out: dict[str, Any] = {"optimizer": self.optimizer}
        if self.optimizer == "adam":
            out["betas"] = tuple(self.betas or (0.9, 0.999))
            out["eps"] = 1e-8 if self.eps is None else float(self.eps)
        return out

    def describe(self) -> str:
        """One line for cards and reports."""
        clip = self.clip if self.clip else "off"
        text = (f"{self.algorithm}: {self.steps} step(s) of {self.optimizer} at lr {self.lr:g}"
                f"{' (learned per-tensor rates)' if self.learned_rates else ''}, clip {clip}, "
                f"{'first' if self.first_order else 'second'}-order, {self.shots} shots, query {self.query_size}")
        if self.optimizer == "adam":
            text += f", betas {list(self.optimizer_kwargs()['betas'])}, eps {self.optimizer_kwargs()['eps']:g}"
        if self.query_context == "support":
            text += ", queries scored with the support examples as in-context demonstrations"
        return text


def record_from_config(config: Mapping[str, Any], first_order: bool | None = None,
                       learned_rates: bool = False) -> InnerLoopRecord:
    """Build the record from a meta-train config (``dataclasses.asdict(MetaTrainConfig)``).

    Args:
        config: The run's config dict (``algorithm``, ``inner_steps``, ``inner_lr``, ...).
        first_order: The inner loop's order (default: derived like ``MetaTrainConfig.is_first_order``).
        learned_rates: Whether learned rates are saved beside the record.
    """
    algorithm = str(config.get("algorithm", "fomaml"))
    if first_order is None:
        flag = config.get("first_order")
        first_order = False if algorithm == "maml" else (flag is not False if algorithm == "metasgd" else True)
    optimizer = str(config.get("inner_optimizer", "sgd"))
    clip = config.get("inner_clip")
    return InnerLoopRecord(
        algorithm=algorithm,
        steps=int(config.get("inner_steps", 1)),
        optimizer=optimizer,
        lr=float(config.get("inner_lr", 0.05)),
        clip=float(clip) if clip else None,
        first_order=bool(first_order),
        shots=config.get("shots"),
        query_size=config.get("query_size"),
        betas=tuple(config.get("inner_betas", (0.9, 0.999))) if optimizer == "adam" else None,
        eps=float(config.get("inner_eps", 1e-8)) if optimizer == "adam" else None,
        learned_rates=learned_rates,
        max_length=config.get("max_length"),
        query_context=str(config.get("query_context") or "none"),
    )


def rates_from_extra_parameters(extra: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta-SGD's learned rates (``MetaSGD.extra_parameters()``) keyed by delta parameter name."""
    return {name[len(METASGD_PREFIX):]: value.detach().to("cpu", torch.float32).contiguous()
            for name, value in extra.items() if name.startswith(METASGD_PREFIX)}


def save_rates(path: str | Path, rates: Mapping[str, torch.Tensor]) -> None:
    """Write learned rates (safetensors)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in rates.items()}, str(path))


def load_rates(path: str | Path) -> dict[str, torch.Tensor]:
    """Read learned rates (safetensors; never pickle).

    Raises:
        MetaStateError: a rate that is not finite.
    """
    from safetensors.torch import load_file

    rates = load_file(str(path))
    for name, value in rates.items():
        if not bool(torch.isfinite(value).all()):
            raise MetaStateError(f"{path}: learned inner rate '{name}' is not finite.")
    return rates


def check_rates_fit(rates: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise unless every rate broadcasts against its delta tensor.

    Raises:
        MetaStateError: naming the tensor and both shapes.
    """
    for name, rate in rates.items():
        if name not in params:
            continue
        if not _broadcasts(rate, params[name]):
            raise MetaStateError(f"{where}: learned rate '{name}' has shape {tuple(rate.shape)}, which does not "
                                 f"broadcast against its delta's {tuple(params[name].shape)}.")


def peft_rate_name(delta_name: str, adapter_name: str) -> tuple[str, str] | None:
    """Map a delta name (``<layer>.lora_A.<op>``) to ``(<layer>, lora_A|lora_B)``; ``None`` for others.

    The PEFT tensor of the same role is ``base_model.model.<layer>.lora_A.<adapter_name>.weight``.
    """
    for role in ("lora_A", "lora_B"):
        marker = f".{role}."
        if marker in delta_name:
            layer = delta_name.split(marker)[0]
            return layer, role
    return None


def rates_for_peft(rates: Mapping[str, torch.Tensor], peft_params: Mapping[str, torch.Tensor],
                   adapter_name: str, default: float) -> dict[str, torch.Tensor]:
    """Learned rates re-keyed to a PEFT adapter's parameter names (``default`` where none was learned).

    The exported ``lora_B`` of a TARP op is the folded ``B Σ̄``; it gets the rate learned for ``B``.
    """
    by_role: dict[tuple[str, str], torch.Tensor] = {}
    for name, rate in rates.items():
        key = peft_rate_name(name, adapter_name)
        if key is not None:
            by_role[key] = rate
    out: dict[str, torch.Tensor] = {}
    for name, p in peft_params.items():
        rate = None
        for (layer, role), value in by_role.items():
            if name.endswith(f"{layer}.{role}.{adapter_name}.weight"):
                rate = value
                break
        if rate is None or not _broadcasts(rate, p):
            rate = torch.tensor(float(default))
        out[name] = rate.to(p.device, p.dtype)
    return out


def _broadcasts(rate: torch.Tensor, p: torch.Tensor) -> bool:
    try:
        return torch.broadcast_shapes(tuple(rate.shape), tuple(p.shape)) == tuple(p.shape)
    except RuntimeError:
        return False


def read_export_record(directory: str | Path) -> dict[str, Any] | None:
    """Read ``deltameta.json`` of an export (``None`` for an export without one, e.g. an older one).

    Raises:
        MetaStateError: the file is not valid JSON or has a newer schema.
    """
    from deltameta.deltas.export import EXPORT_META, EXPORT_SCHEMA

    file = Path(directory) / EXPORT_META
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MetaStateError(f"{file} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise MetaStateError(f"{file}: expected a JSON object.")
    schema = data.get("schema")
    if not isinstance(schema, int) or schema > EXPORT_SCHEMA:
        raise MetaStateError(f"{file}: schema {schema!r}; this deltameta reads schema <= {EXPORT_SCHEMA}.")
    return data
