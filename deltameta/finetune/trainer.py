"""Fine-tuning an adapter on a user's task: standard PEFT training on a frozen (4-bit) base.

:func:`run_finetune` loads the base, starts from a meta-adapter (``PeftModel.from_pretrained(...,
is_trainable=True)``) or a fresh LoRA (``get_peft_model``), trains with AdamW/SGD, warmup and a
decay schedule, gradient accumulation, optional gradient checkpointing and bf16 autocast, validates
every N steps (loss and accuracy) with early stopping, and writes::

    OUTPUT/run.json        status, counts, losses, which adapter to use
    OUTPUT/config.yaml     the resolved config
    OUTPUT/metrics.jsonl   one row per step and per validation (also sent to the report_to trackers)
    OUTPUT/plots/*.png     loss and accuracy curves
    OUTPUT/last/           the PEFT adapter after the last step
    OUTPUT/best/           the PEFT adapter with the lowest validation loss (with validation)
    OUTPUT/checkpoint/     the newest resumable state (every ``checkpoint_every`` steps): the adapter,
                           optimizer, scheduler, data order, random generators and counters, in
                           safetensors + JSON (no pickle); ``deltameta finetune --resume OUTPUT``
                           continues from it exactly as the uninterrupted run would have gone on

Both adapter directories load with plain ``PeftModel.from_pretrained``.

From a meta-adapter with a recorded inner loop (``deltameta.json``), the first steps are that inner
loop (``inner_loop_first``, default on): the adapter's trained number of steps with its optimizer,
learning rates (Meta-SGD's learned ones included) and clip, on ``shots`` training examples (the
recorded shots when ``shots=0``), through :func:`deltameta.meta.functional.adapt` like meta-training;
then the configured optimizer continues. A TARP meta-adapter is trained in its own parameters
(``dynamic``, default on for one): deltameta's delta model is rebuilt from the export (with a
task-conditioned controller, the structure is chosen from the training examples' task embedding)
and ``last/``/``best/`` are written as deltameta exports. A meta-adapter meta-trained with
``query_context=support`` answers queries after the support examples as demonstrations, so its
validation prompts (loss and accuracy) carry the task's support examples by default
(``query_context``); training rows never do, as the inner loop's support rows do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltameta.atomic import append_line, atomic_directory, atomic_write_json, atomic_write_text, dumps_json
from deltameta.config import config_to_dict, config_to_yaml
from deltameta.finetune import common
from deltameta.finetune.adapters import SIDECAR_FILES, check_base_matches, ensure_peft_dir, resolve_adapter
from deltameta.finetune.config import FinetuneConfig
from deltameta.finetune.data import encode_items, group_by_task, load_finetune_data
from deltameta.output_dir import prepare_output_dir, start_fresh
from deltameta.reporting import Reporter
from deltameta.schedule import make_scheduler
from deltameta.tasks.encoding import collate_rows, demonstrations_max_length

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
RUN_MARKERS = ("run.json", "metrics.jsonl", "last", "best", "checkpoint")
CHECKPOINT = "checkpoint"


@dataclasses.dataclass
class FinetuneResult:
    """What a finished fine-tuning run reports.

    Attributes:
        output_dir: The run directory.
        adapter_dir: The adapter to use (``best/`` when validation ran, else ``last/``).
        steps: Optimizer steps done.
        stopped_early: Whether early stopping ended the run.
        train_loss_before: Loss on (up to ``eval_examples``) training examples before training.
        train_loss_after: The same after training.
        best_val_loss: Lowest validation loss, or ``None`` without validation.
        seconds: Wall-clock time of the training loop.
    """

    output_dir: Path
    adapter_dir: Path
    steps: int
    stopped_early: bool
    train_loss_before: float
    train_loss_after: float
    best_val_loss: float | None
    seconds: float


def make_optimizer(params: list[nn.Parameter], optimizer: str, lr: float, weight_decay: float = 0.0):
    """AdamW or plain SGD over ``params``."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class _Trainer:
    def __init__(self, config: FinetuneConfig, out: Path, model: tuple[nn.Module, Any] | None,
                 resume: bool = False) -> None:
        self.config = c = config
        self.out = out
        self.resume_state = read_checkpoint(out) if resume else None  # fail before loading the base
        torch.manual_seed(c.seed)
        self.data = load_finetune_data(c)
        source = resolve_adapter(c.adapter, "adapter") if c.adapter else None  # fail before loading the base
        base, self.tokenizer = model if model is not None else common.load_frozen_base(c)
        self.device = common.model_device(base)
        from deltameta.base import base_record

        self.base_record = base_record(base)  # the exact weights, recorded in run.json
        self.autocast = bool(c.bf16)
        self.source = None
        self.record = self.rates = self.delta = self.embedding = None
        self.export_meta = None
        legacy_dynamic = False
        if source is not None:
            from deltameta.deltas.inner_loop import read_export_record
            from deltameta.finetune.adapters import recorded_inner_loop

            check_base_matches(source, base)
            start = out / "start_adapter"
            if resume and source.peft_dir is None and (start / "adapter_config.json").is_file():  # exported before
                source = dataclasses.replace(source, peft_dir=start,
                                             has_sidecar=all((start / f).is_file() for f in SIDECAR_FILES))
            source = ensure_peft_dir(source, start, device=str(self.device), max_length=c.max_length)
            check_base_matches(source, base)
            self.source = source
            self.record, self.rates = recorded_inner_loop(source)
            self.export_meta = read_export_record(source.peft_dir)
            dynamic = c.dynamic if c.dynamic is not None else _is_tarp_export(self.export_meta)
            if dynamic and self.export_meta is None:
                if source.has_sidecar:
                    legacy_dynamic = True
                    logger.warning("dynamic=true: %s is an export without deltameta.json (older deltameta); its TARP "
                                   "sidecar is kept frozen and only the static LoRA is trained. Re-export the run to "
                                   "train TARP in its own parameters.", source.given)
                else:
                    logger.warning("dynamic=true but %s has no TARP sidecar; training the static adapter only", source.given)
                dynamic = False
            if dynamic:
                from deltameta.deltas.rebuild import rebuild_delta_model

                self.delta = rebuild_delta_model(base, peft_dir=source.peft_dir, share=False)
                self.model = self.delta.model
            else:
                self.model = common.attach_adapter(base, ADAPTER_NAME, peft_dir=source.peft_dir)
        else:
            base_id = getattr(getattr(base, "deltameta_base", None), "base_model_name_or_path", None)
            lora = common.fresh_lora_config(c.rank, c.alpha, c.target_modules, c.lora_dropout, base_id)
            torch.manual_seed(c.seed)
            try:
                self.model = common.attach_adapter(base, ADAPTER_NAME, lora_config=lora)
            except ValueError as error:
                from deltameta.errors import ConfigError

                raise ConfigError(f"target_modules={c.target_modules}: {error}") from None
        self.hooks = []
        if legacy_dynamic:
            from deltameta.finetune.dynamic import attach_dynamic

            self.hooks = attach_dynamic(self.model, self.source.peft_dir)
        self._structure = contextlib.ExitStack()
        if self.delta is not None:
            self.params = self.delta.params
            self._choose_structure()
        else:
            self.params = common.activate(self.model, ADAPTER_NAME)
        if c.gradient_checkpointing:
            inner = self.model.base_model.model if self.delta is None else self.model
            if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x name
                inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.pad = int(pad)
        self.train_rows = encode_items(self.tokenizer, self.data.train, c.max_length)
        per_step = c.batch_size * c.gradient_accumulation
        self.total = c.steps or max(1, math.ceil(c.epochs * len(self.train_rows) / per_step))
        self.optimizer = make_optimizer(list(self.params.values()), c.optimizer, c.lr, c.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, c.lr_schedule, c.warmup_steps, self.total, c.min_lr_ratio)
        self.generator = torch.Generator().manual_seed(c.seed)
        self.order: list[int] = []
        self.epoch = 0
        limit = c.eval_examples or None
        self.val_items = self.data.validation[:limit] if limit else self.data.validation
        self.query_context = self._query_context()
        self.demonstrations = self._demonstrations() if self.query_context == "support" else None
        self.val_max_length = (demonstrations_max_length(c.max_length, self._support_shots()) if self.demonstrations
                               else c.max_length)
        self.val_rows = (encode_items(self.tokenizer, self.val_items, self.val_max_length, self.demonstrations)
                         if self.val_items else [])
        probe = torch.randperm(len(self.train_rows), generator=torch.Generator().manual_seed(c.seed + 1)).tolist()
        self.train_probe = [self.train_rows[i] for i in probe[: (limit or len(probe))]]
        self.metrics_path = out / "metrics.jsonl"

    # -------------------------------------------------------------------------- pieces

    def _support_shots(self) -> int:
        """How many training examples the inner loop sees: ``shots``, else the recorded shots, else 4."""
        return self.config.shots or (self.record.shots if self.record is not None and self.record.shots else 0) or 4

    def _support_order(self) -> list[int]:
        """The seeded order of the training items from which support examples and demonstrations are taken."""
        return torch.randperm(len(self.data.train), generator=torch.Generator().manual_seed(self.config.seed + 2)).tolist()

    def _support_items(self) -> list[Any]:
        """The training examples the recorded inner loop (and the controller) sees: ``shots`` of them, seeded."""
        return [self.data.train[i] for i in self._support_order()[: self._support_shots()]]

    def _query_context(self) -> str:
        """``query_context`` of the validation prompts: the config's, else the meta-adapter's recorded one, else none.

        An override of a recorded value is logged as a warning: validation then measures another use of
        the adapter than the one it was meta-trained for.
        """
        recorded = self.record.query_context if self.record is not None else None
        chosen = self.config.query_context or recorded or "none"
        if recorded is not None and chosen != recorded:
            logger.warning("query_context=%s: %s was meta-trained to answer after query_context=%s; validation "
                           "measures another use of the adapter than the one it was trained for",
                           chosen, self.source.given, recorded)
        return chosen

    def _demonstrations(self) -> dict[str, list[Any]]:
        """Each task's demonstrations under ``query_context=support``: its first ``shots`` training examples.

        Taken in the inner loop's seeded order, so with one task they are exactly the support examples
        the inner loop adapts on (:meth:`_support_items`), as in a meta-training episode, whose queries
        follow the support examples its inner loop adapted on.

        Raises:
            ConfigError: a validation task has no training example to show.
        """
        shots = self._support_shots()
        demos: dict[str, list[Any]] = {}
        for index in self._support_order():
            item = self.data.train[index]
            chosen = demos.setdefault(item.task.name, [])
            if len(chosen) < shots:
                chosen.append(item.example)
        missing = sorted({item.task.name for item in self.val_items} - set(demos))
        if missing:
            from deltameta.errors import ConfigError

            raise ConfigError(
                f"query_context=support puts a validation task's training examples before its prompts, but validation "
                f"task(s) {missing[:5]} (val_tasks='{self.config.val_tasks}') have no training example; set "
                "query_context=none or train on those tasks too.")
        return demos

    def _support_batch(self) -> dict[str, torch.Tensor]:
        rows = encode_items(self.tokenizer, self._support_items(), self.config.max_length)
        return {k: v.to(self.device) for k, v in collate_rows(rows, self.pad).items()}

    def _choose_structure(self) -> None:
        """Fix the controller's structure for the run: from the support examples' task embedding (``task``)."""
        controller = self.delta.controller
        if controller is None:
            return
        from deltameta.deltas import task_embedding

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.pad = int(pad)
        if controller.mode == "task":
            batch = self._support_batch()
            self.embedding = task_embedding(self.model, batch["input_ids"], batch["attention_mask"])
        decisions = controller.decide(self.embedding)
        self.structure = dict(zip(controller.candidates, decisions))
        self._structure.enter_context(controller.apply(self.model, controller.decision_weights(decisions).to(self.device)))

    def _inner_loop_first(self) -> dict[str, Any] | None:
        """Run the recorded inner loop on the support examples (the one adaptation function); return its log row."""
        record = self.record
        if not self.config.inner_loop_first or record is None or record.steps < 1:
            return None
        from deltameta.meta import functional as F

        batch = self._support_batch()
        if self.rates:
            if self.delta is not None:
                lr = {n: self.rates[n].to(p.device, p.dtype) if n in self.rates else torch.tensor(record.lr)
                      for n, p in self.params.items()}
            else:
                from deltameta.deltas.inner_loop import rates_for_peft

                lr = rates_for_peft(self.rates, self.params, ADAPTER_NAME, record.lr)
        else:
            lr = record.lr
        losses: list[float] = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            fast = F.adapt(F.detached(self.params), batch, F.lm_loss_fn(self.model, use_cache=False), steps=record.steps,
                           lr=lr, first_order=True, clip=record.clip, losses=losses, skip_nonfinite=True,
                           **record.optimizer_kwargs())
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(fast[name].detach())
        return {"kind": "inner_loop", "step": 0, "inner_steps": record.steps, "support_losses": losses,
                "optimizer": record.optimizer, "lr": "learned" if self.rates else record.lr, "clip": record.clip,
                "examples": int(batch["input_ids"].shape[0]), "query_context": record.query_context}

    def _next_rows(self) -> list[tuple[list[int], list[int]]]:
        rows = []
        for _ in range(self.config.batch_size):
            if not self.order:
                self.order = torch.randperm(len(self.train_rows), generator=self.generator).tolist()
                self.epoch += 1
            rows.append(self.train_rows[self.order.pop()])
        return rows

    def _mean_loss(self, rows) -> float:
        if not rows:
            return float("nan")
        was_training = self.model.training
        self.model.eval()
        total = weight = 0.0
        with torch.no_grad():
            for start in range(0, len(rows), self.config.batch_size):
                batch = collate_rows(rows[start : start + self.config.batch_size], self.pad)
                count = float((batch["labels"][:, 1:] != -100).sum())
                total += float(common.batch_loss(self.model, batch, self.device, self.autocast)) * count
                weight += count
        self.model.train(was_training)
        return total / max(weight, 1.0)

    def _accuracy(self) -> float | None:
        if not self.config.eval_accuracy or not self.val_items:
            return None
        from deltameta.tasks import evaluate_examples

        self.model.eval()
        hits = count = 0.0
        for task, examples in group_by_task(self.val_items):
            result = evaluate_examples(common.logits_fn(self.model, self.autocast), self.tokenizer, examples,
                                       task.template, self.val_max_length,
                                       in_context=(self.demonstrations or {}).get(task.name), device=self.device)
            hits += result["accuracy"] * result["count"]
            count += result["count"]
        return hits / max(count, 1.0)

    def _log(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        append_line(self.metrics_path, dumps_json(clean))
        self.rows.append(clean)
        self.reporter.log(clean)

    def _save(self, name: str) -> Path:
        target = self.out / name
        if self.delta is not None:
            return self._save_export(target)
        with atomic_directory(target) as tmp:
            self.model.save_pretrained(str(tmp), selected_adapters=[ADAPTER_NAME], save_embedding_layers=False)
            if self.hooks and self.source is not None:
                for file in SIDECAR_FILES:
                    shutil.copy2(self.source.peft_dir / file, tmp / file)
            (tmp / "README.md").write_text(self._card(name), encoding="utf-8")
        return target

    def _save_export(self, target: Path) -> Path:
        """Write the trained delta model as a deltameta export (PEFT static fold + sidecar + deltameta.json)."""
        from deltameta.deltas.config import DeltaConfig
        from deltameta.deltas.export import export_peft
        from deltameta.deltas.state import MetaState

        meta = self.export_meta
        controller = self.delta.controller
        state = MetaState(
            path=target, delta_config=DeltaConfig.from_dict(meta["delta_config"]),
            deltas={n: p.detach() for n, p in self.params.items()}, base=dict(meta.get("base") or {}),
            extra={"finetuned_from": self.source.given, "finetune": {"tasks": self.config.tasks, "steps": self.step}},
            controller_state=controller.state_dict() if controller is not None else None,
            controller_meta=controller.metadata() if controller is not None else None,
            inner_loop=self.record, inner_lrs=self.rates)
        examples = [(item.example.input, item.example.target) for item in self._support_items()
                    if isinstance(getattr(item.example, "target", None), str)]
        was_training = self.model.training
        self.model.eval()
        try:
            export_peft(state, target, task_examples=[{"input": i, "output": o} for i, o in examples] or None,
                        built=(self.model, self.tokenizer, controller), structure_embedding=self.embedding,
                        max_length=self.config.max_length, overwrite=True)
        finally:
            self.model.train(was_training)
        return target

    def _card(self, name: str) -> str:
        from deltameta.cards import eval_result, hub_dataset_ids, render_card
        from deltameta.deltas.export import _weights_lines

        c = self.config
        base = getattr(self.model.base_model.model, "deltameta_base", None)
        start = f"`{self.source.given}`" if self.source else f"a fresh LoRA (rank {c.rank}, alpha {c.alpha})"
        lines = [
            f"- started from: {start}",
            f"- trained on: `{c.tasks}` ({len(self.data.train)} examples, {len(self.data.validation)} held out)",
            f"- base model: `{base.base_model_name_or_path if base else 'unknown'}`; quantization during training: `{c.quantization}`",
            *_weights_lines(base.weights if base else None),
            f"- steps: {self.step} of {self.total}, lr {c.lr} ({c.lr_schedule}), batch {c.batch_size} x {c.gradient_accumulation}",
        ]
        if self.query_context == "support":
            lines.append(f"- validated with the task's {self._support_shots()} support examples as in-context "
                         "demonstrations before each prompt (`query_context=support`)")
        if self.hooks:
            lines.append("- carries TARP's dynamic sidecar: load with `deltameta.load_meta_adapter(base, DIR)` for the exact model")
        lines += ["", "```python", "from peft import PeftModel", 'model = PeftModel.from_pretrained(base, "DIR")', "```", ""]
        validations = [r for r in getattr(self, "rows", []) if r.get("kind") == "validation"]
        results = []
        if validations:
            best = min(validations, key=lambda r: r["val_loss"]) if name == "best" else validations[-1]
            results = [eval_result("validation loss", best.get("val_loss"), c.tasks, "validation"),
                       eval_result("validation accuracy", best.get("val_accuracy"), c.tasks, "validation", "accuracy")]
        return render_card(
            title=f"deltameta fine-tuned adapter ({name})",
            body="\n".join(lines),
            base_model=base.base_model_name_or_path if base else None,
            tags=["finetune"],
            datasets=hub_dataset_ids(c.tasks),
            eval_results=results,
            weights=base.weights if base else None,
        )

    def _save_checkpoint(self, best: float | None, bad: int, before: float) -> Path:
        """Write the resumable state atomically into ``OUTPUT/checkpoint`` (replacing the previous one)."""
        from deltameta.atomic import atomic_directory
        from deltameta.state_files import save_state

        state = {
            "params": {name: p for name, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "counters": {"step": self.step, "epoch": self.epoch, "order": list(self.order), "best": best,
                         "bad": bad, "train_loss_before": before, "total": self.total},
        }
        with atomic_directory(self.out / CHECKPOINT) as tmp:
            save_state(tmp, "trainer_state", state)
        return self.out / CHECKPOINT

    def _restore(self, state: dict[str, Any]) -> tuple[float | None, int, float]:
        """Load :meth:`_save_checkpoint`'s state; return ``(best, bad, train_loss_before)``."""
        from deltameta.errors import ConfigError

        counters = state["counters"]
        if int(counters["total"]) != self.total or set(state["params"]) != set(self.params):
            raise ConfigError(f"--resume {self.out}: the checkpoint does not fit this run (total steps "
                              f"{counters['total']} vs {self.total}, or other adapter tensors); was config.yaml edited?")
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.epoch = int(counters["step"]), int(counters["epoch"])
        self.order = [int(i) for i in counters["order"]]
        return counters["best"], int(counters["bad"]), float(counters["train_loss_before"])

    def _validate(self) -> dict[str, Any]:
        row = {"kind": "validation", "step": self.step, "val_loss": self._mean_loss(self.val_rows)}
        accuracy = self._accuracy()
        if accuracy is not None:
            row["val_accuracy"] = accuracy
        self._log(row)
        return row

    # -------------------------------------------------------------------------- loop

    def train(self) -> FinetuneResult:
        c = self.config
        self.rows: list[dict[str, Any]] = []
        self.step = 0
        resume = self.resume_state is not None
        if not resume:
            atomic_write_text(self.out / "config.yaml", config_to_yaml(c))
        atomic_write_json(self.out / "run.json", {"status": "running", "total_steps": self.total,
                                                  "adapter_source": self.source.to_dict() if self.source else None,
                                                  "data": self.data.tasks, "base": self.base_record,
                                                  "query_context": self.query_context})
        has_val = bool(self.val_rows)
        stopped = False
        if resume:
            best, bad, before = self._restore(self.resume_state)
            inner = None  # the recorded inner loop ran before the first checkpoint
            self.resume_state = None
            kept = [line for line in _read_rows(self.metrics_path) if line.get("step", 0) <= self.step]
            atomic_write_text(self.metrics_path, "".join(dumps_json(r) + "\n" for r in kept))
            self.rows = kept
            logger.info("resuming %s at step %d of %d", self.out, self.step, self.total)
            self.reporter = Reporter(c.report_to, self.out, config_to_dict(c), "finetune", resume=True)
        else:
            self.metrics_path.write_text("", encoding="utf-8")
            self.reporter = Reporter(c.report_to, self.out, config_to_dict(c), "finetune")
            before = self._mean_loss(self.train_probe)
            inner = self._inner_loop_first()
            if inner is not None:
                self._log(inner)
            best = None
            bad = 0
            if has_val:
                best = self._validate()["val_loss"]
                self._save("best") if c.save_best else None
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, initial=self.step, desc="finetune", unit="step", disable=not c.progress,
                   dynamic_ncols=True)
        started = time.perf_counter()
        self.model.train()
        try:
            while self.step < self.total:
                t0 = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                losses, tokens = [], 0
                for _ in range(c.gradient_accumulation):
                    batch = collate_rows(self._next_rows(), self.pad)
                    tokens += int(batch["attention_mask"].sum())
                    loss = common.batch_loss(self.model, batch, self.device, self.autocast)
                    (loss / c.gradient_accumulation).backward()
                    losses.append(float(loss.detach()))
                grads = [p for p in self.params.values() if p.grad is not None]
                norm = float(torch.nn.utils.clip_grad_norm_(grads, c.max_grad_norm if c.max_grad_norm > 0 else float("inf")))
                lr = self.scheduler.get_last_lr()[0]
                if math.isfinite(norm):
                    self.optimizer.step()
                else:
                    logger.warning("step %d: non-finite gradient; step skipped", self.step + 1)
                self.scheduler.step()
                self.step += 1
                seconds = time.perf_counter() - t0
                loss_value = sum(losses) / len(losses)
                self._log({"kind": "train", "step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm,
                           "epoch": self.epoch, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                           "seconds": seconds})
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
                if has_val and ((c.eval_every and self.step % c.eval_every == 0) or self.step == self.total):
                    val = self._validate()
                    bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val['val_loss']:.3f}")
                    self.model.train()
                    if val["val_loss"] < best - c.early_stopping_min_delta:
                        best, bad = val["val_loss"], 0
                        if c.save_best:
                            self._save("best")
                    else:
                        bad += 1
                        if c.early_stopping_patience and bad >= c.early_stopping_patience:
                            stopped = True
                            logger.info("early stopping at step %d: no improvement in %d validations", self.step, bad)
                            break
                if c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < self.total:
                    self._save_checkpoint(best, bad, before)
        finally:
            bar.close()
            self.reporter.close()
        seconds = time.perf_counter() - started
        self.model.eval()
        after = self._mean_loss(self.train_probe)
        last = self._save("last")
        adapter_dir = self.out / "best" if has_val and c.save_best and (self.out / "best").is_dir() else last
        if c.plots:
            write_finetune_plots(self.out, self.rows)
        for handle in self.hooks:
            handle.remove()
        self._structure.close()
        atomic_write_json(self.out / "run.json", {
            "status": "finished", "steps": self.step, "total_steps": self.total, "stopped_early": stopped,
            "train_loss_before": before, "train_loss_after": after, "best_val_loss": best, "seconds": seconds,
            "adapter": str(adapter_dir), "adapter_source": self.source.to_dict() if self.source else None,
            "data": self.data.tasks, "base": self.base_record, "inner_loop_first": inner,
            "query_context": self.query_context,
            "trained": ("delta model (LoRA A/B, TARP Σ map, multiplicative term)" if self.delta is not None
                        else "PEFT LoRA"),
            "structure": getattr(self, "structure", None),
        })
        return FinetuneResult(self.out, adapter_dir, self.step, stopped, before, after, best, seconds)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a finetune ``metrics.jsonl``; a last line cut short by a kill is dropped with a warning."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for position, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if position != len(lines) - 1:
                from deltameta.errors import MetaStateError

                raise MetaStateError(f"{path} line {position + 1} is not valid JSON; the metrics file is damaged.") from None
            logger.warning("%s: dropped its last line, cut short by an interrupted write", path)
    return rows


