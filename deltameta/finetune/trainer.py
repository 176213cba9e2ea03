"""Fine-tuning an adapter on a user's task: standard PEFT training on a frozen (4-bit) base.

:func:`run_finetune` loads the base, starts from a meta-adapter (``PeftModel.from_pretrained(...,
is_trainable=True)``) or a fresh LoRA (``get_peft_model``), trains with AdamW/SGD, warmup and a
decay schedule, gradient accumulation, optional gradient checkpointing and bf16 autocast, validates
every N steps (loss and accuracy) with early stopping, and writes::

    OUTPUT/run.json        status, counts, losses, which adapter to use
    OUTPUT/config.yaml     the resolved config
    OUTPUT/metrics.jsonl   one row per step and per validation
    OUTPUT/plots/*.png     loss and accuracy curves
    OUTPUT/last/           the PEFT adapter after the last step
    OUTPUT/best/           the PEFT adapter with the lowest validation loss (with validation)

Both adapter directories load with plain ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltameta.atomic import append_line, atomic_directory, atomic_write_json, atomic_write_text, dumps_json
from deltameta.config import config_to_yaml
from deltameta.finetune import common
from deltameta.finetune.adapters import SIDECAR_FILES, check_base_matches, ensure_peft_dir, resolve_adapter
from deltameta.finetune.config import FinetuneConfig
from deltameta.finetune.data import encode_items, group_by_task, load_finetune_data
from deltameta.output_dir import prepare_output_dir, start_fresh
from deltameta.tasks.encoding import collate_rows

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
RUN_MARKERS = ("run.json", "metrics.jsonl", "last", "best")


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


def lr_lambda(config: FinetuneConfig, total: int):
    """Return the lr multiplier of step ``s``: linear warmup, then constant, linear or cosine decay."""

    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(max(step - config.warmup_steps, 0) / max(total - config.warmup_steps, 1), 1.0)
        shape = 1.0 - progress if config.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape

    return factor


def make_optimizer(params: list[nn.Parameter], optimizer: str, lr: float, weight_decay: float = 0.0):
    """AdamW or plain SGD over ``params``."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class _Trainer:
    def __init__(self, config: FinetuneConfig, out: Path, model: tuple[nn.Module, Any] | None) -> None:
        self.config = c = config
        self.out = out
        torch.manual_seed(c.seed)
        self.data = load_finetune_data(c)
        source = resolve_adapter(c.adapter, "adapter") if c.adapter else None  # fail before loading the base
        base, self.tokenizer = model if model is not None else common.load_frozen_base(c)
        self.device = common.model_device(base)
        self.autocast = bool(c.bf16)
        self.source = None
        if source is not None:
            check_base_matches(source, base)
            source = ensure_peft_dir(source, out / "start_adapter", device=str(self.device), max_length=c.max_length)
            check_base_matches(source, base)
            if c.dynamic and not source.has_sidecar:
                logger.warning("dynamic=true but %s has no TARP sidecar; training the static adapter only", source.given)
            self.source = source
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
        if c.dynamic and self.source is not None and self.source.has_sidecar:
            from deltameta.finetune.dynamic import attach_dynamic

            self.hooks = attach_dynamic(self.model, self.source.peft_dir)
        self.params = common.activate(self.model, ADAPTER_NAME)
        if c.gradient_checkpointing:
            inner = self.model.base_model.model
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
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(c, self.total))
        self.generator = torch.Generator().manual_seed(c.seed)
        self.order: list[int] = []
        self.epoch = 0
        limit = c.eval_examples or None
        self.val_items = self.data.validation[:limit] if limit else self.data.validation
        self.val_rows = encode_items(self.tokenizer, self.val_items, c.max_length) if self.val_items else []
        probe = torch.randperm(len(self.train_rows), generator=torch.Generator().manual_seed(c.seed + 1)).tolist()
        self.train_probe = [self.train_rows[i] for i in probe[: (limit or len(probe))]]
        self.metrics_path = out / "metrics.jsonl"

    # -------------------------------------------------------------------------- pieces

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
                                       task.template, self.config.max_length, device=self.device)
            hits += result["accuracy"] * result["count"]
            count += result["count"]
        return hits / max(count, 1.0)

    def _log(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        append_line(self.metrics_path, dumps_json(clean))
        self.rows.append(clean)

    def _save(self, name: str) -> Path:
        target = self.out / name
        with atomic_directory(target) as tmp:
            self.model.save_pretrained(str(tmp), selected_adapters=[ADAPTER_NAME], save_embedding_layers=False)
            if self.hooks and self.source is not None:
                for file in SIDECAR_FILES:
                    shutil.copy2(self.source.peft_dir / file, tmp / file)
            (tmp / "README.md").write_text(self._card(name), encoding="utf-8")
        return target

    def _card(self, name: str) -> str:
        c = self.config
        base = getattr(self.model.base_model.model, "deltameta_base", None)
        start = f"`{self.source.given}`" if self.source else f"a fresh LoRA (rank {c.rank}, alpha {c.alpha})"
        lines = [
            "---", f"base_model: {base.base_model_name_or_path if base else 'unknown'}", "library_name: peft",
            "tags: [deltameta, lora, finetune]", "---", "",
            f"# deltameta fine-tuned adapter ({name})", "",
            f"- started from: {start}",
            f"- trained on: `{c.tasks}` ({len(self.data.train)} examples, {len(self.data.validation)} held out)",
            f"- base quantization during training: `{c.quantization}`",
            f"- steps: {self.step} of {self.total}, lr {c.lr} ({c.lr_schedule}), batch {c.batch_size} x {c.gradient_accumulation}",
        ]
        if self.hooks:
            lines.append("- carries TARP's dynamic sidecar: load with `deltameta.load_meta_adapter(base, DIR)` for the exact model")
        lines += ["", "```python", "from peft import PeftModel", 'model = PeftModel.from_pretrained(base, "DIR")', "```", ""]
        return "\n".join(lines)

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
        atomic_write_text(self.out / "config.yaml", config_to_yaml(c))
        atomic_write_json(self.out / "run.json", {"status": "running", "total_steps": self.total,
                                                  "adapter_source": self.source.to_dict() if self.source else None,
                                                  "data": self.data.tasks})
        self.metrics_path.write_text("", encoding="utf-8")
        before = self._mean_loss(self.train_probe)
        has_val = bool(self.val_rows)
        best = None
        bad = 0
        stopped = False
        if has_val:
            best = self._validate()["val_loss"]
            self._save("best") if c.save_best else None
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, desc="finetune", unit="step", disable=not c.progress, dynamic_ncols=True)
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
        finally:
            bar.close()
        seconds = time.perf_counter() - started
        self.model.eval()
        after = self._mean_loss(self.train_probe)
        last = self._save("last")
        adapter_dir = self.out / "best" if has_val and c.save_best and (self.out / "best").is_dir() else last
        if c.plots:
            write_finetune_plots(self.out, self.rows)
        for handle in self.hooks:
            handle.remove()
        atomic_write_json(self.out / "run.json", {
            "status": "finished", "steps": self.step, "total_steps": self.total, "stopped_early": stopped,
            "train_loss_before": before, "train_loss_after": after, "best_val_loss": best, "seconds": seconds,
            "adapter": str(adapter_dir), "adapter_source": self.source.to_dict() if self.source else None,
            "data": self.data.tasks,
        })
        return FinetuneResult(self.out, adapter_dir, self.step, stopped, before, after, best, seconds)


