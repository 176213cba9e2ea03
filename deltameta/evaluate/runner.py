"""Few-shot evaluation of every method on the same episodes of held-out tasks.

One frozen base is loaded once. Every PEFT adapter (a fresh LoRA, the multitask baseline, the
meta-adapter's static export ``meta``) is attached to one ``PeftModel`` under its own name.
``meta-dynamic`` is the meta-adapter in its own parameters: deltameta's delta model (real
``DeltaLinear`` modules with LoRA ``A``/``B``, TARP's ``Σ`` map and multiplicative term) rebuilt
from the export (:func:`deltameta.deltas.rebuild.rebuild_delta_model`) on a structural copy of
the same base that shares its frozen weights. With a task-conditioned controller, meta-dynamic
chooses the structure of each episode from its support set, as meta-training does.
``multitask-dynamic`` is the multitask baseline the same way (on request: for a TARP twin, the
comparison in the meta-adapter's parametrization; ``multitask`` scores its static fold).

Every training method adapts through the one adaptation function,
:func:`deltameta.meta.functional.adapt`, starting from a copy of the method's initial tensors (so
no method sees another episode's updates), with the inner loop the meta-adapter was meta-trained
for (its ``deltameta.json``: optimizer, learning rate(s) including Meta-SGD's learned ones, clip)
unless ``optimizer``/``inner_lr``/``inner_clip`` override it; ``steps`` always includes the trained
inner step count. ``results.json`` records what each method used (``methods.<m>.inner_loop``) and
flags a mismatch with the recorded inner loop (also a warning in ``results.md``).

For each task, ``episodes`` episodes are drawn once (seeded by ``seed`` and the task name) and
every method runs on exactly those episodes, in the order task -> episode -> method. Each training
method takes the same ``max(steps)`` optimizer steps on the full k-shot support set; the query set
is scored at every step listed in ``steps``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from deltameta.atomic import atomic_write_json, atomic_write_text
from deltameta.config import config_to_yaml
from deltameta.errors import ConfigError, DataError
from deltameta.evaluate.config import ADAPTER_OF, DYNAMIC_METHODS, METHODS, ON_REQUEST, TRAINING_METHODS, EvaluateConfig
from deltameta.evaluate.report import markdown_table, preparation_parity, summarize, with_budget_warning, write_plots
from deltameta.finetune import common
from deltameta.finetune.adapters import check_base_matches, ensure_peft_dir, recorded_inner_loop, resolve_adapter
from deltameta.output_dir import prepare_output_dir, start_fresh

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
RUN_MARKERS = (RESULTS_FILE, TABLE_FILE, "run.json", "config.yaml")
#: PEFT adapter names of the methods (no dots or dashes).
PEFT_NAME = {"fresh-lora": "fresh_lora", "multitask": "multitask", "meta": "meta"}
#: The adaptation used without a recorded inner loop (and without overrides).
DEFAULT_INNER = {"optimizer": "sgd", "lr": 0.05, "clip": 1.0}
#: Support examples per episode (k) without ``shots`` and without a meta-adapter's record of them.
DEFAULT_SHOTS = 4


def recorded_shots(paths: dict[str, str]) -> int:
    """The default of ``shots=null``: the meta-adapter's recorded shots, else :data:`DEFAULT_SHOTS`.

    Args:
        paths: ``EvaluateConfig.adapter_paths()`` (the meta-adapter, if any, under ``meta``).

    Raises:
        ConfigError: the meta-adapter cannot be found (named, as the evaluation itself would).
    """
    if "meta" not in paths:
        return DEFAULT_SHOTS
    record, _ = recorded_inner_loop(resolve_adapter(paths["meta"], "meta adapter"))
    if record is None or not record.shots:
        return DEFAULT_SHOTS
    logger.info("shots=%d: the meta-adapter's recorded support size (shots=null)", record.shots)
    return int(record.shots)


def spread_over_families(tasks: list[Any], count: int, seed: int) -> list[Any]:
    """Draw ``count`` tasks spread over their families (seeded), in the tasks' order.

    The families are shuffled and so are the tasks within each family (both seeded by ``seed``);
    then one task is taken from each family in turn (round robin) until ``count`` are drawn. So
    every family gets ``count // families`` or one more task while it has tasks left, and which
    tasks those are does not depend on the order of the source.

    Args:
        tasks: The candidate tasks (with ``name`` and ``family``).
        count: How many to draw (all of them if there are not more).
        seed: The evaluation seed.

    Returns:
        The drawn tasks, in their order in ``tasks``.
    """
    import random

    from deltameta.tasks.seeding import derive_seed

    if count >= len(tasks):
        return list(tasks)
    families: dict[str, list[Any]] = {}
    for task in sorted(tasks, key=lambda t: t.name):
        families.setdefault(task.family, []).append(task)
    rng = random.Random(derive_seed(seed, "evaluate-tasks"))
    order = sorted(families)
    rng.shuffle(order)
    queues = []
    for family in order:
        members = list(families[family])
        rng.shuffle(members)
        queues.append(members)
    chosen: set[int] = set()
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.add(id(queue.pop(0)))
    return [t for t in tasks if id(t) in chosen]


def _episode_record(episode: Any) -> dict[str, Any]:
    index_of = {id(e): i for i, e in enumerate(episode.task.examples)}
    support = [index_of[id(e)] for e in episode.support]
    query = [index_of[id(e)] for e in episode.query]
    text = repr((episode.task.name, [(e.input, e.target) for e in episode.support], [(e.input, e.target) for e in episode.query]))
    return {
        "id": f"{episode.task.name}#{episode.index}",
        "index": episode.index,
        "support": support,
        "query": query,
        "fingerprint": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
    }


class Evaluator:
    """Runs one evaluation.

    Args:
        config: The resolved config.
        out: The (prepared) output directory.
        model: Optional preloaded frozen base ``(model, tokenizer)`` (it gets wrapped in a
            ``PeftModel``; do not reuse it afterwards).
    """

    def __init__(self, config: EvaluateConfig, out: Path, model: tuple[Any, Any] | None = None) -> None:
        self.config = c = config
        self.out = out
        self.warnings: list[str] = []
        paths = c.adapter_paths()
        if c.shots is None:
            c.shots = recorded_shots(paths)
        self.tasks = self._load_tasks()
        self.methods = self._choose_methods(paths)
        kinds = sorted({ADAPTER_OF[m] for m in self.methods if m in ADAPTER_OF})
        resolved = {kind: resolve_adapter(paths[kind], f"{kind} adapter") for kind in kinds}  # fail before loading
        base, self.tokenizer = model if model is not None else common.load_frozen_base(c)
        self.base = base
        self.device = common.model_device(base)
        self.autocast = bool(c.bf16)
        self.sources = {}
        for kind, source in resolved.items():
            check_base_matches(source, base, f"{kind} adapter")
            source = ensure_peft_dir(source, out / "adapters" / kind, device=str(self.device), max_length=c.max_length)
            check_base_matches(source, base, f"{kind} adapter")
            self.sources[kind] = source
        self._check_algorithms()
        self.record, self.rates = (recorded_inner_loop(self.sources["meta"]) if "meta" in self.sources else (None, None))
        if self.record is not None and self.record.steps not in c.steps and max(c.steps) > 0:
            c.steps = sorted(set(c.steps) | {self.record.steps})
            logger.info("steps=%s: added the meta-adapter's trained inner step count %d", c.steps, self.record.steps)
        self.initial: dict[str, dict[str, torch.Tensor]] = {}
        self.dynamic: dict[str, Any] = {}  # method -> its delta model (DYNAMIC_METHODS)
        from deltameta.deltas.rebuild import rebuild_delta_model

        for method in (m for m in DYNAMIC_METHODS if m in self.methods):  # before PEFT wraps the base
            source = self.sources[ADAPTER_OF[method]]  # each delta model shares the base's frozen weights
            delta = rebuild_delta_model(base, peft_dir=source.peft_dir, meta_state=source.meta_state)
            delta.model.eval()
            self.dynamic[method] = delta
            self.initial[method] = {n: p.detach().clone() for n, p in delta.params.items()}
        if self.delta is not None and self.record is None and self.delta.inner_loop is not None:
            self.record, self.rates = self.delta.inner_loop, self.delta.inner_lrs
        if c.query_context is None:
            c.query_context = self.record.query_context if self.record is not None else "none"
            if c.query_context != "none":
                logger.info("query_context=%s: the meta-adapter's recorded query prompts", c.query_context)
        self.current: str | None = None
        # Exact shortcuts (tests/test_evaluate_shared_forwards.py): the support loss at a scored step before the
        # last comes from the adaptation step's own forward, and a fresh LoRA (B = 0) scores at step 0 what the
        # frozen base scores, computed once per episode. False recomputes both (benchmarks/evaluate_speed.py).
        self.shared_forwards = True
        # The query loss of an episode rides in the scoring forward (one extra block per query, answer_loss=True of
        # score_multiple_choice, or of score_free_form's prefill where prompts are cut alike) instead of a forward of
        # its own: equal to float rounding, not bitwise (tests/test_evaluate_shared_forwards.py). Episodes that mix
        # both kinds, or whose prompts are cut differently, keep their own forward. False always computes it
        # separately (benchmarks/evaluate_speed.py).
        self.query_loss_from_scores = True
        self._base_scores: tuple[Any, dict[str, float | None]] | None = None  # (episode, zero-shot scores)
        self.model = base
        self.hooks: list = []
        self._attach_adapters()
        self.inner_loops = {m: self._inner_loop(m) for m in self.methods if m in TRAINING_METHODS}

    # ------------------------------------------------------------------------------ setup

    def _load_tasks(self) -> list[Any]:
        from deltameta.tasks import TaskCollection, load_tasks
        from deltameta.tasks.loader import data_options

        c = self.config
        loaded = load_tasks(c.tasks, splits=c.splits or None, **data_options(c))
        if isinstance(loaded, dict):
            if not c.split:
                collection = TaskCollection.merge(*loaded.values())
            elif c.split not in loaded:
                raise ConfigError(f"split='{c.split}' is not a split of tasks='{c.tasks}' with splits='{c.splits}'; "
                                  f"the splits are: {', '.join(loaded)}.")
            else:
                collection = loaded[c.split]
        else:
            if c.split and c.splits:
                raise ConfigError(f"split='{c.split}' given but splits='{c.splits}' made no split.")
            collection = loaded
        tasks = list(collection)
        if c.task_names:
            names = {t.name for t in tasks}
            missing = [n for n in c.task_names if n not in names]
            if missing:
                import difflib

                close = difflib.get_close_matches(missing[0], sorted(names), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"task_names: {missing} not among the evaluated tasks.{hint}")
            tasks = [t for t in tasks if t.name in set(c.task_names)]
        needed = c.shots + 1  # a task gets min(query_size, examples - shots) query examples
        small = [t for t in tasks if len(t) < needed]
        if small and len(small) == len(tasks):
            largest = max((len(t) for t in tasks), default=0)
            raise ConfigError(
                f"shots={c.shots} needs at least {needed} examples per task (k support + 1 query), but every task has "
                f"fewer (largest: {largest} examples); lower shots."
            )
        if small:
            self.warnings.append(f"skipped {len(small)} task(s) with fewer than shots + 1 = {needed} examples: "
                                 + ", ".join(t.name for t in small[:10]) + ("..." if len(small) > 10 else ""))
            tasks = [t for t in tasks if len(t) >= needed]
        if c.max_tasks and len(tasks) > c.max_tasks:
            tasks = spread_over_families(tasks, c.max_tasks, c.seed)
        fewer = [t for t in tasks if len(t) - c.shots < c.query_size]
        if fewer:
            self.warnings.append(
                f"{len(fewer)} task(s) have fewer than shots + query_size = {c.shots + c.query_size} examples and get "
                "fewer query examples (recorded per task as query_size): "
                + ", ".join(f"{t.name} ({len(t) - c.shots})" for t in fewer[:10]) + ("..." if len(fewer) > 10 else ""))
        if not tasks:
            raise DataError(f"tasks='{c.tasks}' (split '{c.split}') holds no task to evaluate.")
        return tasks

    def _choose_methods(self, paths: dict[str, str]) -> list[str]:
        c = self.config
        if c.methods:
            for method in c.methods:
                kind = ADAPTER_OF.get(method)
                if kind and kind not in paths:
                    key = "adapter=RUN_DIR" if kind == "meta" else "multitask_adapter=RUN_DIR"
                    raise ConfigError(f"method '{method}' needs the {kind} adapter: set {key} "
                                      f"(or adapters={{{kind}: RUN_DIR}}), or drop it from methods.")
            chosen = [m for m in METHODS if m in c.methods]
        else:
            chosen = [m for m in METHODS if (ADAPTER_OF.get(m) is None or ADAPTER_OF[m] in paths)
                      and m not in ON_REQUEST]
            skipped = [m for m in METHODS if m not in chosen and m not in ON_REQUEST]
            if skipped:
                logger.info("methods %s skipped: no adapter given for them", ", ".join(skipped))
        if max(c.steps) > 0 and c.shots == 0:
            chosen = [m for m in chosen if m not in TRAINING_METHODS]
        return chosen

    def _check_algorithms(self) -> None:
        multitask = self.sources.get("multitask")
        if multitask is not None and multitask.algorithm not in (None, "multitask"):
            self.warnings.append(f"the multitask adapter comes from algorithm={multitask.algorithm}, not the multitask baseline.")
        meta = self.sources.get("meta")
        if meta is not None and meta.algorithm == "multitask":
            self.warnings.append("the meta adapter comes from algorithm=multitask (the baseline), not a meta-learner.")
        if meta is not None and meta.algorithm == "none":
            self.warnings.append("the meta adapter comes from algorithm=none: a freshly initialised adapter, not meta-trained.")
        for warning in self.warnings:
            logger.warning(warning)

    def _fresh_lora_config(self):
        c = self.config
        rank, alpha, targets = c.rank, c.alpha, list(c.target_modules)
        reference = self.sources.get("meta") or self.sources.get("multitask")
        if reference is not None and not (rank and alpha and targets):
            import json

            adapter_cfg = json.loads((reference.peft_dir / "adapter_config.json").read_text(encoding="utf-8"))
            rank = rank or int(adapter_cfg.get("r") or 8)
            alpha = alpha or float(adapter_cfg.get("lora_alpha") or 16.0)
            if not targets:
                found = adapter_cfg.get("target_modules") or []
                targets = sorted({str(t).rsplit(".", 1)[-1] for t in found}) if isinstance(found, list) else []
        base_id = getattr(getattr(self.base, "deltameta_base", None), "base_model_name_or_path", None)
        return common.fresh_lora_config(rank or 8, alpha or 16.0, targets or list(common.DEFAULT_TARGETS), 0.0, base_id)

    def _attach_adapters(self) -> None:
        names = []
        if "fresh-lora" in self.methods:
            torch.manual_seed(self.config.seed)
            self.model = common.attach_adapter(self.model, PEFT_NAME["fresh-lora"], lora_config=self._fresh_lora_config())
            names.append("fresh-lora")
        for kind, source in self.sources.items():
            self.model = common.attach_adapter(self.model, PEFT_NAME[kind], peft_dir=source.peft_dir)
            names.append(kind)
        for method in names:
            params = common.adapter_parameters(self.model, PEFT_NAME[method])
            self.initial[PEFT_NAME[method]] = {n: p.detach().clone() for n, p in params.items()}
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------------------ episodes

    def query_size_of(self, task: Any) -> int:
        """Query examples per episode of ``task``: ``query_size``, or what the task allows after k shots."""
        return min(self.config.query_size, len(task) - self.config.shots)

    def episodes_of(self, task: Any) -> list[Any]:
        """The ``episodes`` episodes of ``task`` (the same for every method)."""
        from deltameta.tasks import EpisodeSampler, TaskCollection
        from deltameta.tasks.seeding import derive_seed

        c = self.config
        sampler = EpisodeSampler(TaskCollection([task]), c.shots, self.query_size_of(task),
                                 seed=derive_seed(c.seed, "evaluate", task.name) % (2**31), balanced=c.balanced)
        return [sampler.episode(i) for i in range(c.episodes)]

    def _score(self, episode: Any, in_context: bool, answer_loss: bool = False) -> dict[str, float | None]:
        """``evaluate_examples`` of ``episode``'s queries (``answer_loss``: also their query loss, where it rides)."""
        from deltameta.tasks import evaluate_examples

        c = self.config
        return evaluate_examples(common.logits_fn(self.model, self.autocast), self.tokenizer, episode.query,
                                 episode.task.template, self._max_length(in_context),
                                 in_context=episode.support if in_context else None,
                                 batch_size=c.batch_size, device=self.device, answer_loss=answer_loss)

    def _max_length(self, in_context: bool) -> int:
        """Token limit of a query row: ``max_length``, or ``icl_max_length`` (default ``max_length * (shots + 1)``)."""
        from deltameta.tasks.encoding import demonstrations_max_length

        c = self.config
        return (c.icl_max_length or demonstrations_max_length(c.max_length, c.shots)) if in_context else c.max_length

    @property
    def delta(self) -> Any:
        """The meta-adapter's delta model (``meta-dynamic``), or ``None`` when that method is not evaluated."""
        return self.dynamic.get("meta-dynamic")

    @property
    def queries_in_context(self) -> bool:
        """Whether the adapted methods score their queries after the support examples (``query_context=support``)."""
        return self.config.query_context == "support"

    def _without_adapter(self, fn: Callable[[], Any]) -> Any:
        context = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        with context:
            return fn()

    def _base_scores_of(self, episode: Any) -> dict[str, float | None]:
        """The frozen base's zero-shot scores of ``episode``, computed once per episode (with ``shared_forwards``)."""
        if self.shared_forwards and self._base_scores is not None and self._base_scores[0] is episode:
            return self._base_scores[1]
        scores = self._without_adapter(
            lambda: self._score(episode, in_context=False, answer_loss=self.query_loss_from_scores))
        if self.shared_forwards:
            self._base_scores = (episode, scores)
        return scores

    def _leaves_base_unchanged(self, method: str, start: dict[str, torch.Tensor]) -> bool:
        """True when ``method`` starts as a plain LoRA whose every B is zero: its outputs are the base's, exactly."""
        if method != "fresh-lora":
            return False
        peft_config = getattr(self.model, "peft_config", {}).get(PEFT_NAME[method])
        if peft_config is None or getattr(peft_config, "use_dora", False):
            return False
        kinds = [("B" if "lora_B" in n or "lora_embedding_B" in n else "A" if "lora_A" in n or "lora_embedding_A" in n
                  else None) for n in start]
        if None in kinds or "B" not in kinds:
            return False
        return all(bool((v == 0).all()) for (n, v), kind in zip(start.items(), kinds) if kind == "B")

    def _restore(self, method: str) -> None:
        """Put ``method``'s tensors back to their loaded (or initial) values; freeze the PEFT model."""
        if method in self.dynamic:
            with torch.no_grad():
                for n, p in self.dynamic[method].params.items():
                    p.copy_(self.initial[method][n])
            return
        name = PEFT_NAME.get(method, method)
        params = common.adapter_parameters(self.model, name)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.initial[name][n])
                p.grad = None
        for p in self.model.parameters():
            p.requires_grad_(False)

    def run_method(self, method: str, episode: Any) -> dict[str, Any]:
        """Run ``method`` on ``episode``: scores (and support losses) at every step of ``steps``."""
        c = self.config
        steps = c.steps
        self.current = method
        result: dict[str, Any] = {"accuracy": {}, "accuracy_norm": {}, "support_loss": {}}
        started = time.perf_counter()
        try:
            if method in ("zero-shot", "icl"):
                scores = self._base_scores_of(episode) if method == "zero-shot" else self._without_adapter(
                    lambda: self._score(episode, in_context=True))
                for s in steps:
                    result["accuracy"][str(s)] = scores["accuracy"]
                    result["accuracy_norm"][str(s)] = scores["accuracy_norm"]
                    result["support_loss"][str(s)] = None
                result["passes"] = 0
                return result
            return self._adapt_and_score(method, episode, result)
        finally:
            self.current = None
            if method in TRAINING_METHODS:
                self._restore(method)
            result["seconds"] = time.perf_counter() - started

    def _adapt_and_score(self, method: str, episode: Any, result: dict[str, Any]) -> dict[str, Any]:
        """Adapt ``method``'s tensors on the support set with :func:`functional.adapt`; score the chosen steps."""
        from deltameta.meta import functional as F
        from deltameta.tasks import encode_examples

        c = self.config
        steps = c.steps
        inner = self.inner_loops[method]
        if method in self.dynamic:
            delta = self.dynamic[method]
            model, live, controller = delta.model, delta.params, delta.controller
        else:
            model, live, controller = self.model, common.activate(self.model, PEFT_NAME[method]), None
        start = F.detached(self.initial[method if method in self.dynamic else PEFT_NAME[method]])

        def encode(examples: Any, in_context: Any = None) -> dict[str, torch.Tensor]:
            batch = encode_examples(self.tokenizer, list(examples), episode.task.template,
                                    self._max_length(in_context is not None), in_context=in_context)
            return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}

        support = encode(episode.support) if episode.support else None
        query = encode(episode.query, episode.support if self.queries_in_context and episode.support else None)
        loss_fn = F.lm_loss_fn(model, use_cache=False)
        lr = self._rates_for(method, live, inner)
        result["query_loss"] = {}
        scoring_model = self.model
        last = max(steps) if support is not None else 0
        support_losses: list[float] = []  # adapt's step k forward: the support loss at step k (k < last)
        base_at_start = self.shared_forwards and not self.queries_in_context and self._leaves_base_unchanged(method, start)

        def on_step(k: int, current: dict[str, torch.Tensor]) -> None:
            if k not in steps:
                return
            with torch.no_grad():
                for n, p in live.items():
                    p.copy_(current[n].detach())
                self.model = model  # _score uses self.model
                try:
                    if k == 0 and base_at_start:
                        scores = self._base_scores_of(episode)
                    else:
                        scores = self._score(episode, in_context=self.queries_in_context,
                                             answer_loss=self.query_loss_from_scores)
                    if support is None:
                        result["support_loss"][str(k)] = None
                    elif k < last and self.shared_forwards:
                        result["support_loss"][str(k)] = None  # from support_losses once adapt returns
                    else:
                        result["support_loss"][str(k)] = float(loss_fn(current, support))
                    query_loss = scores.get("answer_loss") if self.query_loss_from_scores else None
                    result["query_loss"][str(k)] = float(loss_fn(current, query)) if query_loss is None else query_loss
                finally:
                    self.model = scoring_model
            result["accuracy"][str(k)] = scores["accuracy"]
            result["accuracy_norm"][str(k)] = scores["accuracy_norm"]

        structure = contextlib.nullcontext()
        if controller is not None:
            from deltameta.deltas import task_embedding

            emb = None
            if controller.mode == "task":
                emb = task_embedding(model, support["input_ids"], support["attention_mask"]) if support is not None else None
            decisions = controller.decide(emb)
            result["structure"] = dict(zip(controller.candidates, decisions))
            structure = controller.apply(model, controller.decision_weights(decisions).to(self.device))
        with structure, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if support is None or max(steps) == 0:
                on_step(0, start)
            else:
                F.adapt(start, support, loss_fn, steps=last, lr=lr, first_order=True, clip=inner["clip"] or None,
                        losses=support_losses, on_step=on_step, skip_nonfinite=True, **self._optimizer_kwargs(inner))
                if self.shared_forwards:
                    for k in steps:
                        if k < last:
                            result["support_loss"][str(k)] = support_losses[k]
        result["passes"] = max(steps) if support is not None else 0
        return result

    def _rates_for(self, method: str, live: dict[str, torch.Tensor], inner: dict[str, Any]):
        """The learning rate(s) of ``method``: one number, or the learned rates keyed like ``live``."""
        if not inner.get("learned_rates"):
            return float(inner["lr"])
        if method == "meta-dynamic":
            return {n: (self.rates[n].to(p.device, p.dtype) if n in self.rates else torch.tensor(float(inner["lr"])))
                    for n, p in live.items()}
        from deltameta.deltas.inner_loop import rates_for_peft

        return rates_for_peft(self.rates, live, PEFT_NAME[method], float(inner["lr"]))

    @staticmethod
    def _optimizer_kwargs(inner: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"optimizer": inner["optimizer"]}
        if inner["optimizer"] == "adam":
            out.update(betas=tuple(inner["betas"]), eps=float(inner["eps"]))
        return out

    def _inner_loop(self, method: str) -> dict[str, Any]:
        """The inner loop ``method`` adapts with, and where it differs from the meta-adapter's record."""
        c, record = self.config, self.record
        optimizer = c.optimizer or (record.optimizer if record is not None else DEFAULT_INNER["optimizer"])
        optimizer = "adam" if optimizer == "adamw" else optimizer
        lr = c.inner_lr if c.inner_lr is not None else (record.lr if record is not None else DEFAULT_INNER["lr"])
        clip = c.inner_clip if c.inner_clip is not None else (
            (record.clip or 0.0) if record is not None else DEFAULT_INNER["clip"])
        learned = bool(method in ("meta", "meta-dynamic") and c.inner_lr is None and self.rates)
        used: dict[str, Any] = {"optimizer": optimizer, "lr": lr, "learned_rates": learned, "clip": clip,
                                "steps": list(c.steps), "first_order": True, "query_context": c.query_context,
                                "parameters": ("delta model: LoRA A/B, TARP Σ map, multiplicative term"
                                               if method in DYNAMIC_METHODS else "PEFT LoRA A/B"),
                                "source": "recorded" if record is not None else "defaults (no recorded inner loop)"}
        if optimizer == "adam":
            used["betas"] = list(record.betas) if record is not None and record.betas else [0.9, 0.999]
            used["eps"] = record.eps if record is not None and record.eps is not None else 1e-8
        mismatch: list[str] = []
        if record is not None and method in ("meta", "meta-dynamic"):
            if optimizer != record.optimizer:
                mismatch.append(f"optimizer {optimizer} (trained with {record.optimizer})")
            if record.learned_rates and not learned:
                mismatch.append(f"fixed lr {lr:g} instead of the learned Meta-SGD rates")
            elif not record.learned_rates and abs(lr - record.lr) > 1e-12:
                mismatch.append(f"lr {lr:g} (trained with {record.lr:g})")
            if abs(clip - (record.clip or 0.0)) > 1e-12:
                mismatch.append(f"clip {clip:g} (trained with {record.clip or 0:g})")
            if record.shots is not None and c.shots != record.shots:
                mismatch.append(f"shots {c.shots} (trained with {record.shots})")
            if c.query_context != record.query_context:
                mismatch.append(f"query_context {c.query_context} (trained with {record.query_context})")
        used["recorded"] = record.to_dict() if record is not None and method in ("meta", "meta-dynamic") else None
        used["mismatch"] = mismatch
        if mismatch:
            self.warnings.append(f"{method} adapts with an inner loop other than the one the meta-adapter was trained for: "
                                 + "; ".join(mismatch) + ".")
        return used

    # ------------------------------------------------------------------------------ run

    def _method_info(self) -> dict[str, Any]:
        info = {}
        for method in self.methods:
            entry: dict[str, Any] = {"trains": method in TRAINING_METHODS}
            kind = ADAPTER_OF.get(method)
            if kind:
                entry["adapter"] = self.sources[kind].to_dict()
                entry["dynamic"] = method in DYNAMIC_METHODS
            if method in self.dynamic:
                delta = self.dynamic[method]
                entry["delta_model"] = {"source": delta.source, "tensors": len(delta.params),
                                        "controller": delta.controller.mode if delta.controller else None,
                                        "structure": ("per episode, from its support set"
                                                      if delta.controller is not None and delta.controller.mode == "task"
                                                      else "fixed")}
                if delta.controller is not None:  # the order of each task's "structures" lists
                    entry["delta_model"]["candidates"] = list(delta.controller.candidates)
            if method in self.inner_loops:
                entry["inner_loop"] = self.inner_loops[method]
            if method == "fresh-lora":
                cfg = self._fresh_lora_config()
                entry["lora"] = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}
            info[method] = entry
        return info

    def _budget(self) -> dict[str, Any]:
        c = self.config
        preparation = {}
        for method in self.methods:
            if method == "fresh-lora":
                preparation[method] = {"forward_backward_passes": 0, "tokens": 0}
            elif method in ADAPTER_OF:
                preparation[method] = dict(self.sources[ADAPTER_OF[method]].preparation)
        parity = preparation_parity(preparation)
        self.warnings = with_budget_warning(self.warnings, parity)
        reference = next((self.inner_loops[m] for m in ("meta", "meta-dynamic", "multitask", "multitask-dynamic", "fresh-lora")
                          if m in self.inner_loops), None) or {**DEFAULT_INNER, "learned_rates": False}
        lr = "learned Meta-SGD rates" if reference.get("learned_rates") else reference["lr"]
        return {
            "adaptation": {"steps": list(c.steps), "max_steps": max(c.steps), "optimizer": reference["optimizer"],
                           "lr": lr, "clip": reference["clip"], "batch": "the full k-shot support set",
                           "trained_inner_steps": self.record.steps if self.record is not None else None,
                           "forward_backward_passes_per_episode": max(c.steps)},
            "preparation": preparation,
            "parity": parity,
        }

    def dequantize_cache(self) -> contextlib.AbstractContextManager[int]:
        """The config's :func:`~deltameta.dequantize_cache.dequantized_weights` over every model evaluated."""
        from deltameta.dequantize_cache import cache_enabled, dequantized_weights

        models = torch.nn.ModuleList([self.model] + [delta.model for delta in self.dynamic.values()])
        return dequantized_weights(models, cache_enabled(self.config.dequantize_cache, self.device))

    def run(self) -> dict[str, Any]:
        """Evaluate every method on every episode; write ``results.json``, the table and the plots."""
        with self.dequantize_cache() as held:
            results = self._run(held)
        return results

    def _run(self, cache_bytes: int) -> dict[str, Any]:
        c = self.config
        from tqdm.auto import tqdm

        results: dict[str, Any] = {
            "config": c.summary(),
            "steps": list(c.steps),
            "methods": self._method_info(),
            "budget": {**self._budget(), "dequantize_cache": {
                "setting": str(c.dequantize_cache), "enabled": cache_bytes > 0, "bytes": cache_bytes}},
            "tasks": {},
            "timing": {},
        }
        total = len(self.tasks) * c.episodes * len(self.methods)
        bar = tqdm(total=total, desc="evaluate", unit="run", disable=not c.progress, dynamic_ncols=True)
        seconds = {m: 0.0 for m in self.methods}
        started = time.perf_counter()
        try:
            for task in self.tasks:
                episodes = self.episodes_of(task)
                records = [_episode_record(e) for e in episodes]
                entry = {"family": task.family, "kind": "multiple_choice" if task.is_multiple_choice else "free_form",
                         "num_examples": len(task), "query_size": self.query_size_of(task), "episodes": records,
                         "methods": {}}
                for method in self.methods:
                    entry["methods"][method] = {"episodes": [], "accuracy": {str(s): [] for s in c.steps},
                                                "accuracy_norm": {str(s): [] for s in c.steps},
                                                "support_loss": {str(s): [] for s in c.steps},
                                                "query_loss": {str(s): [] for s in c.steps}, "passes": []}
                for episode, record in zip(episodes, records):
                    for method in self.methods:
                        outcome = self.run_method(method, episode)
                        slot = entry["methods"][method]
                        slot["episodes"].append(record["id"])
                        slot["passes"].append(outcome["passes"])
                        for key in ("accuracy", "accuracy_norm", "support_loss", "query_loss"):
                            for s in c.steps:
                                slot[key][str(s)].append(outcome.get(key, {}).get(str(s)))
                        if "structure" in outcome:  # a controller's per-episode choice, in its candidates' order
                            slot.setdefault("structures", []).append(list(outcome["structure"].values()))
                        seconds[method] += outcome["seconds"]
                        bar.update(1)
                for method in self.methods:
                    slot = entry["methods"][method]
                    slot["mean"] = {s: sum(v) / len(v) for s, v in slot["accuracy"].items()}
                results["tasks"][task.name] = entry
        finally:
            bar.close()
            for handle in self.hooks:
                handle.remove()
        n_episodes = len(self.tasks) * c.episodes
        results["timing"] = {
            "seconds": time.perf_counter() - started,
            "per_method_seconds": seconds,
            "per_episode_seconds": {m: s / max(n_episodes, 1) for m, s in seconds.items()},
            "device": str(self.device),
            "threads": torch.get_num_threads(),
        }
        results["warnings"] = self.warnings
        results["summary"] = summarize(results)
        atomic_write_json(self.out / RESULTS_FILE, results)
        atomic_write_text(self.out / TABLE_FILE, markdown_table(results))
        if c.plots:
            write_plots(self.out, results)
        return results


