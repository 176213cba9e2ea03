"""``FinetuneConfig``: every key of ``deltameta finetune`` (recipes and ``key=value``).

Keys that mean the same as in ``deltameta meta-train`` have the same names (``model``,
``quantization``, ``tasks``, ``shots``, ``max_length``, ``rank``, ``alpha``, ``target_modules``,
``warmup_steps``, ``min_lr_ratio``, ``weight_decay``, ``eval_every``, ``seed``, ``output_dir``, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from deltameta.config import BaseModelKeys, check_data_keys, columns_field, field, template_field
from deltameta.errors import ConfigError
from deltameta.reporting import report_to_field, resolve_report_to
from deltameta.finetune.common import DEFAULT_TARGETS


@dataclasses.dataclass
class FinetuneConfig(BaseModelKeys):
    """Configuration of a fine-tuning run (see ``deltameta finetune --help``)."""

    # base model: model, quantization, double_quant, compute_dtype and device come from BaseModelKeys;
    # quantization is redeclared for its own help text (it keeps its place)
    quantization: Literal["nf4", "fp4", "none"] = field("nf4", "4-bit quantization of the frozen base (nf4: QLoRA)")
    gradient_checkpointing: bool = field(False, "recompute activations in backward (less memory, ~30% slower)")
    bf16: bool = field(False, "run forward/backward under bf16 autocast (GPU; the adapter stays fp32)")

    # starting adapter
    adapter: str = field("", "start from: a meta-train run dir, an exported PEFT dir, adapters/<name> or a Hub id ('' = fresh LoRA)")
    dynamic: bool | None = field(
        None, "train a TARP meta-adapter in its own parameters (LoRA A/B, TARP Σ map, multiplicative term) on deltameta's "
        "delta model rebuilt from the export, saving last/ and best/ as deltameta exports (plain PEFT loads their static "
        "fold, deltameta.load_meta_adapter the exact model); null = true for a TARP meta-adapter with deltameta.json, "
        "false otherwise; false = train the static PEFT export as a plain LoRA")
    inner_loop_first: bool = field(
        True, "from a meta-adapter with a recorded inner loop (deltameta.json): the first steps are that inner loop "
        "(its step count, optimizer, learned rates and clip on `shots` training examples, default the recorded shots), "
        "the adaptation the adapter was meta-trained for; then `optimizer` trains for `steps`. false: `optimizer` from "
        "the start")
    query_context: Literal["none", "support"] | None = field(
        None, "what each validation prompt (loss and accuracy) carries before its input: none, or support (the task's "
        "`shots` training examples that the inner loop adapts on, as demonstrations, up to max_length * (shots + 1) "
        "tokens), as a meta-adapter trained with query_context=support answers; null = the meta-adapter's recorded "
        "query_context (none for a fresh LoRA or without a record). Training rows never carry demonstrations")
    rank: int = field(8, "fresh LoRA rank")
    alpha: float = field(16.0, "fresh LoRA alpha (scaling alpha/rank)")
    target_modules: list[str] = field(list(DEFAULT_TARGETS), "fresh LoRA sublayers")
    lora_dropout: float = field(0.0, "fresh LoRA dropout")

    # data
    tasks: str = field("builtin:linear", "the task: any source 'deltameta tasks list' reads, or a jsonl of input/output lines")
    columns: dict[str, str] = columns_field()
    template: str = template_field()
    task_names: list[str] = field([], "train only on these tasks of the source (default: all of them)")
    builtin_tasks_per_family: int = field(1, "tasks generated per built-in family")
    builtin_examples_per_task: int = field(64, "examples per built-in task")
    shots: int = field(0, "use only this many training examples per task (0: all)")
    val_fraction: float = field(0.1, "fraction of each task's examples held out for validation (0: none)")
    val_tasks: str = field("", "separate validation source (overrides val_fraction)")
    max_length: int = field(128, "maximum tokens per example")

    # optimisation
    steps: int = field(60, "optimizer steps (0: train for `epochs`)")
    epochs: float = field(1.0, "epochs over the training examples when steps=0")
    optimizer: Literal["adamw", "sgd"] = field("adamw", "optimizer of the adapter")
    lr: float = field(1e-3, "peak learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = field("cosine", "decay after warmup")
    warmup_steps: int = field(5, "linear warmup steps from lr 0 (transformers convention)")
    min_lr_ratio: float = field(0.0, "final lr as a fraction of lr (linear, cosine)")
    weight_decay: float = field(0.0, "AdamW weight decay")
    batch_size: int = field(8, "examples per micro-batch")
    gradient_accumulation: int = field(1, "micro-batches per optimizer step")
    max_grad_norm: float = field(1.0, "gradient norm clipping (0: off)")

    # validation, output
    eval_every: int = field(20, "validate every N steps (0: only at the end)")
    eval_examples: int = field(64, "validation examples scored for accuracy (0: all)")
    eval_accuracy: bool = field(True, "also score validation accuracy (multiple choice / exact match), not just loss")
    early_stopping_patience: int = field(0, "stop after this many validations without improvement (0: off)")
    early_stopping_min_delta: float = field(0.0, "smallest validation-loss decrease that counts as improvement")
    save_best: bool = field(True, "keep the adapter with the lowest validation loss in OUTPUT/best")
    checkpoint_every: int = field(20, "write a resumable checkpoint (OUTPUT/checkpoint) every N steps (0: never)")
    seed: int = field(0, "seed of data order, splits and fresh-LoRA init")
    output_dir: str = field("runs/finetune", "output directory")
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
        for key in ("rank", "batch_size", "gradient_accumulation", "max_length", "builtin_tasks_per_family",
                    "builtin_examples_per_task"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: expected an integer >= 1.")
        for key in ("steps", "shots", "warmup_steps", "eval_every", "eval_examples", "early_stopping_patience",
                    "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: expected an integer >= 0.")
        if self.steps == 0 and self.epochs <= 0:
            raise ConfigError(f"steps=0 trains for `epochs`, but epochs={self.epochs}; give steps >= 1 or epochs > 0.")
        for key in ("lr", "alpha"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}={getattr(self, key)}: expected a positive number.")
        for key in ("weight_decay", "max_grad_norm", "early_stopping_min_delta"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: expected a number >= 0.")
        for key in ("val_fraction", "lora_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: expected a fraction in [0, 1).")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio}: expected a fraction in [0, 1].")
        if self.early_stopping_patience and not (self.val_fraction or self.val_tasks):
            raise ConfigError("early_stopping_patience needs a validation split: set val_fraction > 0 or val_tasks=...")
        if self.dynamic is True and not self.adapter:
            raise ConfigError("dynamic=true keeps a meta-adapter's TARP sidecar; it needs adapter=... (a fresh LoRA has none).")
        if not self.output_dir:
            raise ConfigError("output_dir is empty; give a directory for the run.")
        if not self.target_modules:
            raise ConfigError("target_modules is empty; name at least one sublayer (e.g. [q_proj, v_proj]).")
