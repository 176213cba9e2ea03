"""The TAMS-style architecture controller: which op (skip, lora-r, tarp-r) each sublayer gets.

During meta-training the controller samples one op per sublayer with a straight-through
Gumbel-softmax (one-hot in the forward pass, soft gradients to the logits) and is updated in the
outer loop only; at meta-test and export time it takes the argmax. Two modes:

* ``global``: learned logits ``[n_sublayers, n_ops]``;
* ``task``: a small MLP maps the task embedding (see :func:`deltameta.deltas.model.task_embedding`)
  to those logits, so each task can get its own structure.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from deltameta.deltas.config import DeltaConfig, parse_op
from deltameta.deltas.model import apply_op_weights, delta_layers
from deltameta.errors import ConfigError, DeltametaError


def op_cost(op: str, in_features: int, out_features: int, sigma_input: str = "projected", multiplicative: bool = False) -> int:
    """Return the number of adapted parameters an op adds to an ``in -> out`` linear layer."""
    spec = parse_op(op)
    if spec.kind == "skip":
        return 0
    r = spec.rank
    cost = r * (in_features + out_features)
    if spec.kind == "tarp":
        cost += r * r * (r if sigma_input == "projected" else in_features)
    if multiplicative:
        cost += out_features
    return cost


def temperature(step: int, total_steps: int, tau_start: float, tau_end: float, schedule: str = "exponential") -> float:
    """Return the Gumbel-softmax temperature at ``step`` of ``total_steps``.

    ``exponential``: ``tau_start * (tau_end / tau_start) ** (step / (total_steps - 1))``;
    ``linear``: straight line. ``tau_start`` at step 0, ``tau_end`` at the last step and after.
    """
    if total_steps <= 1:
        return float(tau_end)
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    if schedule == "linear":
        return float(tau_start + (tau_end - tau_start) * frac)
    if schedule == "exponential":
        return float(tau_start * (tau_end / tau_start) ** frac)
    raise ConfigError(f"unknown temperature schedule '{schedule}'; choose 'exponential' or 'linear'.")


def gumbel_softmax(
    logits: torch.Tensor, tau: float = 1.0, hard: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Straight-through Gumbel-softmax over the last dimension (reproducible with ``generator``).

    Returns:
        One-hot samples in the forward pass when ``hard`` (gradients of the soft sample).
    """
    # The noise is drawn where the generator lives (a CPU generator on CUDA logits would fail) and then
    # moved, so a seeded sample is the same on every device.
    device = generator.device if generator is not None else logits.device
    uniform = torch.rand(logits.shape, generator=generator, device=device, dtype=logits.dtype).to(logits.device)
    exponential = (-torch.log(uniform.clamp_min(1e-10))).clamp_min(1e-10)
    gumbels = -torch.log(exponential)
    soft = torch.softmax((logits + gumbels) / tau, dim=-1)
    if not hard:
        return soft
    index = soft.argmax(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return one_hot - soft.detach() + soft


class ArchController(nn.Module):
    """Chooses an op per candidate sublayer.

    Args:
        candidates: Full module names of the injected sublayers (``delta_layers(model)`` keys).
        ops: Op names, as in ``DeltaConfig.ops`` (the layers' op order).
        mode: ``global`` or ``task``.
        costs: ``[n_sublayers, n_ops]`` parameter cost of each op at each sublayer.
        embed_dim: Task-embedding size (``task`` mode).
        hidden: MLP width (``task`` mode).
    """

    def __init__(
        self,
        candidates: list[str],
        ops: list[str],
        mode: str = "global",
        costs: torch.Tensor | None = None,
        embed_dim: int | None = None,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if mode not in ("global", "task"):
            raise ConfigError(f"controller mode '{mode}': expected 'global' or 'task'.")
        if not candidates:
            raise ConfigError("the controller needs at least one candidate sublayer.")
        self.candidates = list(candidates)
        self.ops = list(ops)
        self.mode = mode
        self.embed_dim = embed_dim
        self.hidden = hidden
        n_sub, n_ops = len(self.candidates), len(self.ops)
        self.register_buffer("costs", (costs if costs is not None else torch.zeros(n_sub, n_ops)).float().clone())
        if mode == "global":
            self.logits = nn.Parameter(torch.zeros(n_sub, n_ops))
        else:
            if not embed_dim:
                raise ConfigError("a task-conditioned controller needs embed_dim (the model's hidden size).")
            self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_sub * n_ops))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    @classmethod
    def for_model(cls, model: nn.Module, config: DeltaConfig | None = None) -> "ArchController":
        """Build the controller for a model with injected deltas (candidates = every delta layer).

        Raises:
            ConfigError: the config has ``controller='none'`` or the model has no deltas.
        """
        config = config or getattr(model, "deltameta_delta_config", None)
        if config is None or config.controller == "none":
            raise ConfigError("the delta config has controller='none'; set controller to 'global' or 'task'.")
        layers = delta_layers(model)
        if not layers:
            raise ConfigError("the model holds no deltas; call inject_deltas first.")
        costs = torch.tensor(
            [
                [op_cost(op, l.in_features, l.out_features, config.tarp_sigma_input, config.multiplicative) for op in config.ops]
                for l in layers.values()
            ],
            dtype=torch.float32,
        )
        embed_dim = model.get_input_embeddings().weight.shape[-1]
        device = next(iter(layers.values())).base_layer.weight.device
        return cls(list(layers), list(config.ops), config.controller, costs, embed_dim, config.controller_hidden).to(device)

    def metadata(self) -> dict:
        """Return what is needed (besides the state dict) to rebuild the controller."""
        return {"candidates": self.candidates, "ops": self.ops, "mode": self.mode, "embed_dim": self.embed_dim, "hidden": self.hidden}

    # ----------------------------------------------------------------------------------------

    def get_logits(self, task_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits ``[n_sub, n_ops]`` (or ``[T, n_sub, n_ops]`` for ``[T, embed]`` embeddings)."""
        if self.mode == "global":
            return self.logits
        if task_embedding is None:
            raise DeltametaError("the task-conditioned controller needs a task embedding (see deltas.model.task_embedding).")
        emb = task_embedding.to(self.mlp[0].weight.dtype)
        out = self.mlp(emb)
        return out.reshape(*emb.shape[:-1], len(self.candidates), len(self.ops))

    def probs(self, task_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Return the op probabilities (softmax of the logits)."""
        return torch.softmax(self.get_logits(task_embedding), dim=-1)

    def forward(
        self,
        task_embedding: torch.Tensor | None = None,
        tau: float = 1.0,
        hard: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample op weights with the (straight-through) Gumbel-softmax.

        Args:
            task_embedding: ``[embed]`` or ``[T, embed]`` (``task`` mode only).
            tau: Temperature (see :func:`temperature`).
            hard: One-hot forward with soft gradients (True) or the soft sample.
            generator: Random generator for reproducible sampling.

        Returns:
            ``[n_sub, n_ops]`` (or ``[T, n_sub, n_ops]``) weights for :meth:`apply`.
        """
        return gumbel_softmax(self.get_logits(task_embedding), tau=tau, hard=hard, generator=generator)

    @torch.no_grad()
    def decide(self, task_embedding: torch.Tensor | None = None) -> list[str]:
        """Return the argmax op of each candidate sublayer (meta-test / export)."""
        index = self.get_logits(task_embedding).argmax(-1)
        if index.dim() != 1:
            raise DeltametaError("decide() takes one task embedding, not a batch.")
        return [self.ops[i] for i in index.tolist()]

    def decision_weights(self, decisions: list[str]) -> torch.Tensor:
        """Return one-hot weights ``[n_sub, n_ops]`` for a list of decided ops."""
        weights = torch.zeros(len(self.candidates), len(self.ops), device=self.costs.device)
        for row, op in enumerate(decisions):
            weights[row, self.ops.index(op)] = 1.0
        return weights

    # ----------------------------------------------------------------------------------------

    def _probs_or(self, probs: torch.Tensor | None, task_embedding: torch.Tensor | None) -> torch.Tensor:
        return self.probs(task_embedding) if probs is None else probs

    def expected_params(self, probs: torch.Tensor | None = None, task_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Return the expected number of adapted parameters (averaged over a task batch)."""
        probs = self._probs_or(probs, task_embedding)
        total = (probs * self.costs).sum(dim=(-1, -2))
        return total.mean() if total.dim() else total

    def max_params(self) -> float:
        """Return the count when every sublayer takes its most expensive op."""
        return float(self.costs.max(-1).values.sum())

    def budget_loss(self, target: float, probs: torch.Tensor | None = None, task_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``((expected - target) / target)^2``, the parameter-budget regulariser.

        Args:
            target: Target expected adapted parameter count (absolute; see :meth:`max_params`).
        """
        if target <= 0:
            raise ConfigError(f"budget target {target} must be positive.")
        return ((self.expected_params(probs, task_embedding) - target) / target) ** 2

    def entropy(self, probs: torch.Tensor | None = None, task_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Return the mean entropy (nats) of the per-sublayer op distributions."""
        probs = self._probs_or(probs, task_embedding)
        return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()

    @contextlib.contextmanager
    def apply(self, model: nn.Module, weights: torch.Tensor) -> Iterator[None]:
        """Set every candidate's op weights from ``weights`` for the duration of the block.

        Args:
            model: The model holding the candidates.
            weights: ``[n_sub, n_ops]`` (one structure for the whole batch) or ``[G, n_sub, n_ops]``
                (one per group: per task in a task-batched call — ``G = T`` — or per example).
        """
        if weights.shape[-2:] != (len(self.candidates), len(self.ops)):
            raise DeltametaError(
                f"weights of shape {tuple(weights.shape)} do not fit {len(self.candidates)} sublayers x {len(self.ops)} ops."
            )
        per_layer = {name: weights[..., row, :] for row, name in enumerate(self.candidates)}
        with apply_op_weights(model, per_layer):
            yield

    # ----------------------------------------------------------------------------------------

    def decision_table(self, decisions: list[str], probs: torch.Tensor | None = None) -> str:
        """Return a text table: layer, sublayer, chosen op, its probability."""
        probs = probs.detach().float().cpu() if probs is not None else None
        rows = []
        for row, (name, op) in enumerate(zip(self.candidates, decisions)):
            layer, sub = split_sublayer(name)
            p = f"{probs[row, self.ops.index(op)].item():.3f}" if probs is not None else "-"
            rows.append((str(layer), sub, op, p))
        header = ("layer", "sublayer", "op", "prob")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines) + "\n"

    def decision_heatmap(self, path: str | Path, decisions: list[str], probs: torch.Tensor | None = None, title: str | None = None) -> Path:
        """Write a heatmap PNG: layers (rows) × sublayer types (columns), colour = chosen op.

        Each cell is annotated with the op and its probability.
        """
        from deltameta.plots import pyplot

        plt = pyplot()
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        probs = probs.detach().float().cpu() if probs is not None else None
        cells = [(*split_sublayer(name), op, row) for row, (name, op) in enumerate(zip(self.candidates, decisions))]
        layers = sorted({c[0] for c in cells}, key=lambda v: (isinstance(v, str), v))
        subs = list(dict.fromkeys(c[1] for c in cells))
        grid = torch.full((len(layers), len(subs)), float("nan"))
        palette = plt.get_cmap("tab10")
        colours = ListedColormap([palette(i % 10) for i in range(len(self.ops))])
        fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(subs), 1.8 + 0.45 * len(layers)))
        for layer, sub, op, row in cells:
            i, j = layers.index(layer), subs.index(sub)
            grid[i, j] = self.ops.index(op)
            p = f"\n{probs[row, self.ops.index(op)].item():.2f}" if probs is not None else ""
            ax.text(j, i, f"{op}{p}", ha="center", va="center", fontsize=7)
        ax.imshow(grid.numpy(), cmap=colours, vmin=-0.5, vmax=len(self.ops) - 0.5, aspect="auto")
        ax.set_xticks(range(len(subs)), subs, rotation=30, ha="right")
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        ax.set_xlabel("sublayer")
        ax.set_ylabel("layer")
        ax.set_title(title or "controller decisions")
        ax.legend(handles=[Patch(color=colours(i), label=op) for i, op in enumerate(self.ops)], bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=7)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def split_sublayer(name: str) -> tuple[int | str, str]:
    """Split ``model.layers.3.self_attn.q_proj`` into ``(3, 'q_proj')`` (``('-', name)`` if no index)."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    sub = name.rsplit(".", 1)[-1]
    return (int(match.group(1)), sub) if match else ("-", sub)


def build_controller(model: nn.Module, metadata: dict, state_dict: dict | None = None) -> ArchController:
    """Rebuild a saved controller for ``model`` (see :meth:`ArchController.metadata`)."""
    config = getattr(model, "deltameta_delta_config", None)
    layers = delta_layers(model)
    missing = [c for c in metadata["candidates"] if c not in layers]
    if missing:
        raise DeltametaError(f"saved controller names sublayers the model lacks: {', '.join(missing[:5])}.")
    costs = torch.tensor(
        [
            [
                op_cost(op, layers[c].in_features, layers[c].out_features,
                        config.tarp_sigma_input if config else "projected", config.multiplicative if config else False)
                for op in metadata["ops"]
            ]
            for c in metadata["candidates"]
        ],
        dtype=torch.float32,
    )
    controller = ArchController(metadata["candidates"], metadata["ops"], metadata["mode"], costs, metadata.get("embed_dim"), metadata.get("hidden", 64))
    if state_dict is not None:
        controller.load_state_dict(state_dict)
    device = next(iter(layers.values())).base_layer.weight.device
    return controller.to(device)


__all__ = [
    "ArchController",
    "build_controller",
    "gumbel_softmax",
    "op_cost",
    "split_sublayer",
    "temperature",
]
