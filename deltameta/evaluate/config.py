"""``EvaluateConfig``: every key of ``deltameta evaluate`` (recipes and ``key=value``).

Names shared with ``deltameta meta-train`` mean the same thing there: ``shots``, ``query_size``,
``max_length``, ``inner_lr`` and ``inner_clip`` (the adaptation on the support set is the inner
loop), ``tasks``, ``splits``, ``seed``, ...
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Literal

from deltameta.config import BaseModelKeys, check_data_keys, columns_field, field, template_field
from deltameta.errors import ConfigError
from deltameta.reporting import report_to_field, resolve_report_to

#: Every method, in the order tables and plots list them.
METHODS = ("zero-shot", "icl", "fresh-lora", "multitask", "multitask-dynamic", "meta", "meta-dynamic")
#: Methods that fine-tune an adapter on the support set.
TRAINING_METHODS = ("fresh-lora", "multitask", "multitask-dynamic", "meta", "meta-dynamic")
#: Methods that need an adapter, and the key of ``adapters`` that provides it.
ADAPTER_OF = {"multitask": "multitask", "multitask-dynamic": "multitask", "meta": "meta", "meta-dynamic": "meta"}
#: Methods that adapt an adapter in its own parameters (deltameta's delta model rebuilt from the export).
DYNAMIC_METHODS = ("multitask-dynamic", "meta-dynamic")
#: Methods run only when ``methods`` names them (not by default when their adapter is given).
ON_REQUEST = ("multitask-dynamic",)


@dataclasses.dataclass
class EvaluateConfig(BaseModelKeys):
    """Configuration of a few-shot evaluation (see ``deltameta evaluate --help``)."""

    # base model: model, quantization, double_quant, compute_dtype and device come from BaseModelKeys
    bf16: bool = field(False, "run forward/backward under bf16 autocast")

    # adapters
    adapter: str = field("", "the meta-adapter (for meta and meta-dynamic): meta-train run dir, PEFT dir, adapters/<name> or Hub id")
    meta_adapter: str = field("", "same as adapter")
    multitask_adapter: str = field("", "adapter of a meta-train run with algorithm=multitask (the multitask baseline): run dir, PEFT dir or Hub id")
    adapters: dict[str, str] = field({}, "several at once: {meta: RUN_DIR, multitask: RUN_DIR}")

    # tasks and episodes
    tasks: str = field("builtin", "task source: 'builtin', 'builtin:FAMILY,...', a BIG-bench dir, a jsonl/csv file; join several with '+'")
    columns: dict[str, str] = columns_field()
    template: str = template_field()
    splits: str = field("train=0.75,validation=0.25", "a splits.json path or family ratios ('' : no split)")
    split: str = field("validation", "the held-out split to evaluate on ('' : every task of the source)")
    task_names: list[str] = field([], "evaluate only these tasks (default: all of the split)")
    max_tasks: int = field(0, "evaluate N tasks of the split, drawn spread over its families (seeded round robin; 0: all)")
    builtin_tasks_per_family: int = field(16, "tasks generated per built-in family (same as meta-train to get its split)")
    builtin_examples_per_task: int = field(64, "examples per built-in task")
    methods: list[str] = field([], f"methods to compare ({', '.join(METHODS)}); default: every one whose adapter is "
                               "given but multitask-dynamic (the multitask baseline in its own TARP parameters, as "
                               "meta-dynamic adapts the meta-adapter; name it for a TARP twin)")
    episodes: int = field(5, "episodes per task (different support/query draws)")
    shots: int | None = field(
        None, "support examples per episode (k); null = the meta-adapter's recorded shots, as its inner loop was "
        "meta-trained (4 without a meta-adapter or a record)")
    query_size: int = field(16, "query examples per episode (a task with fewer than shots + query_size examples gets the rest)")
    balanced: bool = field(False, "class-balanced support/query for multiple choice")
    max_length: int = field(256, "maximum tokens per example")
    icl_max_length: int = field(0, "maximum tokens of an ICL prompt with k demonstrations (0: max_length * (shots + 1))")
    query_context: Literal["none", "support"] | None = field(
        None, "what the query prompts of every adapted method (fresh-lora, multitask, meta) carry before their input: "
        "none, or support (the k support examples as demonstrations, up to icl_max_length tokens); null = the "
        "meta-adapter's recorded query_context (none without a record)")

    # adaptation (the same inner loop for every method that trains; null = the meta-adapter's recorded one)
    steps: list[int] = field([0, 5, 10], "score the query set after these numbers of adaptation steps "
                             "(the meta-adapter's trained inner step count is always added, unless steps=[0])")
    optimizer: Literal["sgd", "adam", "adamw"] | None = field(
        None, "adaptation optimizer; null = the meta-adapter's recorded inner optimizer (sgd without a record); "
        "adamw = adam (no weight decay)")
    inner_lr: float | None = field(
        None, "adaptation learning rate; null = the meta-adapter's recorded inner lr, with Meta-SGD's learned rates "
        "for meta and meta-dynamic (0.05 without a record); a number overrides it for every method")
    inner_clip: float | None = field(
        None, "adaptation gradient norm clipping; null = the meta-adapter's recorded inner clip (1.0 without a "
        "record); 0: off")
    rank: int = field(0, "fresh-lora rank (0: the meta-adapter's, else 8)")
    alpha: float = field(0.0, "fresh-lora alpha (0: the meta-adapter's, else 16)")
    target_modules: list[str] = field([], "fresh-lora sublayers (default: the meta-adapter's, else q,v,o,up,down)")

    # output
    seed: int = field(0, "seed of episodes, splits and fresh-LoRA init")
    batch_size: int = field(32, "rows per scoring forward")
    dequantize_cache: str = field(
        "auto", "auto|true|false: hold every frozen 4-bit layer dequantized for the whole evaluation (bitwise the "
        "same numbers as bitsandbytes' dequantize-on-every-call CPU fallback; costs the layers in their compute "
        "dtype, about 0.4 GB for smollm2-135m in float32); auto: on for CPU only")
    output_dir: str = field("runs/evaluate", "output directory")
    plots: bool = field(True, "write PNG plots")
    report_to: list[str] = report_to_field()
    progress: bool = field(True, "show a progress bar")

    def validate(self) -> None:
        """Check ranges and method names.

        Raises:
            ConfigError: naming the key, its value and what is valid (closest method suggested).
        """
        check_data_keys(self)
        resolve_report_to(self.report_to)  # an unknown or uninstalled tracker fails here
        self.methods = [m.strip() for item in self.methods for m in str(item).split(",") if m.strip()]
        for method in self.methods:
            if method not in METHODS:
                close = difflib.get_close_matches(method, METHODS, n=1, cutoff=0.4)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown method '{method}' in methods.{hint} Valid methods: {', '.join(METHODS)}.")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods={self.methods} lists a method twice.")
        for key in ("episodes", "query_size", "max_length", "batch_size", "builtin_tasks_per_family", "builtin_examples_per_task"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: expected an integer >= 1.")
        for key in ("shots", "max_tasks", "icl_max_length", "rank"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)}: expected an integer >= 0.")
        if not self.steps or any(s < 0 for s in self.steps):
            raise ConfigError(f"steps={self.steps}: expected a non-empty list of integers >= 0, e.g. [0, 5, 10].")
        self.steps = sorted(set(self.steps))
        if self.shots == 0 and max(self.steps) > 0:  # null is resolved from the meta-adapter (>= 1)
            raise ConfigError(f"shots=0 leaves nothing to adapt on, but steps={self.steps}; use steps=[0] or shots >= 1.")
        if self.inner_lr is not None and self.inner_lr <= 0:
            raise ConfigError(f"inner_lr={self.inner_lr}: expected a positive number, or null for the meta-adapter's.")
        if (self.inner_clip is not None and self.inner_clip < 0) or self.alpha < 0:
            raise ConfigError("inner_clip and alpha must be >= 0 (inner_clip: null for the meta-adapter's).")
        if self.adapter and self.meta_adapter and self.adapter != self.meta_adapter:
            raise ConfigError(f"adapter='{self.adapter}' and meta_adapter='{self.meta_adapter}' disagree; give one of them.")
        for key in self.adapters:
            if key not in ("meta", "multitask"):
                close = difflib.get_close_matches(str(key), ["meta", "multitask"], n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"adapters has an unknown key '{key}'.{hint} Keys: meta, multitask.")
        if not self.output_dir:
            raise ConfigError("output_dir is empty; give a directory for the results.")

    def adapter_paths(self) -> dict[str, str]:
        """Return ``{"meta": path, "multitask": path}`` for the adapters given (any key form).

        Raises:
            ConfigError: the same adapter given twice with different paths.
        """
        paths: dict[str, str] = {}
        for kind, value in (("meta", self.adapter or self.meta_adapter), ("multitask", self.multitask_adapter)):
            if value:
                paths[kind] = value
        for kind, value in self.adapters.items():
            if value and kind in paths and paths[kind] != value:
                raise ConfigError(f"the {kind} adapter is given twice: '{paths[kind]}' and adapters.{kind}='{value}'.")
            if value:
                paths[kind] = str(value)
        return paths

    def summary(self) -> dict[str, Any]:
        """Return the config as a plain dict."""
        return dataclasses.asdict(self)
