"""``deltameta finetune [--config RECIPE] [--overwrite] [key=value ...]``."""

from __future__ import annotations

import argparse


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
            "loads with PeftModel.from_pretrained. Keys come from the defaults, then the recipe, then key=value."
        ),
        examples=[
            "deltameta finetune",
            "deltameta finetune adapter=runs/meta-train tasks=my_task.jsonl steps=100 output_dir=runs/my-task",
            "deltameta finetune --config finetune/llama3_8b_qlora_24gb adapter=adapters/NAME tasks=data.jsonl",
        ],
        recipes="finetune",
        overwrite_help="replace a previous fine-tuning run in output_dir",
        run=run,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``deltameta finetune``."""
    from deltameta.config import build_config
    from deltameta.finetune import FinetuneConfig, run_finetune

    config = build_config(FinetuneConfig, args.config, args.overrides)
    result = run_finetune(config, overwrite=args.overwrite)
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