def read_checkpoint(out: Path) -> dict[str, Any]:
    """Read the resumable state of the finetune run in ``out``.

    Raises:
        ConfigError: ``out`` holds no finetune run, the run finished, or it has no checkpoint yet.
        StateFileError: the checkpoint cannot be read.
    """
    from deltameta.errors import ConfigError
    from deltameta.state_files import load_state

    run = out / "run.json"
    if not run.is_file() or not (out / "config.yaml").is_file():
        raise ConfigError(f"--resume {out}: no finetune run there (expected run.json and config.yaml).")
    try:
        status = json.loads(run.read_text(encoding="utf-8")).get("status")
    except json.JSONDecodeError:
        status = None
    if status == "finished":
        raise ConfigError(f"--resume {out}: the run has finished; its adapter is in {out / 'last'}.")
    if not (out / CHECKPOINT / "trainer_state.json").is_file():
        raise ConfigError(f"--resume {out}: the run stopped before its first checkpoint (checkpoint_every); "
                          "start it again with --overwrite.")
    return load_state(out / CHECKPOINT, "trainer_state")


def _is_tarp_export(record: dict[str, Any] | None) -> bool:
    """Whether an export's ``deltameta.json`` describes a TARP (or multiplicative) meta-adapter."""
    if not record:
        return False
    config = record.get("delta_config") or {}
    ops = list((record.get("decisions") or {}).values())
    if config.get("controller", "none") != "none":  # the structure may be chosen anew from the data
        ops += list(config.get("ops") or [])
    else:
        ops.append(str(config.get("delta", "")))
    return bool(config.get("multiplicative")) or any(str(op).startswith("tarp") for op in ops)


