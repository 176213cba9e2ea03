"""``deltameta meta-train [--config RECIPE] [--resume RUN_DIR] [--overwrite] [key=value ...]``."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

#: Keys that may differ from the saved config when resuming (they do not change the trajectory).
RESUME_MUTABLE = ("progress", "plots", "export", "report_to")
#: The one trajectory key a resume may change: ``outer_steps`` extends a finished or stopped run.
RESUME_EXTEND = "outer_steps"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``meta-train`` subcommand."""
    from deltameta.commands import add_recipe_command
    from deltameta.meta.config import MetaTrainConfig

    return add_recipe_command(
        subparsers,
        "meta-train",
        MetaTrainConfig,
        help="meta-learn adapter deltas (+ architecture controller) on a frozen 4-bit base",
        description=(
            "Meta-train low-rank adapter deltas with FOMAML / MAML / Reptile / Meta-SGD (or the multitask "
            "baseline) over a distribution of tasks. With no arguments: smollm2-135m in NF4, built-in task "
            "families, TARP deltas with a global architecture controller, first-order MAML (a few minutes on "
            "a 2-core CPU). Keys come from the defaults, then the recipe, then key=value overrides."
        ),
        examples=[
            "deltameta meta-train",
            "deltameta meta-train --config meta_train/smollm2_135m_tarp_bigbench tasks=../shared/data/bigbench-lite",
            "deltameta meta-train algorithm=maml inner_steps=1 outer_steps=20 output_dir=runs/maml",
            "deltameta meta-train --resume runs/meta-train",
            "torchrun --nproc_per_node 2 -m deltameta meta-train meta_batch_size=4   # task-parallel, see docs/distributed.md",
        ],
        recipes="meta_train",
        overwrite_help="replace a previous run in output_dir",
        run=run,
        options=[("--resume", dict(metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint"))],
    )


def resolve_config(recipe: str | None, overrides: list[str], resume: str | None):
    """Build the run's config; with ``resume``, the saved ``config.yaml`` of the run.

    Raises:
        ConfigError: a bad key or value, ``--resume`` together with ``--config``, or an override
            that would change a resumed run's trajectory.
    """
    from deltameta.config import build_config, resume_config
    from deltameta.meta.config import MetaTrainConfig

    if resume is None:
        return build_config(MetaTrainConfig, recipe, overrides)
    return resume_config(MetaTrainConfig, resume, overrides, RESUME_MUTABLE, recipe, "meta-train", extend=RESUME_EXTEND)


def run(args: argparse.Namespace) -> int:
    """Run ``deltameta meta-train``."""
    from deltameta.meta.distributed import env_world
    from deltameta.meta.stability import SPIKE_FACTOR
    from deltameta.meta.trainer import run_meta_train

    config = resolve_config(args.config, args.overrides, args.resume)
    result = run_meta_train(config, overwrite=args.overwrite, resume=args.resume is not None)
    if env_world()[0] != 0:  # under torchrun / accelerate launch, rank 0 reports
        return 0
    if result.already_finished:
        print(f"meta-train: {result.run_dir} already finished at step {result.steps}; nothing changed "
              f"(pass outer_steps=N with N > {result.steps} to train it further)")
        return 0
    lines = [f"meta-train finished: {result.steps} steps in {result.seconds:.0f} s ({result.skipped} skipped)",
             f"run directory: {result.run_dir}"]
    if result.initial_validation and result.final_validation:
        (b0, a0), (b1, a1) = result.initial_validation, result.final_validation
        lines.append(
            f"held-out query loss after adaptation: {a0:.3f} (fresh adapter) -> {a1:.3f} (meta-learned); "
            f"before adaptation: {b0:.3f} -> {b1:.3f}"
        )
    if result.grad_spikes:
        lines.append(
            f"warning: {result.grad_spikes} outer step(s) had a meta-gradient norm over "
            f"{SPIKE_FACTOR:g}x the recent median (meta_grad_spike in {result.run_dir / 'metrics.jsonl'}); "
            "meta-training may have been unstable"
        )
    if result.export_error:
        lines.append(f"PEFT export failed: {result.export_error} (the meta-state is in {result.run_dir / 'final'})")
    else:
        lines.append(f"PEFT adapter: {result.run_dir / 'peft'}" if config.export else "PEFT export skipped (export=false)")
    print("\n".join(lines))
    return 0