def write_finetune_plots(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Write ``plots/loss.png`` (train and validation loss) and ``plots/accuracy.png``."""
    from deltameta.plots import write_curve_plots

    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "validation" and r.get("val_loss") is not None]
    acc = [(r["step"], r["val_accuracy"]) for r in rows if r.get("kind") == "validation" and r.get("val_accuracy") is not None]
    panels = [("loss.png", "fine-tuning loss", [("train", train), ("validation", val)]),
              ("accuracy.png", "validation accuracy", [("validation", acc)])]
    return write_curve_plots(out / "plots", panels, "step")


def run_finetune(config: FinetuneConfig, overwrite: bool = False, model: tuple[nn.Module, Any] | None = None) -> FinetuneResult:
    """Fine-tune (the Python form of ``deltameta finetune``).

    Args:
        config: The resolved config.
        overwrite: Replace a previous fine-tuning run in ``output_dir``.
        model: Optional preloaded frozen base ``(model, tokenizer)`` (it gets wrapped in a ``PeftModel``).

    Returns:
        A :class:`FinetuneResult`.

    Raises:
        ConfigError: bad keys, an occupied output directory, unknown tasks.
        DataError: the task source cannot be read.
        ModelLoadError, MetaStateError: the adapter is missing, unfinished or for another base.
    """
    existed = Path(config.output_dir).expanduser().exists()
    out = prepare_output_dir(config.output_dir, RUN_MARKERS, overwrite, "finetune")
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
