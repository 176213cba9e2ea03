"""The delta configuration: which adapter, where, and what the architecture controller may choose.

A :class:`DeltaConfig` is saved as ``delta_config.json`` in every meta-state, so a run can be
rebuilt (and exported) from its directory alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from deltameta.errors import ConfigError

DELTAS = ("lora", "tarp")
SIGMA_INPUTS = ("projected", "token")
CONTROLLERS = ("none", "global", "task")
_OP_PATTERN = re.compile(r"^(lora|tarp)-([1-9][0-9]*)$")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One operation the controller can choose for a sublayer.

    Attributes:
        name: The op as written in the config (``skip``, ``lora-8``, ``tarp-4``).
        kind: ``skip``, ``lora`` or ``tarp``.
        rank: The adapter rank (0 for ``skip``).
    """

    name: str
    kind: str
    rank: int


def parse_op(name: str) -> OpSpec:
    """Parse an op name (``skip``, ``lora-R`` or ``tarp-R``).

    Raises:
        ConfigError: the name has another form.
    """
    if name == "skip":
        return OpSpec("skip", "skip", 0)
    match = _OP_PATTERN.match(name)
    if not match:
        raise ConfigError(f"unknown op '{name}'; ops are 'skip', 'lora-R' or 'tarp-R' with a rank R >= 1 (e.g. 'lora-8').")
    return OpSpec(name, match.group(1), int(match.group(2)))


@dataclasses.dataclass
class DeltaConfig:
    """How adapter deltas are built and (optionally) chosen per sublayer.

    Attributes:
        delta: ``lora`` or ``tarp``: the single op used when there is no controller.
        rank: Rank of that single op.
        alpha: LoRA alpha; every op is scaled by ``alpha / rank``.
        target_modules: Module name suffixes (``q_proj``) matched like PEFT, or one regex string
            matched against full module names with ``re.fullmatch``.
        dropout: Dropout on the adapter input (0 disables it).
        tarp_sigma_input: ``projected``: Σ(x) is computed from A·x (an r → r² map);
            ``token``: from x itself (an in → r² map).
        multiplicative: Add an IA3-like learned row scaling of the frozen output, ``(1 + m) ⊙ W0 x``
            (not expressible in LoRA; exported to the TARP sidecar).
        ops: Candidate ops of the controller (``skip``, ``lora-R``, ``tarp-R``).
        controller: ``none`` (one op everywhere), ``global`` (learned logits per sublayer) or
            ``task`` (an MLP maps the task embedding to the logits).
        controller_hidden: Hidden width of the task-conditioned controller's MLP.
        tau_start: Gumbel-softmax temperature at the start of meta-training.
        tau_end: Temperature at the end.
        tau_schedule: ``exponential`` or ``linear`` decay from ``tau_start`` to ``tau_end``.
        budget_target: Target expected adapted parameters, as a fraction of the count when every
            sublayer takes its most expensive op.
        budget_weight: Weight of the budget regulariser.
        entropy_weight: Weight of the entropy term (positive pushes towards decisive choices).
    """

    delta: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] | str = dataclasses.field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0
    tarp_sigma_input: str = "projected"
    multiplicative: bool = False
    ops: list[str] = dataclasses.field(default_factory=lambda: ["skip", "lora-4", "lora-16", "tarp-8"])
    controller: str = "none"
    controller_hidden: int = 64
    tau_start: float = 5.0
    tau_end: float = 0.5
    tau_schedule: str = "exponential"
    budget_target: float = 0.5
    budget_weight: float = 0.1
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigError: a value is out of range or unknown.
        """
        if self.delta not in DELTAS:
            raise ConfigError(f"delta='{self.delta}': expected one of {', '.join(DELTAS)}.")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank={self.rank!r}: expected an integer >= 1.")
        if self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha!r}: expected a positive number.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r}: expected a number in [0, 1).")
        if self.tarp_sigma_input not in SIGMA_INPUTS:
            raise ConfigError(f"tarp_sigma_input='{self.tarp_sigma_input}': expected one of {', '.join(SIGMA_INPUTS)}.")
        if self.controller not in CONTROLLERS:
            raise ConfigError(f"controller='{self.controller}': expected one of {', '.join(CONTROLLERS)}.")
        if self.tau_schedule not in ("exponential", "linear"):
            raise ConfigError(f"tau_schedule='{self.tau_schedule}': expected 'exponential' or 'linear'.")
        if self.tau_start <= 0 or self.tau_end <= 0:
            raise ConfigError(f"tau_start={self.tau_start}, tau_end={self.tau_end}: temperatures must be positive.")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ConfigError(f"target_modules='{self.target_modules}' is not a valid regex: {error}") from error
        elif not self.target_modules:
            raise ConfigError("target_modules is empty; name at least one module (e.g. ['q_proj', 'v_proj']).")
        if self.controller != "none":
            specs = [parse_op(op) for op in self.ops]
            if len({s.name for s in specs}) != len(specs):
                raise ConfigError(f"ops={self.ops}: each op may appear only once.")
            if not any(s.kind != "skip" for s in specs):
                raise ConfigError(f"ops={self.ops}: the controller needs at least one op besides 'skip'.")

    def layer_ops(self) -> list[OpSpec]:
        """Return the ops every injected layer holds, in controller order (``skip`` included)."""
        if self.controller == "none":
            return [OpSpec(f"{self.delta}-{self.rank}", self.delta, self.rank)]
        return [parse_op(op) for op in self.ops]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        data = dataclasses.asdict(self)
        if isinstance(self.target_modules, list):
            data["target_modules"] = list(self.target_modules)
        return data

    def to_json(self) -> str:
        """Return the config as indented JSON."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeltaConfig":
        """Build a config from :meth:`to_dict` output.

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown delta config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}.")
        return cls(**data)