def run_evaluate(config: EvaluateConfig, overwrite: bool = False, model: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Run a few-shot evaluation (the Python form of ``deltameta evaluate``).

    Args:
        config: The resolved config.
        overwrite: Replace previous results in ``output_dir``.
        model: Optional preloaded frozen base ``(model, tokenizer)``.

    Returns:
        The ``results.json`` content.

    Raises:
        ConfigError: bad keys or methods, an occupied output directory, k larger than every task.
        DataError: the task source cannot be read.
        ModelLoadError, MetaStateError: an adapter is missing, unfinished or made for another base.
    """
    import shutil

    existed = Path(config.output_dir).expanduser().exists()
    out = prepare_output_dir(config.output_dir, RUN_MARKERS, overwrite, "evaluate")
    try:
        evaluator = Evaluator(config, out, model)
    except BaseException:
        if not existed:  # remove only the folder made here, never previous results
            shutil.rmtree(out, ignore_errors=True)
        raise
    start_fresh(out, RUN_MARKERS, keep=("adapters",))  # replace previous results only now, after all checks
    atomic_write_text(out / "config.yaml", config_to_yaml(config))
    from deltameta.base import base_record

    base = base_record(evaluator.base)  # the exact weights (file names and sha256)
    atomic_write_json(out / "run.json", {"status": "running", "methods": evaluator.methods,
                                         "tasks": [t.name for t in evaluator.tasks], "base": base})
    try:
        results = evaluator.run()
    except BaseException as error:
        atomic_write_json(out / "run.json", {"status": "failed", "error": f"{type(error).__name__}: {error}"})
        raise
    atomic_write_json(out / "run.json", {"status": "finished", "methods": evaluator.methods,
                                         "tasks": [t.name for t in evaluator.tasks], "seconds": results["timing"]["seconds"],
                                         "base": base})
    report_results(config, out, results)
    return results


def report_results(config: EvaluateConfig, out: Path, results: dict[str, Any]) -> None:
    """Send the summary to the ``report_to`` trackers: ``METHOD/accuracy`` (and its CI) per adaptation step."""
    from deltameta.config import config_to_dict
    from deltameta.reporting import Reporter

    reporter = Reporter(config.report_to, out, config_to_dict(config), "evaluate")
    try:
        summary = results["summary"]["methods"]
        for step in results["steps"]:  # one call per step: wandb needs increasing steps
            scalars = {}
            for method, by_step in summary.items():
                stats = by_step[str(step)]
                scalars.update({f"{method}/accuracy": stats["mean"], f"{method}/accuracy_ci95": stats["ci95"]})
            reporter.log_scalars(scalars, int(step))
    finally:
        reporter.close()


def load_results(path: str | Path) -> dict[str, Any]:
    """The ``results.json`` of a finished evaluation.

    Args:
        path: The evaluation's output dir, or its ``results.json``.

    Raises:
        ConfigError: no such file, or not the results of a ``deltameta evaluate`` run.
    """
    import json

    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"'{path}' holds no {RESULTS_FILE}; pass the output dir of a finished evaluation.")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"'{file}' is not a JSON file ({error}).") from None
    missing = [k for k in ("steps", "methods", "tasks") if not isinstance(results, dict) or k not in results]
    if missing or not all(isinstance(e, dict) and "episodes" in e and "methods" in e for e in results["tasks"].values()):
        raise ConfigError(f"'{file}' is not the results.json of a `deltameta evaluate` run "
                          f"(missing {missing or 'tasks.*.episodes/methods'}).")
    return results


def merge_evaluations(directories: list[str], output_dir: str, overwrite: bool = False) -> dict[str, Any]:
    """Merge evaluations of different methods on the same episodes (``deltameta evaluate --merge``).

    Args:
        directories: Output dirs of finished evaluations, each with a disjoint set of methods.
        output_dir: Where the merged ``results.json``, table and plots go.
        overwrite: Replace previous results in ``output_dir``.

    Returns:
        The merged ``results.json`` content.

    Raises:
        ConfigError: a directory holds no finished evaluation, or the parts do not fit together.
    """
    from deltameta.evaluate.report import merge_results

    results = merge_results([load_results(directory) for directory in directories])
    out = start_fresh(prepare_output_dir(output_dir, RUN_MARKERS, overwrite, "evaluate"), RUN_MARKERS)
    atomic_write_json(out / RESULTS_FILE, results)
    atomic_write_text(out / TABLE_FILE, markdown_table(results))
    write_plots(out, results)
    atomic_write_json(out / "run.json", {"status": "finished", "merged_from": [str(d) for d in directories],
                                         "methods": list(results["methods"]), "tasks": list(results["tasks"])})
    return results
