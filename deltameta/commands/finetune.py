"""``deltameta finetune [--config RECIPE] [--overwrite] [key=value ...]``."""

from __future__ import annotations

import argparse

#: Keys a resumed run may change: they do not change what it computes.
RESUME_MUTABLE = ("progress", "plots", "report_to", "checkpoint_every")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``finetune`` subcommand."""
    from deltameta.commands import add_recipe_command
    from deltameta.finetune.config import FinetuneConfig

    return add_recipe_command(
        subparsers,
        "finetune",
        FinetuneConfig,
        help="fine-tune a meta-adapter (or a fresh LoRA) on your task; writes a PEFT adapter",
        description=(
            "Fine-tune an adapter on a task with standard PEFT training on a frozen base (NF4 = QLoRA, or "
            "quantization=none). Start from a meta-adapter (adapter=RUN_DIR, an exported PEFT dir, or "
            "adapters/<name>) or a fresh LoRA (no adapter). The task is any source 'deltameta tasks list' reads, "
            "or a jsonl file of {\"input\": ..., \"output\": ...} lines. The result, OUTPUT/best and OUTPUT/last, "
            "loads with PeftModel.from_pretrained. Keys come from the defaults, then the recipe, then key=value. "
            "It runs in one process: under torchrun / accelerate launch with several processes it refuses to start."
        ),
        examples=[
            "deltameta finetune",
            "deltameta finetune adapter=runs/meta-train tasks=my_task.jsonl steps=100 output_dir=runs/my-task",
            "deltameta finetune --config finetune/llama3_8b_qlora_24gb adapter=adapters/NAME tasks=data.jsonl",
            "deltameta finetune --resume runs/my-task",
        ],
        recipes="finetune",
        overwrite_help="replace a previous fine-tuning run in output_dir",
        run=run,
        options=[("--resume", dict(metavar="RUN_DIR", help="continue the stopped run in RUN_DIR from its last checkpoint "
                                   f"(only {', '.join(RESUME_MUTABLE)} may be overridden)"))],
    )


def run(args: argparse.Namespace) -> int:
    """Run ``deltameta finetune``."""
    from deltameta.config import build_config, resume_config
    from deltameta.errors import ConfigError
    from deltameta.finetune import FinetuneConfig, run_finetune

    from deltameta.finetune.trainer import check_single_process
    from deltameta.meta.distributed import env_world

    try:
        check_single_process()  # before anything is read or written
    except ConfigError:
        if env_world()[0] != 0:
            return 2  # rank 0 says it once
        raise
    if args.resume is not None:
        if args.overwrite:
            raise ConfigError("--resume continues the run in RUN_DIR; it cannot be combined with --overwrite.")
        config = resume_config(FinetuneConfig, args.resume, args.overrides, RESUME_MUTABLE, args.config, "finetune")
    else:
        config = build_config(FinetuneConfig, args.config, args.overrides)
    result = run_finetune(config, overwrite=args.overwrite, resume=args.resume is not None)
    lines = [
        f"finetune finished: {result.steps} steps in {result.seconds:.0f} s"
        + (" (stopped early)" if result.stopped_early else ""),
        f"training loss: {result.train_loss_before:.3f} -> {result.train_loss_after:.3f}",
    ]
    if result.best_val_loss is not None:
        lines.append(f"best validation loss: {result.best_val_loss:.3f}")
    lines.append(f"PEFT adapter: {result.adapter_dir}  (load with PeftModel.from_pretrained(base, DIR))")
    print("\n".join(lines))
    return 0
