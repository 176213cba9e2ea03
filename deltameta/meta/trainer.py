"""The outer loop of meta-training: meta-batches, optimizers, validation, checkpoints, outputs.

:class:`MetaTrainer` runs a :class:`~deltameta.meta.config.MetaTrainConfig` end to end:

1. load the frozen base, inject the deltas (seeded), build the controller and the algorithm;
2. per outer step: sample a meta-batch of episodes, accumulate each task's meta-gradient
   (looped, or task-batched), add the controller's budget/entropy regularisers, skip the step
   if anything is non-finite (stopping after ``max_nonfinite`` in a row), flag a meta-gradient norm
   far above the recent ones (:mod:`deltameta.meta.stability`), clip, and step AdamW
   (warmup + cosine, :mod:`deltameta.schedule`) for the deltas and Adam for the controller (own lr, temperature schedule);
3. periodically validate on held-out tasks (query loss before/after adaptation), keep the best
   meta-state, checkpoint atomically (last N);
4. at the end write the final meta-state, the PEFT export, plots and the run status.

A run resumed from its last checkpoint reproduces the uninterrupted run bit for bit on CPU.

Launched on several processes (``torchrun``, ``accelerate launch``), each rank runs its share of
every meta-batch and the meta-gradients are summed before the step (see
:mod:`deltameta.meta.distributed`); rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltameta.atomic import atomic_write_text
from deltameta.errors import DeltametaError
from deltameta.meta import checkpoint as ckpt
from deltameta.meta import data
from deltameta.meta import distributed as D
from deltameta.meta.algorithms import InnerLoop, MetaAlgorithm, TaskResult, _mean_results, evaluate_task, make_algorithm
from deltameta.meta.config import MetaTrainConfig
from deltameta.meta.run_dir import MetricsLog, read_status, write_config, write_plots, write_status
from deltameta.meta.stability import GradSpikeMonitor
from deltameta.schedule import make_scheduler
from deltameta.tasks.seeding import derive_seed

logger = logging.getLogger(__name__)


class TrainingError(DeltametaError):
    """Meta-training had to stop (e.g. too many non-finite steps in a row)."""


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports.

    Attributes:
        run_dir: The run directory.
        steps: Outer steps completed.
        skipped: Steps skipped because a loss or gradient was not finite.
        initial_validation: ``(query_before, query_after)`` on held-out tasks at step 0.
        final_validation: The same after the last step.
        best_validation: Lowest held-out query loss after adaptation seen.
        seconds: Wall-clock time of the training loop.
        export_error: Why the PEFT export failed, or ``None``.
        already_finished: A resumed run had already finished; nothing was changed.
        grad_spikes: Outer steps whose meta-gradient norm was a spike (see
            :mod:`deltameta.meta.stability`): many of them mean training was unstable.
    """

    run_dir: Path
    steps: int
    skipped: int
    initial_validation: tuple[float, float] | None
    final_validation: tuple[float, float] | None
    best_validation: float | None
    seconds: float
    export_error: str | None = None
    already_finished: bool = False
    grad_spikes: int = 0