def write_finetune_plots(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``plots/loss.png`` (train and validation loss) and ``plots/accuracy.png``."""
    from deltameta.plots import write_curve_plots

    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "validation" and r.get("val_loss") is not None]
    acc = [(r["step"], r["val_accuracy"]) for r in rows if r.get("kind") == "validation" and r.get("val_accuracy") is not None]
    panels = [("loss.png", "fine-tuning loss", [("train", train), ("validation", val)]),
              ("accuracy.png", "validation accuracy", [("validation", acc)])]
    return write_curve_plots(out / "plots", panels, "step")


def check_single_process() -> None:
    """Refuse to run under ``torchrun`` / ``accelerate launch`` with more than one process.

    Fine-tuning is not data-parallel: N processes would run N identical trainings racing on
    ``output_dir``. Called before anything is read or written.

    Raises:
        ConfigError: the launcher's environment or the process group says more than one process.
    """
    from deltameta.errors import ConfigError
    from deltameta.meta.distributed import env_world

    _, world, _ = env_world()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        world = max(world, dist.get_world_size())
    if world > 1:
        raise ConfigError(
            f"finetune runs in one process, but this is one of {world} processes (torchrun / accelerate launch); "
            "it is not data-parallel, and the copies would race on output_dir. Run `deltameta finetune ...` "
            "without the launcher (meta-train is the multi-process command)."
        )


def run_finetune(config: FinetuneConfig, overwrite: bool = False, model: tuple[nn.Module, Any] | None = None,
                 resume: bool = False) -> FinetuneResult:
    """Fine-tune (the Python form of ``deltameta finetune``).

    Args:
        config: The resolved config.
        overwrite: Replace a previous fine-tuning run in ``output_dir``.
        model: Optional preloaded frozen base ``(model, tokenizer)`` (it gets wrapped in a ``PeftModel``).
        resume: Continue the stopped run in ``config.output_dir`` from its checkpoint (``config``
            must be the run's saved one; see :func:`deltameta.finetune.resume_config`).

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        ConfigError: bad keys, an occupied output directory, unknown tasks.
        DataError: the task source cannot be read.
        ModelLoadError, MetaStateError: the adapter is missing, unfinished or for another base.
    """
    check_single_process()
    if resume:
        out = Path(config.output_dir).expanduser()
        trainer = _Trainer(config, out, model, resume=True)
    else:
        existed = Path(config.output_dir).expanduser().exists()
        out = prepare_output_dir(config.output_dir, RUN_MARKERS, overwrite, "finetune", resumable=True)
        try:
            trainer = _Trainer(config, out, model)
        except BaseException:
            if not existed:  # nothing was trained: leave no half-made run behind (never a previous one)
                shutil.rmtree(out, ignore_errors=True)
            raise
        start_fresh(out, RUN_MARKERS, keep=("start_adapter",))  # replace a previous run only now, after all checks
    try:
        return trainer.train()
    except BaseException as error:
        atomic_write_json(out / "run.json", {"status": "failed", "error": f"{type(error).__name__}: {error}"})
        raise
