"""``deltameta export RUN_DIR --out DIR [--push-to-hub REPO_ID]``: write a meta-trained run as a PEFT LoRA adapter."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="export a meta-trained run as a PEFT LoRA adapter",
        description=(
            "Export the finished meta-state of a run (RUN_DIR/final, or a meta-state directory) as a "
            "standard PEFT LoRA adapter: adapter_config.json, adapter_model.safetensors and a model card. "
            "TARP deltas are folded into lora_B with a least-squares static fold (its error on held-out "
            "examples is printed and written to the card); their exact dynamic part goes to "
            "deltameta_tarp.safetensors (load it with deltameta.load_meta_adapter). The adapter is never "
            "merged into the base."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="meta-training run directory (or a meta-state directory)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output adapter directory: new or empty, or a previous deltameta export (with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous deltameta export in --out "
                        "(nothing else is ever replaced)")
    parser.add_argument(
        "--task-examples",
        metavar="FILE",
        help='jsonl file of {"input": ..., "output": ...} lines of the target task: the task-conditioned '
        "controller chooses the structure for it and TARP is folded on it",
    )
    parser.add_argument("--device", default="cpu", help="device to build the model on (default: cpu)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="then upload the export to this Hugging Face Hub model repo (org/name; created if "
                        "needed; log in first with `hf auth login` or set HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``deltameta export``."""
    from deltameta.deltas.export import describe_fold_error, export_peft
    from deltameta.hub import check_can_push, push_to_hub

    if args.push_to_hub:
        check_can_push(args.push_to_hub)  # before any work: offline or a malformed id fails at once
    result = export_peft(args.run_dir, args.out, task_examples=args.task_examples, device=args.device,
                         overwrite=args.overwrite)
    kept = sum(op != "skip" for op in result.decisions.values())
    print(f"exported {kept} of {len(result.decisions)} sublayers to {result.path}")
    fold_line = describe_fold_error(result.fold_error)
    if fold_line:
        print(fold_line)
    if args.push_to_hub:
        url = push_to_hub(result.path, args.push_to_hub, private=args.private,
                          commit_message=f"deltameta export of {args.run_dir}")
        print(f"pushed to https://huggingface.co/{args.push_to_hub} ({url})")
    return 0