def _meta_loss(result, init_loss_weight: float) -> float:
    """The outer objective's value: the query loss after adaptation, plus ``λ L_support(φ_0)`` when λ > 0."""
    return result.query_after + init_loss_weight * result.support_before if init_loss_weight else result.query_after


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetaTrainer:
    """Runs one meta-training run.

    Args:
        config: The resolved config.
        run_dir: An existing (prepared) run directory.
        resume: Continue from the newest checkpoint in ``run_dir``.
        model: Optional preloaded base ``(model, tokenizer)`` (fresh, without deltas); by default
            the base named by ``config.model`` is loaded.
        dist: The process's place in a distributed run; default: the initialised process group,
            if any (see :func:`deltameta.meta.distributed.current`).
        overwrite: ``run_dir`` may hold a previous run: :meth:`train` replaces it (atomically) when it
            starts, after this constructor has checked the config, data and model.

    Setting up writes nothing into ``run_dir``.
    """

    def __init__(self, config: MetaTrainConfig, run_dir: str | Path, resume: bool = False,
                 model: tuple[nn.Module, Any] | None = None, dist: D.DistContext | None = None,
                 overwrite: bool = False) -> None:
        self.config = config
        self.dist = dist if dist is not None else D.current()
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.overwrite = overwrite
        self._preloaded = model
        self._metrics: Any = None
        self._start_step = 0
        self.step = 0
        self.skipped = 0
        self.nonfinite_run = 0
        self.best: float | None = None
        self.tokens_total = 0
        self.initial_validation: tuple[float, float] | None = None
        self.last_validation: tuple[float, float] | None = None
        self.rolled_back = 0
        self.grad_monitor = GradSpikeMonitor()
        self._setup()

    @property
    def metrics(self) -> MetricsLog | D.NullMetricsLog:
        """The run's metrics log, opened on first use (so that setting up writes nothing)."""
        if self._metrics is None:
            if self.dist.is_main:
                from deltameta.config import config_to_dict
                from deltameta.reporting import Reporter

                c = self.config
                reporter = Reporter(c.report_to, self.run_dir, config_to_dict(c), "meta-train", resume=self.resume)
                self._metrics = MetricsLog(self.run_dir, truncate_after=self._start_step if self.resume else None,
                                           reporter=reporter)
            else:
                self._metrics = D.NullMetricsLog()
        return self._metrics

    # ------------------------------------------------------------------------------ setup

    def _setup(self) -> None:
        c = self.config
        D.check_run(c, self.dist)
        torch.manual_seed(c.seed)
        self.device = D.resolve_device(c.device, self.dist)
        if self._preloaded is not None:
            self.model, self.tokenizer = self._preloaded
        else:
            from deltameta.base import load_base

            dtype = None if c.compute_dtype == "auto" else c.compute_dtype
            with self.dist.local_main_first():  # one download / 4-bit preparation per machine
                self.model, self.tokenizer = load_base(c.model, c.quantization, compute_dtype=dtype,
                                                       double_quant=c.double_quant, device=self.device, seed=c.seed)
        from deltameta.deltas import ArchController, delta_parameters, inject_deltas

        if c.gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers >= 5.x
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()  # HF checkpoints only in training mode; there is no dropout in the frozen base
        self.delta_config = c.delta_config()
        torch.manual_seed(c.seed)
        inject_deltas(self.model, self.delta_config)
        self.params = delta_parameters(self.model)
        self.controller = ArchController.for_model(self.model, self.delta_config) if c.controller != "none" else None
        inner = InnerLoop(steps=c.inner_steps, lr=c.inner_lr, first_order=c.is_first_order(), clip=c.inner_clip or None,
                          optimizer=c.inner_optimizer, metasgd_rates=c.metasgd_rates,
                          metasgd_rate_grad=c.metasgd_rate_grad)
        self.algorithm: MetaAlgorithm = make_algorithm(
            c.algorithm, self.model, self.params, inner,
            loss_fn_factory=lambda m, groups: _lm_loss_fn(m, groups), init_loss_weight=c.init_loss_weight,
        )
        self.algorithm.inplace = bool(c.gradient_checkpointing)
        groups = [{"params": list(self.params.values()), "weight_decay": c.weight_decay}]
        extra = list(self.algorithm.extra_parameters().values())
        if extra:
            groups.append({"params": extra, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=c.outer_lr)
        self.scheduler = make_scheduler(self.optimizer, "cosine", c.warmup_steps, c.outer_steps, c.min_lr_ratio)
        self.controller_optimizer = (
            torch.optim.Adam(self.controller.parameters(), lr=c.controller_lr) if self.controller is not None else None
        )
        self.splits = data.load_splits(c)
        self.sampler = data.make_sampler(self.splits.train, c, c.seed, "meta-train")
        self.val_batches = []
        if self.splits.validation is not None:
            val_sampler = data.make_sampler(self.splits.validation, c, c.seed + 7919, "validation")
            self.val_batches = [self._encode(val_sampler.episode(i)) for i in range(c.eval_tasks)]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.resume:
            self._start_step = self._load_latest()
            if c.algorithm != "none" and self._start_step > c.outer_steps:
                from deltameta.errors import ConfigError

                raise ConfigError(f"outer_steps={c.outer_steps} is below step {self._start_step} of the newest checkpoint "
                                  f"of {self.run_dir}; pass outer_steps={self._start_step} or more.")

    def _encode(self, episode: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        c = self.config
        support = data.encode(self.tokenizer, episode.task, episode.support, c.max_length)
        demonstrations = episode.support if c.query_context == "support" else None
        query = data.encode(self.tokenizer, episode.task, episode.query, c.query_max_length(), in_context=demonstrations)
        move = lambda b: {k: v.to(self.device) for k, v in b.items()}  # noqa: E731
        return move(support), move(query)

    # ------------------------------------------------------------------------------ controller

    def _embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.controller is None or self.controller.mode != "task":
            return None
        from deltameta.deltas import task_embedding

        return task_embedding(self.model, batch["input_ids"], batch["attention_mask"])

    def _sample_weights(self, supports: list[dict[str, torch.Tensor]], tau: float,
                        indices: list[int]) -> torch.Tensor | None:
        """One straight-through Gumbel sample per task: ``[n_sub, n_ops]`` or ``[T, n_sub, n_ops]``.

        The noise of a task is drawn from a generator seeded by ``(seed, episode index)``, so it is
        the same whichever rank runs the task (and needs no state in the checkpoint).
        """
        if self.controller is None:
            return None
        samples = []
        for support, index in zip(supports, indices):
            generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "gumbel", index))
            weights = self.controller(self._embedding(support), tau=tau, hard=True, generator=generator)
            samples.append(weights.to(self.device))
        return samples[0] if len(samples) == 1 else torch.stack(samples)

    def _decided_weights(self, support: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.controller is None:
            return None
        return self.controller.decision_weights(self.controller.decide(self._embedding(support)))

    def _apply(self, weights: torch.Tensor | None):
        return self.controller.apply(self.model, weights) if weights is not None else contextlib.nullcontext()

    def _controller_regularisers(self, supports: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Back-propagate the budget and entropy terms; return the controller's statistics."""
        c = self.config
        emb = None
        if self.controller.mode == "task":  # the regularisers see the whole meta-batch on every rank
            emb = self.dist.gather_tasks(torch.stack([self._embedding(s) for s in supports]))
        probs = self.controller.probs(emb)
        maximum = self.controller.max_params()
        budget = self.controller.budget_loss(c.budget_target * maximum, probs=probs)
        entropy = self.controller.entropy(probs=probs)
        loss = c.budget_weight * budget + c.entropy_weight * entropy
        if loss.requires_grad and self.dist.is_main:  # counted once in the summed meta-gradient
            loss.backward()
        return {
            "controller_entropy": float(entropy.detach()),
            "controller_budget": float(self.controller.expected_params(probs=probs).detach()) / maximum,
            "controller_budget_loss": float(budget.detach()),
        }

    # ------------------------------------------------------------------------------ steps

    def _meta_parameters(self) -> list[torch.Tensor]:
        params = list(self.algorithm.meta_parameters().values())
        if self.controller is not None:
            params += list(self.controller.parameters())
        return params

    def train_step(self) -> dict[str, Any]:
        """Run one outer step; return its metrics row."""
        from deltameta.deltas import temperature

        c = self.config
        started = time.perf_counter()
        tau = temperature(self.step, c.outer_steps, c.tau_start, c.tau_end, c.tau_schedule)
        episodes = self.sampler.sample_batch(c.meta_batch_size, self.dist.rank, self.dist.world_size)
        indices = [e.index for e in episodes]
        encoded = [self._encode(e) for e in episodes]
        supports = [s for s, _ in encoded]
        queries = [q for _, q in encoded]
        self.optimizer.zero_grad(set_to_none=True)
        if self.controller_optimizer is not None:
            self.controller_optimizer.zero_grad(set_to_none=True)
        scale = 1.0 / c.meta_batch_size  # the global meta-batch, however it is sharded
        if c.task_batched and len(encoded) > 1:
            with self._apply(self._sample_weights(supports, tau, indices)):
                result = self.algorithm.tasks_step_batched(supports, queries, scale, self.pad_id)
        else:
            results: list[TaskResult] = []
            for (support, query), index in zip(encoded, indices):
                with self._apply(self._sample_weights([support], tau, [index])):
                    results.append(self.algorithm.task_step(support, query, scale))
            result = _mean_results(results)
        result = D.reduce_task_result(self.dist, result, len(encoded), c.meta_batch_size)
        row: dict[str, Any] = {"kind": "train", "step": self.step + 1, "lr": self.scheduler.get_last_lr()[0], "tau": tau}
        if self.controller is not None:
            row.update(self._controller_regularisers(supports))
        params = self._meta_parameters()
        self.dist.all_reduce_grads(params)
        finite = result.finite and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
        rolled_back = False
        if finite:
            # meta_clip=0: an infinite clip norm measures without clipping, so spikes are flagged then too
            norm = float(torch.nn.utils.clip_grad_norm_(params, c.meta_clip if c.meta_clip > 0 else math.inf))
            row["meta_grad_norm"] = norm
            self._check_spike(row, norm)
            saved = self._snapshot(params)
            self.optimizer.step()
            self.algorithm.after_outer_step()
            if self.controller_optimizer is not None:
                self.controller_optimizer.step()
            if all(bool(torch.isfinite(p).all()) for p in params):
                self.nonfinite_run = 0
            else:  # the update itself made a meta-parameter non-finite (e.g. a huge outer_lr): undo it
                self._restore(params, saved)
                finite, rolled_back = False, True
                self.rolled_back += 1
        if not finite:
            self.skipped += 1
            self.nonfinite_run += 1
            self.optimizer.zero_grad(set_to_none=True)
            if self.controller_optimizer is not None:
                self.controller_optimizer.zero_grad(set_to_none=True)
            if self.dist.is_main:
                what = ("its update made meta-parameters non-finite; step rolled back" if rolled_back
                        else "non-finite loss or gradient; step skipped")
                logger.warning("step %d: %s (%d in a row, %d in total)", self.step + 1, what,
                               self.nonfinite_run, self.skipped)
        self.scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - started
        self.tokens_total += result.tokens
        row.update(
            support_before=result.support_before,
            support_after=result.support_after,
            query_after=result.query_after,
            meta_loss=_meta_loss(result, self.algorithm.init_loss_weight),
            skipped=not finite,
            rolled_back=rolled_back,
            skipped_total=self.skipped,
            tokens=result.tokens,
            tokens_per_s=result.tokens / max(seconds, 1e-9),
            seconds=seconds,
            memory_mb=_memory_mb(),
        )
        self.metrics.log(row)
        if self.nonfinite_run >= c.max_nonfinite:
            last = ckpt.latest_checkpoint(self.run_dir)
            where = (f"the newest checkpoint (finite parameters; skipped steps leave them unchanged) is {last}"
                     if last else "no checkpoint was written yet")
            if self.dist.is_main:
                write_status(self.run_dir, "failed", reason="non-finite losses", step=self.step)
            raise TrainingError(
                f"{self.nonfinite_run} non-finite meta-steps in a row (max_nonfinite={c.max_nonfinite}) at step "
                f"{self.step}; stopping. {where}. Lower inner_lr/outer_lr, enable inner_clip/meta_clip, "
                "or check the data."
            )
        return row

    def _check_spike(self, row: dict[str, Any], norm: float) -> None:
        """Flag a meta-gradient norm far above the recent ones (finite, so clipping lets it through)."""
        ratio = self.grad_monitor.update(norm)
        row["meta_grad_spike"] = ratio is not None
        if ratio is not None and self.dist.is_main:
            clip = self.config.meta_clip
            clipping = f"clipped to meta_clip={clip:g}" if clip > 0 else "not clipped: meta_clip=0"
            logger.warning(
                "step %d: meta-gradient norm %.4g is %.0fx the median of the recent steps (%s); %d such "
                "spike(s) so far. Many spikes mean meta-training is unstable: a lower outer_lr or inner_lr, "
                "%sor a first-order meta-gradient (algorithm=fomaml; metasgd with first_order=true), may help.",
                self.step + 1, norm, ratio, clipping, self.grad_monitor.spikes, "" if clip > 0 else "meta_clip > 0, ")

    def _snapshot(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, Any], dict[str, Any] | None]:
        """Copy the meta-parameters and optimizer states before a step (for :meth:`_restore`)."""
        return ([p.detach().clone() for p in params], copy.deepcopy(self.optimizer.state_dict()),
                copy.deepcopy(self.controller_optimizer.state_dict()) if self.controller_optimizer else None)

    def _restore(self, params: list[torch.Tensor], saved: tuple[list[torch.Tensor], dict[str, Any], Any]) -> None:
        values, optimizer, controller_optimizer = saved
        with torch.no_grad():
            for param, value in zip(params, values):
                param.copy_(value)
        self.optimizer.load_state_dict(optimizer)
        if controller_optimizer is not None:
            self.controller_optimizer.load_state_dict(controller_optimizer)

    def meta_parameters_finite(self) -> bool:
        """Whether every meta-parameter (deltas, learned rates, controller) is finite."""
        return all(bool(torch.isfinite(p).all()) for p in self._meta_parameters())

    def validate(self) -> tuple[float, float] | None:
        """Mean held-out query loss before and after adaptation (controller: argmax structure).

        Distributed, each rank evaluates its share of the held-out episodes and the sums are reduced.
        """
        if not self.val_batches:
            return None
        befores, afters = [], []
        for support, query in self.val_batches[self.dist.rank::self.dist.world_size]:
            with self._apply(self._decided_weights(support)):
                before, after = evaluate_task(self.algorithm, support, query)
            befores.append(before)
            afters.append(after)
        total_before, total_after = self.dist.sum_floats([sum(befores), sum(afters)])
        result = (total_before / len(self.val_batches), total_after / len(self.val_batches))
        self.metrics.log({"kind": "validation", "step": self.step, "query_before": result[0], "query_after": result[1],
                          "adaptation_gain": result[0] - result[1]})
        return result

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume (see :mod:`deltameta.meta.checkpoint`)."""
        return {
            "step": self.step,
            "params": {k: p.detach().clone() for k, p in self.params.items()},
            "extra_params": {k: p.detach().clone() for k, p in self.algorithm.extra_parameters().items()},
            "controller": self.controller.state_dict() if self.controller is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "controller_optimizer": self.controller_optimizer.state_dict() if self.controller_optimizer else {},
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "counters": {"skipped": self.skipped, "nonfinite_run": self.nonfinite_run, "best": self.best,
                         "tokens_total": self.tokens_total, "rolled_back": self.rolled_back,
                         "grad_monitor": self.grad_monitor.state_dict(),
                         "initial_validation": list(self.initial_validation) if self.initial_validation else None,
                         "last_validation": list(self.last_validation) if self.last_validation else None},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
            extra = self.algorithm.extra_parameters()
            for name, value in state["extra_params"].items():
                extra[name].copy_(value)
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
            self.controller_optimizer.load_state_dict(state["controller_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        counters = state["counters"]
        self.step = int(state["step"])
        self.skipped = int(counters["skipped"])
        self.nonfinite_run = int(counters["nonfinite_run"])
        best = counters["best"]
        self.best = best if best is not None and math.isfinite(best) else None
        self.tokens_total = int(counters["tokens_total"])
        self.rolled_back = int(counters.get("rolled_back", 0))
        self.grad_monitor.load_state_dict(counters.get("grad_monitor"))
        initial = counters.get("initial_validation")
        self.initial_validation = tuple(initial) if initial else None
        last = counters.get("last_validation")
        self.last_validation = tuple(last) if last else None

    def _read_latest(self) -> tuple[Path, dict[str, Any]]:
        """Load the newest readable checkpoint, falling back (one warning each) past damaged ones."""
        found = ckpt.list_checkpoints(self.run_dir)
        if not found:
            raise ckpt.CheckpointError(f"--resume {self.run_dir}: the run has no complete checkpoint to resume from.")
        errors = []
        for _, directory in reversed(found):
            try:
                state = ckpt.load_checkpoint(directory)
            except ckpt.CheckpointError as error:
                errors.append(str(error))
                logger.warning("%s; trying the previous checkpoint", error)
                continue
            if errors:
                logger.warning("resuming from the previous intact checkpoint %s instead", directory.name)
            return directory, state
        raise ckpt.CheckpointError(f"--resume {self.run_dir}: no checkpoint can be read ({errors[-1]}).")

    def _load_latest(self) -> int:
        latest, state = self.dist.run_on_main(self._read_latest)  # rank 0 reads, every rank loads
        self.load_state_dict(state)
        logger.info("resuming %s from %s (step %d)", self.run_dir, latest.name, self.step)
        return self.step

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step (atomic, keeps the last N; rank 0 only)."""
        if not self.dist.is_main:
            return ckpt.checkpoint_dir(self.run_dir, self.step)
        return ckpt.save_checkpoint(self.run_dir, self.step, self.state_dict(), self.config.keep_checkpoints)

    def _save_meta_state(self, directory: Path, final: bool = False) -> None:
        from deltameta.deltas import save_meta_state

        extra = {"config": dataclasses.asdict(self.config), "step": self.step, "splits": self.splits.names,
                 "validation": {"initial": self.initial_validation, "last": self.last_validation, "best": self.best}}
        fold = self._fold_statistics() if final or self._export_reads_statistics() else {}
        save_meta_state(directory, self.model, self.delta_config, self.controller, extra=extra, **fold,
                        **self.inner_loop_record())

    def _export_reads_statistics(self) -> bool:
        """Whether exporting this run reads its fold statistics or mean task embedding, so ``best/`` stores them too.

        TARP ops and the multiplicative term fold at statistics of meta-training inputs, and a
        controller decides the exported structure from the mean task embedding; a plain LoRA
        without a controller needs neither.
        """
        c = self.delta_config
        return c.delta == "tarp" or c.multiplicative or self.controller is not None

    def inner_loop_record(self) -> dict[str, Any]:
        """``inner_loop`` (the record) and ``inner_lrs`` (learned rates or ``None``) of this run."""
        from deltameta.deltas.inner_loop import rates_from_extra_parameters, record_from_config

        rates = rates_from_extra_parameters(self.algorithm.extra_parameters()) or None
        inner = self.algorithm.inner
        record = record_from_config(dataclasses.asdict(self.config), first_order=inner.first_order,
                                    learned_rates=rates is not None)
        if record.optimizer == "adam":
            record.betas, record.eps = tuple(inner.betas), float(inner.eps)
        return {"inner_loop": record, "inner_lrs": rates}

    def _fold_statistics(self, episodes: int = 8) -> dict[str, Any]:
        """TARP fold statistics, held-out fold inputs and the mean task embedding (export's inputs).

        The fold statistics (mean ``Σ(x) - I``, ``E[z zᵀ]``, ``E[u zᵀ]``; see
        :mod:`deltameta.deltas.fold`) come from the support sets of ``episodes`` meta-training
        episodes; their query sets, never used for the statistics, are kept as held-out inputs on
        which the export measures the fold error. They run under a forked random generator (whatever
        they draw never reaches the run's), so saving ``best/`` mid-run leaves the run unchanged.

        Returns:
            Keyword arguments of :func:`deltameta.deltas.save_meta_state`.
        """
        device = torch.device(self.device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return self._collect_fold_statistics(episodes)

    def _collect_fold_statistics(self, episodes: int) -> dict[str, Any]:
        from deltameta.deltas import collect_fold_moments
        from deltameta.deltas import task_embedding as embed
        from deltameta.deltas.fold import add_moments, normalise_moments
        from deltameta.meta.batched import concat_batches

        sampler = data.make_sampler(self.splits.train, self.config, self.config.seed + 104729, "meta-train")
        totals: dict[str, Any] = {}
        embeddings, heldout = [], []
        for index in range(episodes):
            support, query = self._encode(sampler.episode(index))
            embeddings.append(embed(self.model, support["input_ids"], support["attention_mask"]))
            heldout.append({k: v.cpu() for k, v in query.items()})
            with self._apply(self._decided_weights(support)):
                add_moments(totals, collect_fold_moments(self.model, support["input_ids"], support["attention_mask"],
                                                         use_cache=False))
        means, moments = normalise_moments(totals)
        examples = [{k: v[i : i + 1] for k, v in b.items()} for b in heldout for i in range(int(b["input_ids"].shape[0]))]
        return {
            "fold_stats": means or None,
            "fold_moments": moments or None,
            "fold_heldout": concat_batches(examples, self.pad_id) if (means or moments) and examples else None,
            "task_embedding_mean": torch.stack(embeddings).mean(0),
        }

    # ------------------------------------------------------------------------------ run

    def train(self) -> TrainResult:
        """Run (or continue) the outer loop to ``outer_steps`` and write the run's outputs."""
        c = self.config
        # algorithm=none (the fresh-adapter baseline) trains nothing: validate and export step 0
        total = 0 if c.algorithm == "none" else c.outer_steps
        if self.dist.is_main:
            if not self.resume:
                from deltameta import output_dir
                from deltameta.meta.run_dir import RUN_MARKERS, holds_run

                if holds_run(self.run_dir) and not self.overwrite:
                    from deltameta.errors import ConfigError

                    raise ConfigError(f"output_dir='{self.run_dir}' already holds a run; pass --overwrite to replace it.")
                output_dir.start_fresh(self.run_dir, RUN_MARKERS)  # a previous run goes only now, atomically
            write_config(self.run_dir, c)
            from deltameta.base import base_record

            write_status(self.run_dir, "running", step=self.step, outer_steps=total, base=base_record(self.model))
        try:
            return self._train(total)
        except KeyboardInterrupt:
            if self.dist.is_main:
                write_status(self.run_dir, "interrupted", step=self.step)
            raise
        except TrainingError:
            raise  # the status is written where it is raised
        except Exception as error:
            if self.dist.is_main:
                write_status(self.run_dir, "failed", step=self.step, reason=f"{type(error).__name__}: {error}")
            raise

    def _train(self, total: int) -> TrainResult:
        c = self.config
        started = time.perf_counter()
        if self.step == 0 and not self.resume:
            self.initial_validation = self.validate()
            self.last_validation = self.initial_validation
        progress = _progress(total, self.step, c.progress) if total and self.dist.is_main else None
        try:
            while self.step < total:
                row = self.train_step()
                if progress is not None:
                    progress.set_postfix(loss=f"{row['query_after']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                         val=f"{self.last_validation[1]:.3f}" if self.last_validation else "-",
                                         refresh=False)
                    progress.update(1)
                last = self.step == total
                if (c.eval_every and self.step % c.eval_every == 0) or last:
                    self.last_validation = self.validate()
                    value = self.last_validation[1] if self.last_validation is not None else math.nan
                    if math.isfinite(value) and (self.best is None or value < self.best):  # NaN never wins
                        self.best = self.last_validation[1]
                        if self.dist.is_main:
                            self._save_meta_state(self.run_dir / "best")
                if (c.checkpoint_every and self.step % c.checkpoint_every == 0) or last:
                    self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
        seconds = time.perf_counter() - started
        self._check_trained(total)
        export_error = self.dist.run_on_main(self._finish)  # the other ranks wait for the outputs
        self.metrics.close()
        return TrainResult(self.run_dir, self.step, self.skipped, self.initial_validation, self.last_validation,
                           self.best, seconds, export_error, grad_spikes=self.grad_monitor.spikes)

    def _check_trained(self, total: int) -> None:
        """Refuse to write a final state when no step succeeded or the parameters are not finite."""
        reason = None
        if total > 0 and self.step - self.skipped <= 0:
            reason = f"none of the {self.step} outer steps succeeded (every one was non-finite and skipped)"
        elif not self.meta_parameters_finite():
            reason = "the final meta-parameters are not finite"
        elif self.last_validation is not None and not all(math.isfinite(v) for v in self.last_validation):
            best = f"; best/ keeps the best finite state (held-out loss {self.best:.4g})" if self.best is not None else ""
            reason = (f"the final held-out loss is not finite ({self.last_validation[1]}): the meta-parameters make "
                      f"the model produce NaN/inf{best}")
        if reason is None:
            return
        if self.dist.is_main:
            write_status(self.run_dir, "failed", reason=reason, step=self.step, skipped=self.skipped)
        raise TrainingError(f"{reason}; nothing was exported. Lower inner_lr/outer_lr, enable inner_clip/meta_clip, "
                            "or check the data.")

    def _finish(self) -> str | None:
        c = self.config
        self._save_meta_state(self.run_dir / "final", final=True)
        export_error = None
        if c.export:
            try:
                from deltameta.deltas import export_peft

                export_peft(self.run_dir, self.run_dir / "peft", device=self.device, max_length=c.max_length,
                            overwrite=True)
            except Exception as error:  # noqa: BLE001 - the run itself succeeded; report the export failure
                export_error = f"{type(error).__name__}: {error}"
                logger.warning("PEFT export failed: %s", export_error)
        if c.plots:
            write_plots(self.run_dir, self.metrics.rows)
            if self.controller is not None:
                emb = None
                if self.controller.mode == "task":
                    from deltameta.deltas.state import load_meta_state

                    emb = load_meta_state(self.run_dir / "final").task_embedding_mean
                decisions = self.controller.decide(emb)
                with torch.no_grad():
                    probs = self.controller.probs(emb)
                self.controller.decision_heatmap(self.run_dir / "plots" / "controller_decisions.png", decisions, probs)
                atomic_write_text(self.run_dir / "controller_decisions.txt", self.controller.decision_table(decisions, probs))
        write_status(self.run_dir, "finished", step=self.step, skipped=self.skipped, rolled_back=self.rolled_back,
                     grad_spikes=self.grad_monitor.spikes,
                     initial_validation=self.initial_validation, final_validation=self.last_validation,
                     best_validation=self.best, export_error=export_error)
        return export_error


def _lm_loss_fn(model: nn.Module, groups: int | None):
    from deltameta.meta.functional import lm_loss_fn

    return lm_loss_fn(model, groups=groups, use_cache=False)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="meta-train", unit="step", dynamic_ncols=True)


def finished_result(run_dir: Path, config: MetaTrainConfig) -> TrainResult | None:
    """For ``--resume`` of a run that finished: its result if ``outer_steps`` does not extend it, else ``None``.

    A finished run is left unchanged (nothing is rewritten) unless ``outer_steps`` is larger than
    the steps it completed, which continues it from its last checkpoint.
    """
    status = read_status(run_dir)
    done = int(status.get("step") or 0)
    found = ckpt.list_checkpoints(run_dir)
    newest = found[-1][0] if found else 0
    if status.get("status") != "finished" or not (run_dir / "final").is_dir() or newest != done:
        return None  # not finished, or its outputs were removed / cut back: resume normally
    total = 0 if config.algorithm == "none" else config.outer_steps
    if total > done:
        logger.info("extending the finished run %s from step %d to outer_steps=%d", run_dir, done, total)
        return None
    logger.warning("%s already finished at step %d; nothing to do (pass outer_steps=N with N > %d to train further)",
                   run_dir, done, done)
    pair = lambda value: tuple(value) if value else None  # noqa: E731
    return TrainResult(run_dir, done, int(status.get("skipped") or 0), pair(status.get("initial_validation")),
                       pair(status.get("final_validation")), status.get("best_validation"), 0.0,
                       status.get("export_error"), already_finished=True,
                       grad_spikes=int(status.get("grad_spikes") or 0))


def run_meta_train(config: MetaTrainConfig, overwrite: bool = False, resume: bool = False,
                   model: tuple[nn.Module, Any] | None = None) -> TrainResult:
    """Prepare the run directory and train (the Python form of ``deltameta meta-train``).

    Args:
        config: The resolved config (``output_dir`` is the run directory).
        overwrite: Replace a previous run in ``output_dir``.
        resume: Continue the run in ``output_dir`` from its newest checkpoint.
        model: Optional preloaded fresh base ``(model, tokenizer)``.

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``) this initialises the process
    group (and destroys it at the end) and runs task-parallel (see :mod:`deltameta.meta.distributed`).

    Raises:
        ConfigError: the output directory holds another run (without ``overwrite``/``resume``);
            distributed: the meta-batch does not divide over the processes, or the ranks' configs differ.
        TrainingError: too many non-finite steps in a row.
    """
    from deltameta.meta.run_dir import prepare_run_dir

    dist, created = D.setup(config.device)
    with D.torn_down_after(created):
        D.check_run(config, dist)
        existed = Path(config.output_dir).expanduser().exists()
        run_dir = dist.run_on_main(prepare_run_dir, config.output_dir, overwrite=overwrite, resume=resume)
        if resume:
            done = finished_result(run_dir, config)
            if done is not None:
                return done
        try:
            trainer = MetaTrainer(config, run_dir, resume=resume, model=model, dist=dist, overwrite=overwrite)
        except BaseException:
            if not existed and dist.is_main:  # leave no empty folder behind a run that could not start
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise
        return trainer.train()
