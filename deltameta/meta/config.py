"""``MetaTrainConfig``: every key of ``deltameta meta-train`` (recipes and ``key=value``).

The defaults are the embedded default run: ``smollm2-135m`` in NF4, the built-in task families,
TARP deltas with a global architecture controller, first-order MAML, sized to finish on a 2-core
CPU in under 10 minutes.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from deltameta.config import BaseModelKeys, check_data_keys, columns_field, field, template_field
from deltameta.errors import ConfigError
from deltameta.reporting import report_to_field, resolve_report_to

ALGORITHMS = ("fomaml", "maml", "reptile", "metasgd", "multitask", "none")


@dataclasses.dataclass
class MetaTrainConfig(BaseModelKeys):
    """Configuration of a meta-training run (see ``deltameta meta-train --help``)."""

    # base model: model, quantization, double_quant, compute_dtype and device come from BaseModelKeys
    gradient_checkpointing: bool = field(False, "recompute activations in backward (first-order algorithms only)")

    # tasks
    tasks: str = field("builtin", "task source: 'builtin', 'builtin:FAMILY,...', a BIG-bench dir, a jsonl/csv file; join several with '+'")
    columns: dict[str, str] = columns_field()
    template: str = template_field()
    splits: str = field("train=0.75,validation=0.25", "a splits.json path or family ratios like train=0.8,validation=0.2")
    train_split: str = field("train", "split used for meta-training")
    val_split: str = field("validation", "held-out split for validation ('' to skip)")
    val_holdout: float = field(0.0, "fraction of train_split held out for validation (replaces val_split when > 0)")
    val_holdout_unit: Literal["family", "task"] = field(
        "family", "what val_holdout holds out: whole families (unseen families) or tasks of every family (new tasks of seen families)")
    builtin_tasks_per_family: int = field(16, "tasks generated per built-in family")
    builtin_examples_per_task: int = field(64, "examples per built-in task")
    task_weights: str = field("uniform", "episode task weighting: uniform, family or examples")
    balanced: bool = field(False, "class-balanced support/query for multiple choice")
    shots: int = field(4, "support examples per task (k)")
    query_size: int = field(4, "query examples per task")
    max_length: int = field(128, "maximum tokens per example")
    query_context: Literal["none", "support"] = field(
        "none", "what a query prompt carries before its input: none, or support (the episode's k support examples "
        "with answers as in-context demonstrations, MetaICL-style as in MAML-en-LLM; up to max_length * (shots + 1) "
        "tokens); the multitask twin trains on the same query prompts, and evaluate scores queries alike")

    # deltas and controller
    delta: Literal["lora", "tarp"] = field("tarp", "adapter delta: lora or tarp (dynamic low-rank)")
    rank: int = field(8, "adapter rank (without controller)")
    alpha: float = field(16.0, "LoRA alpha (scaling alpha/rank)")
    target_modules: list[str] = field(["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], "sublayers that get deltas")
    ops: list[str] = field(["tarp-8", "lora-4", "skip"], "controller op choices (skip, lora-R, tarp-R); ties go to the first")
    controller: Literal["none", "global", "task"] = field("global", "architecture controller: none, global or task")
    controller_lr: float = field(0.05, "controller learning rate (outer loop)")
    tau_start: float = field(2.0, "Gumbel-softmax temperature at the start")
    tau_end: float = field(0.5, "Gumbel-softmax temperature at the end")
    tau_schedule: Literal["exponential", "linear"] = field("exponential", "temperature schedule")
    budget_target: float = field(0.5, "target expected adapted parameters, fraction of the maximum")
    budget_weight: float = field(0.1, "weight of the parameter-budget regulariser")
    entropy_weight: float = field(0.0, "weight of the controller entropy term")

    # meta-learning
    algorithm: Literal["fomaml", "maml", "reptile", "metasgd", "multitask", "none"] = field(
        "fomaml", "meta-learning algorithm; multitask and none (a fresh adapter, no training) are the baselines")
    first_order: bool | None = field(None, "metasgd: drop second-order terms (default: first-order except maml)")
    metasgd_rates: Literal["tensor", "element"] = field(
        "tensor", "metasgd: learned inner rates, one per delta tensor or one per element (Li et al. 2017); kept >= 0")
    metasgd_rate_grad: Literal["exact", "first_order"] = field(
        "exact", "metasgd with first-order deltas: exact rate gradient through the inner loop (K-1 double backwards "
        "for K inner steps) or first_order (cheaper; exact for 1 inner step, biased from 2 on; measured in benchmarks/README.md)")
    inner_steps: int = field(2, "inner optimizer steps on the support set")
    inner_lr: float = field(0.05, "inner learning rate (metasgd: initial value)")
    inner_clip: float = field(1.0, "inner gradient norm clipping (0: off)")
    inner_optimizer: Literal["sgd", "adam"] = field(
        "sgd", "inner-loop optimizer: sgd, or adam with differentiable state (inner_lr is then Adam's step size, e.g. 1e-3)")
    outer_steps: int = field(36, "outer (meta) steps")
    meta_batch_size: int = field(4, "tasks per meta-batch (gradient accumulation over tasks)")
    task_batched: bool = field(True, "run the meta-batch's tasks in one batched forward/backward (same result as looping)")
    outer_lr: float = field(3e-3, "AdamW learning rate of the deltas")
    weight_decay: float = field(0.0, "AdamW weight decay")
    warmup_steps: int = field(4, "linear warmup steps from lr 0 (transformers convention) before cosine decay")
    min_lr_ratio: float = field(0.1, "final lr as a fraction of outer_lr")
    meta_clip: float = field(1.0, "meta-gradient norm clipping (0: off)")
    init_loss_weight: float = field(
        0.0, "meta-learners: add this times the support loss at the meta-parameters (before adaptation) to the outer "
        "loss, so the initialisation stays a good adapter itself; reuses the first inner gradient, no extra pass")
    max_nonfinite: int = field(5, "stop after this many non-finite steps in a row")

    # validation, checkpoints, output
    eval_every: int = field(12, "validate every N outer steps (0: only at the end)")
    eval_tasks: int = field(6, "held-out episodes per validation")
    checkpoint_every: int = field(12, "checkpoint every N outer steps (0: only at the end)")
    keep_checkpoints: int = field(2, "number of recent checkpoints kept")
    seed: int = field(0, "seed of everything (tasks, episodes, init, Gumbel noise)")
    output_dir: str = field("runs/meta-train", "run directory")
    export: bool = field(True, "write the PEFT export of the final meta-adapter into RUN_DIR/peft")
    plots: bool = field(True, "write PNG plots of the curves")
    report_to: list[str] = report_to_field()
    progress: bool = field(True, "show a progress bar")

    def validate(self) -> None:
        """Check ranges and combinations.

        Raises:
            ConfigError: naming the key, its value and what is valid.
        """
        check_data_keys(self)
        resolve_report_to(self.report_to)  # an unknown or uninstalled tracker fails here
        positive = ("inner_steps", "outer_steps", "meta_batch_size", "query_size", "max_length", "rank",
                    "builtin_tasks_per_family", "builtin_examples_per_task", "eval_tasks", "keep_checkpoints", "max_nonfinite")
        for key in positive:
            value = getattr(self, key)
            minimum = 0 if key == "inner_steps" and self.algorithm == "multitask" else 1
            if value < minimum:
                raise ConfigError(f"{key}={value}: expected an integer >= {minimum}.")
        for key in ("shots", "warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: expected an integer >= 0.")
        if self.shots == 0 and self.algorithm != "multitask":
            raise ConfigError(f"shots=0 leaves nothing to adapt on; algorithm={self.algorithm} needs shots >= 1.")
        if self.query_context == "support" and self.shots == 0:
            raise ConfigError("query_context=support puts the support examples before every query, but shots=0; "
                              "set shots >= 1 or query_context=none.")
        from deltameta.config import check_finite

        check_finite(self)
        for key in ("inner_lr", "outer_lr", "controller_lr", "tau_start", "tau_end", "alpha"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}={getattr(self, key)}: expected a positive number.")
        for key in ("inner_clip", "meta_clip", "weight_decay", "budget_weight", "entropy_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: expected a number >= 0.")
        if not 0 < self.budget_target <= 1:
            raise ConfigError(f"budget_target={self.budget_target}: expected a fraction in (0, 1].")
        if not 0 <= self.val_holdout < 1:
            raise ConfigError(f"val_holdout={self.val_holdout}: expected a fraction in [0, 1).")
        if self.val_holdout_unit == "task" and self.val_holdout == 0:
            raise ConfigError("val_holdout_unit=task needs val_holdout > 0 (the fraction of every family's tasks "
                              "to validate on), e.g. val_holdout=0.125.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio}: expected a fraction in [0, 1].")
        if self.task_weights not in ("uniform", "family", "examples"):
            raise ConfigError(f"task_weights='{self.task_weights}': expected uniform, family or examples.")
        if self.gradient_checkpointing and self.algorithm not in ("fomaml", "reptile", "multitask", "none"):
            raise ConfigError(
                f"gradient_checkpointing=true needs a first-order algorithm without learned inner rates "
                f"(algorithm={self.algorithm}); use algorithm=fomaml, reptile or multitask."
            )
        if self.gradient_checkpointing and self.task_batched:
            raise ConfigError("gradient_checkpointing=true runs tasks one by one; set task_batched=false.")
        if self.first_order is False and self.algorithm in ("fomaml", "reptile", "multitask", "none"):
            raise ConfigError(f"first_order=false contradicts algorithm={self.algorithm}; use algorithm=maml or metasgd.")
        from deltameta.meta.algorithms import check_init_loss_weight

        check_init_loss_weight(self.algorithm, self.init_loss_weight)
        if self.first_order is True and self.algorithm == "maml":
            raise ConfigError("first_order=true with algorithm=maml is algorithm=fomaml; pick one.")
        if not self.output_dir:
            raise ConfigError("output_dir is empty; give a directory for the run.")
        if self.controller != "none":
            from deltameta.deltas.config import parse_op

            for op in self.ops:
                parse_op(op)

    def query_max_length(self) -> int:
        """Token limit of a query row: ``max_length``, or ``max_length * (shots + 1)`` with demonstrations."""
        from deltameta.tasks.encoding import demonstrations_max_length

        return demonstrations_max_length(self.max_length, self.shots) if self.query_context == "support" else self.max_length

    def is_first_order(self) -> bool:
        """Whether the inner loop drops second-order terms."""
        if self.algorithm == "maml":
            return False
        if self.algorithm == "metasgd":
            return self.first_order is not False
        return True

    def delta_config(self):
        """Return the :class:`~deltameta.deltas.config.DeltaConfig` these keys describe."""
        from deltameta.deltas.config import DeltaConfig

        return DeltaConfig(
            delta=self.delta,
            rank=self.rank,
            alpha=self.alpha,
            target_modules=list(self.target_modules),
            ops=list(self.ops),
            controller=self.controller,
            tau_start=self.tau_start,
            tau_end=self.tau_end,
            tau_schedule=self.tau_schedule,
            budget_target=self.budget_target,
            budget_weight=self.budget_weight,
            entropy_weight=self.entropy_weight,
        )
