"""``deltameta evaluate [--config RECIPE] [--overwrite] [key=value ...]``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``evaluate`` subcommand."""
    from deltameta.commands import add_recipe_command
    from deltameta.evaluate.config import EvaluateConfig

    return add_recipe_command(
        subparsers,
        "evaluate",
        EvaluateConfig,
        help="few-shot adaptation on held-out tasks: meta-adapter vs zero-shot, ICL, fresh LoRA, multitask",
        description=(
            "Compare, on the same episodes of held-out tasks: zero-shot, icl (k demonstrations in the prompt), "
            "fresh-lora, multitask (adapter of a meta-train run with algorithm=multitask), meta (the meta-adapter's "
            "static PEFT export) and meta-dynamic (with TARP's dynamic part; multitask-dynamic, on request, adapts the "
            "multitask adapter the same way), each after 0..K adaptation steps on "
            "the k-shot support set, scored on the query set. Writes results.json, results.md (mean accuracy "
            "with 95% CIs across tasks, and paired differences of every trained method against multitask, "
            "fresh-lora and zero-shot with their 95% CIs, also with the family as the unit when a family holds several tasks) and plots/."
        ),
        examples=[
            "deltameta evaluate model=tiny-random-llama quantization=none episodes=2",
            "deltameta evaluate --config evaluate/smollm2_135m_bigbench_dev adapter=runs/meta "
            "multitask_adapter=runs/multitask",
            "deltameta evaluate tasks=../shared/data/bigbench-lite splits=../shared/data/bigbench-lite/splits.json "
            "split=dev adapters='{meta: runs/meta, multitask: runs/multitask}' steps=[0,5,10]",
        ],
        recipes="evaluate",
        overwrite_help="replace previous results in output_dir",
        run=run,
        options=[("--merge", dict(nargs="+", metavar="DIR", default=None,
                                  help="instead of evaluating, merge the results of evaluations of different methods on "
                                       "the same episodes (their output dirs) into output_dir"))],
    )


def run(args: argparse.Namespace) -> int:
    """Run ``deltameta evaluate``."""
    from deltameta.config import build_config
    from deltameta.evaluate import EvaluateConfig, run_evaluate
    from deltameta.evaluate.report import format_pct

    if args.merge:  # `--merge A B output_dir=X`: argparse hands the key=value words to --merge
        words = list(args.merge)
        args.merge = [w for w in words if "=" not in w or Path(w).exists()]
        args.overrides = [*args.overrides, *(w for w in words if w not in args.merge)]
        if not args.merge:
            from deltameta.errors import ConfigError

            raise ConfigError("--merge needs the output dirs of finished evaluations, e.g. "
                              "--merge runs/eval-a runs/eval-b output_dir=runs/eval-merged")
    config = build_config(EvaluateConfig, args.config, args.overrides)
    if args.merge:
        from deltameta.evaluate import merge_evaluations

        results = merge_evaluations(args.merge, config.output_dir, overwrite=args.overwrite)
    else:
        results = run_evaluate(config, overwrite=args.overwrite)
    steps = [str(s) for s in results["steps"]]
    summary = results["summary"]["methods"]
    width = max(len(m) for m in results["methods"])
    episodes = len(next(iter(results["tasks"].values()))["episodes"]) if results["tasks"] else 0
    lines = [f"evaluated {len(results['methods'])} methods on {len(results['tasks'])} tasks x {episodes} episodes "
             f"in {results['timing']['seconds']:.0f} s; accuracy % (95% CI across tasks):",
             f"{'method':<{width}}  " + "  ".join(f"{s + ' steps':>14}" for s in steps)]
    for method in results["methods"]:
        lines.append(f"{method:<{width}}  " + "  ".join(f"{format_pct(summary[method][s]):>14}" for s in steps))
    for warning in results.get("warnings", []):
        lines.append(f"warning: {warning}")
    lines.append(f"results: {config.output_dir}/results.json, table: {config.output_dir}/results.md, plots: {config.output_dir}/plots/")
    print("\n".join(lines))
    return 0
