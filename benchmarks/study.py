"""The compute-matched study: does a meta-learned adapter adapt better than its multitask twin?

Run (one configuration; every stage is skipped when its output already exists, and a stopped
meta-training continues from its newest checkpoint, so a study can be run in pieces across working
sessions and resumed):

    python benchmarks/study.py --name fomaml-lora [--bigbench ../shared/data/bigbench-lite] \
        [--out runs/study] [--stages meta,multitask,eval-rules,eval-families,eval-dev,report] \
        [--heldout-families kv_lookup] [--mix-builtin kv_lookup] [--eval "max_tasks=12 episodes=4"] \
        [--checkpoint best] -- algorithm=fomaml delta=lora controller=none inner_steps=2

For one configuration (the ``key=value`` overrides after ``--`` go to both meta-trainings):

1. ``meta``: ``deltameta meta-train`` with the study recipe and the overrides;
2. ``multitask``: the same command with ``algorithm=multitask`` (same tasks, episodes, passes and
   tokens: the compute-matched baseline; ``first_order``, which says only how a meta-learner
   differentiates its inner loop, is left out);
3. ``eval-rules``: ``deltameta evaluate`` on *new tasks of the meta-training families* (hidden rules
   never seen: task indices ``--tasks-per-family`` .. 2x-1 of each meta-training family);
4. ``eval-families``: on the held-out built-in families (the ``validation`` split, or the families
   named by ``--heldout-families`` when the meta-train reads only some built-in families);
5. ``eval-dev``: on bigbench-lite ``dev`` (only with ``--bigbench``; never meta-trained on);
   ``--mix-builtin FAMILIES`` meta-trains on BIG-bench ``meta_train`` plus those built-in families
   (then ``eval-rules`` measures new rules of the built-in ones);
6. ``report``: one markdown row per evaluation and method (accuracy after the adapter's trained
   number of inner steps, paired differences against the baselines with 95% CIs), appended to
   ``OUT/study.md`` and printed.

Every method of an evaluation runs on the same episodes; the meta-adapter is adapted with the inner
loop it was meta-trained for (the evaluate command's default). ``--checkpoint best`` evaluates both
meta-trainings' ``best/`` state (lowest validation query loss after adaptation) instead of the final
one; it needs validation on tasks no evaluation reads, during training:
``val_holdout=0.125 val_holdout_unit=task eval_every=10`` after ``--``, say (LoRA only: a TARP
``best/`` has no fold statistics). ``--model tiny-random-llama`` with ``--smoke`` runs the whole
pipeline in seconds (the test suite does this).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("meta", "multitask", "eval-rules", "eval-families", "eval-dev", "report")
#: Study recipe on top of the default meta-train recipe (built-in families, split by family).
STUDY_KEYS = {"tasks": "builtin", "splits": "train=0.75,validation=0.25", "eval_every": 0, "plots": "false",
              "progress": "false"}
SMOKE_KEYS = {"model": "tiny-random-llama", "quantization": "none", "builtin_tasks_per_family": 2,
              "builtin_examples_per_task": 24, "max_length": 64, "outer_steps": 2, "eval_tasks": 2, "rank": 2,
              "controller": "none", "target_modules": "[q_proj,v_proj]", "checkpoint_every": 0}
SMOKE_EVAL = {"model": "tiny-random-llama", "quantization": "none", "episodes": 2, "query_size": 4,
              "max_length": 64, "max_tasks": 2, "plots": "false", "progress": "false"}


def _deltameta(args: list[str], log: Path, append: bool = False) -> float:
    """Run ``python -m deltameta ARGS`` with its output in ``log`` (appended to it when ``append``); return the wall seconds."""
    started = time.perf_counter()
    with log.open("a" if append else "w", encoding="utf-8") as out:
        proc = subprocess.run([sys.executable, "-m", "deltameta", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=dict(os.environ), check=False)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"`deltameta {' '.join(args)}` failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - started


def _keys(mapping: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in mapping.items()]


def _override_dict(overrides: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in overrides)


def _train_families(meta_run: Path) -> tuple[list[str], int, int, int]:
    """The built-in meta-training families of a run, its tasks per family, examples per task and seed."""
    import yaml

    from deltameta.tasks import load_tasks
    from deltameta.tasks.builtin import FAMILIES

    config = yaml.safe_load((meta_run / "config.yaml").read_text(encoding="utf-8"))
    per_family = int(config["builtin_tasks_per_family"])
    splits = load_tasks(config["tasks"], splits=config["splits"], seed=config["seed"],
                        builtin_tasks_per_family=per_family,
                        builtin_examples_per_task=config["builtin_examples_per_task"])
    families = sorted({t.family for t in splits[config["train_split"]] if t.family in FAMILIES})
    return families, per_family, int(config["builtin_examples_per_task"]), int(config["seed"])


#: Meta-train keys that describe only how a meta-learner differentiates through its inner loop or what
#: its outer loss adds at the meta-parameters (no pass of its own); the multitask twin has no inner loop,
#: and meta-train refuses ``first_order=false`` and ``init_loss_weight > 0`` with it.
META_ONLY_KEYS = ("first_order", "init_loss_weight")


def twin_keys(keys: dict[str, Any]) -> dict[str, Any]:
    """The multitask twin's meta-train keys: the meta-learner's, with ``algorithm=multitask``.

    Everything that decides the data, passes and tokens is kept; only :data:`META_ONLY_KEYS` go.
    """
    twin = {k: v for k, v in keys.items() if k not in META_ONLY_KEYS}
    twin["algorithm"] = "multitask"
    return twin


def mixed_splits(out: Path, bigbench: str, families: list[str]) -> dict[str, str]:
    """Meta-train keys that mix built-in families into BIG-bench's ``meta_train`` split.

    Writes ``OUT/splits-mixed.json``: bigbench-lite's ``splits.json`` with the built-in families
    added to ``meta_train`` (``dev`` unchanged, so it stays unseen).

    Returns:
        The ``tasks``, ``splits``, ``train_split`` and ``val_split`` keys of the mixed meta-train.

    Raises:
        SystemExit: an unknown built-in family.
    """
    from deltameta.tasks.builtin import FAMILIES

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"--mix-builtin: unknown built-in families {', '.join(unknown)}; valid: {', '.join(FAMILIES)}.")
    splits = json.loads((Path(bigbench) / "splits.json").read_text(encoding="utf-8"))
    splits["meta_train"] = list(splits["meta_train"]) + list(families)
    splits["description"] = f"bigbench-lite splits.json with the built-in families {', '.join(families)} in meta_train"
    path = out / "splits-mixed.json"
    path.write_text(json.dumps(splits, indent=1), encoding="utf-8")
    return {"tasks": f"builtin:{','.join(families)}+{bigbench}", "splits": str(path), "train_split": "meta_train",
            "val_split": ""}


def evaluations(out: Path, meta_run: Path, bigbench: str | None, smoke: bool,
                heldout_families: list[str] | None = None, checkpoint: str = "final") -> dict[str, dict[str, Any]]:
    """The evaluate overrides of each evaluation stage (only those that apply).

    Args:
        checkpoint: ``final`` evaluates the two runs (their final state); ``best`` their ``best/`` state.

    Raises:
        SystemExit: a family of ``heldout_families`` is one the meta-train read, or a run has no
            ``best/`` state to evaluate.
    """
    families, per_family, examples, seed = _train_families(meta_run)
    new_rules = [f"{family}__{i:03d}" for family in families for i in range(per_family, 2 * per_family)]
    stages: dict[str, dict[str, Any]] = {
        "eval-families": {"tasks": "builtin", "splits": "train=0.75,validation=0.25", "split": "validation",
                          "builtin_tasks_per_family": per_family, "builtin_examples_per_task": examples,
                          "seed": seed},
    }
    if families:  # new rules of the built-in families meta-trained on (none for a BIG-bench-only run)
        stages["eval-rules"] = {"tasks": "builtin:" + ",".join(families), "splits": "", "split": "",
                                "builtin_tasks_per_family": 2 * per_family, "builtin_examples_per_task": examples,
                                "task_names": "[" + ",".join(new_rules) + "]", "seed": seed}
    if heldout_families:
        seen = sorted(set(heldout_families) & set(families))
        if seen:
            raise SystemExit(f"--heldout-families {','.join(heldout_families)}: {', '.join(seen)} "
                             f"were meta-trained on (the meta-train read {', '.join(families)}).")
        stages["eval-families"] = {"tasks": "builtin:" + ",".join(heldout_families), "splits": "", "split": "",
                                   "builtin_tasks_per_family": per_family, "builtin_examples_per_task": examples,
                                   "seed": seed}
    if bigbench:
        stages["eval-dev"] = {"tasks": bigbench, "splits": str(Path(bigbench) / "splits.json"), "split": "dev",
                              "seed": seed}
    adapters = {"adapter": meta_run, "multitask_adapter": out / "multitask"}
    if checkpoint == "best":
        adapters = {key: run / "best" for key, run in adapters.items()}
        missing = [str(path) for path in adapters.values() if not (path / "delta_config.json").is_file()]
        if missing:
            raise SystemExit(f"--checkpoint best: no best/ meta-state in {', '.join(missing)}; it is kept only when "
                             "the meta-train validates (val_holdout > 0 with eval_every > 0).")
    for keys in stages.values():
        keys.update({key: str(path) for key, path in adapters.items()})
        if smoke:
            keys.update(SMOKE_EVAL)
    return stages


def _check_selection_keys(parser: argparse.ArgumentParser, keys: dict[str, Any]) -> None:
    """Refuse ``--checkpoint best`` unless both meta-trainings validate, during training, on tasks no evaluation reads."""
    from deltameta.meta.config import MetaTrainConfig

    try:
        holdout, every = float(keys.get("val_holdout", 0) or 0), int(keys.get("eval_every", 0) or 0)
    except ValueError:
        parser.error(f"val_holdout={keys.get('val_holdout')} eval_every={keys.get('eval_every')}: expected a "
                     "fraction and an integer.")
    if holdout <= 0:
        parser.error("--checkpoint best needs val_holdout > 0 after -- (e.g. val_holdout=0.125 val_holdout_unit=task): "
                     "the study's validation split is what eval-families evaluates, so selecting on it would leak.")
    if every <= 0:
        parser.error("--checkpoint best needs eval_every > 0 after --: with eval_every=0 the only validation is at "
                     "the last step, so best/ would be the final state.")
    if str(keys.get("delta", MetaTrainConfig.delta)) == "tarp":
        parser.error("--checkpoint best: a TARP run's best/ has no fold statistics, so its static export would fold "
                     "on a default text; use delta=lora, or --checkpoint final.")


def _check_eval_overrides(parser: argparse.ArgumentParser, overrides: list[str]) -> None:
    """Refuse ``--eval`` overrides that ``deltameta evaluate`` would refuse, before any training."""
    from deltameta.config import build_config
    from deltameta.errors import ConfigError
    from deltameta.evaluate import EvaluateConfig

    try:
        build_config(EvaluateConfig, overrides=overrides)
    except ConfigError as error:
        parser.error(f"--eval: {error}")


def _check_evaluated(results_file: Path, eval_keys: dict[str, Any], checkpoint: str) -> None:
    """Refuse to reuse an evaluation of other adapters (e.g. of final/ when ``--checkpoint best`` is asked)."""
    config = json.loads(results_file.read_text(encoding="utf-8")).get("config", {})
    for key in ("adapter", "multitask_adapter"):
        recorded = config.get(key)
        if recorded is not None and Path(str(recorded)).resolve() != Path(str(eval_keys[key])).resolve():
            raise SystemExit(f"{results_file} evaluated {key}={recorded}, not {eval_keys[key]} (--checkpoint "
                             f"{checkpoint}); remove {results_file.parent} to evaluate again, or use another --name.")


def _trained_step(results: dict[str, Any]) -> str:
    """The meta-adapter's recorded number of inner steps (the step its evaluation is judged at)."""
    for method in ("meta-dynamic", "meta"):
        recorded = ((results.get("methods", {}).get(method) or {}).get("inner_loop") or {}).get("recorded") or {}
        if recorded.get("steps") is not None:
            return str(recorded["steps"])
    return str(max(results["steps"]))


def _report_rows(name: str, stage: str, results: dict[str, Any]) -> list[str]:
    """Markdown rows: accuracy of each method at the trained step and the last step, paired differences."""
    from deltameta.evaluate.report import format_pct  # "mean ± ci" in points, no CI with one task

    summary = results["summary"]
    trained, last = _trained_step(results), str(max(results["steps"]))
    rows = []
    for method, by_step in summary["methods"].items():
        for step in dict.fromkeys([trained, last]):
            acc, norm = by_step.get(step), summary["methods_norm"].get(method, {}).get(step)
            if acc is None:
                continue
            diffs = []
            for pair, stats in summary["comparisons"].items():
                if pair.startswith(method + " - ") and step in stats:
                    d = stats[step]
                    diffs.append(f"{pair.split(' - ', 1)[1]} {format_pct(d, signed=True)}" + ("*" if d.get("excludes_zero") else ""))
            norm_cell = f"{100 * norm['mean']:.1f}" if norm else "n/a"
            rows.append(f"| {name} | {stage} | {method} | {step} | {format_pct(acc)} | "
                        f"{norm_cell} | {acc['n']} | {'; '.join(diffs)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="configuration name (a folder under --out)")
    parser.add_argument("--out", default="runs/study", help="study root folder")
    parser.add_argument("--bigbench", default=None, help="bigbench-lite folder (with splits.json) for eval-dev")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    parser.add_argument("--model", default=None, help="base model alias (default: the recipe's)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--eval", default="", help="extra evaluate overrides for every evaluation stage, "
                        "space-separated key=value (e.g. 'max_tasks=12 episodes=4 steps=[0,2,5]')")
    parser.add_argument("--heldout-families", default="",
                        help="comma-separated built-in families for eval-families, none of them meta-trained on "
                             "(default: the validation split of all built-in families)")
    parser.add_argument("--mix-builtin", default="",
                        help="comma-separated built-in families to meta-train on beside BIG-bench meta_train "
                             "(needs --bigbench; dev stays unseen)")
    parser.add_argument("--checkpoint", choices=("final", "best"), default="final",
                        help="which state of the two meta-trainings to evaluate: final/, or best/ (lowest validation "
                             "query loss after adaptation; needs validation in both)")
    parser.add_argument("overrides", nargs="*", help="key=value meta-train overrides (after --)")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
    explicit = args.stages != ",".join(STAGES)  # the default runs the evaluations that apply
    if explicit and "eval-dev" in stages and not args.bigbench:
        parser.error("stage eval-dev needs --bigbench (the bigbench-lite folder with splits.json)")
    for words, where in ((args.overrides, "after --"), (args.eval.split(), "--eval")):
        bad = [word for word in words if "=" not in word]
        if bad:
            parser.error(f"{where}: {' '.join(bad)} is not key=value (e.g. shots=8).")
    if args.eval:
        _check_eval_overrides(parser, args.eval.split())
    out = Path(args.out) / args.name
    out.mkdir(parents=True, exist_ok=True)
    keys = dict(STUDY_KEYS)
    if args.smoke:
        keys.update(SMOKE_KEYS)
    if args.model:
        keys["model"] = args.model
    if args.mix_builtin:
        if not args.bigbench:
            parser.error("--mix-builtin needs --bigbench (the BIG-bench meta_train tasks it mixes with)")
        keys.update(mixed_splits(out, args.bigbench, [f for f in args.mix_builtin.split(",") if f]))
    keys.update(_override_dict(args.overrides))
    if args.checkpoint == "best":
        _check_selection_keys(parser, keys)
    timings = {}
    for run in ("meta", "multitask"):
        if run in stages and not (out / run / "final").exists():
            if any((out / run / "checkpoints").glob("step-*")):  # a stopped run: continue it, lose nothing
                timings[run] = _deltameta(["meta-train", "--resume", str(out / run)], out / f"{run}.log", append=True)
                continue
            run_keys = dict(keys, output_dir=str(out / run))
            if run == "multitask":
                run_keys = twin_keys(run_keys)
            timings[run] = _deltameta(["meta-train", "--overwrite", *_keys(run_keys)], out / f"{run}.log")
    wanted = [s for s in stages if s.startswith("eval-")]
    if wanted:
        available = evaluations(out, out / "meta", args.bigbench, args.smoke,
                                [f for f in args.heldout_families.split(",") if f], args.checkpoint)
        if explicit and "eval-rules" in wanted and "eval-rules" not in available:
            parser.error("stage eval-rules does not apply: the meta-train read no built-in family "
                         "(its trained stages are kept; drop eval-rules from --stages)")
        for stage, eval_keys in available.items():
            if stage in wanted and (out / stage / "results.json").exists():
                _check_evaluated(out / stage / "results.json", eval_keys, args.checkpoint)
            elif stage in wanted:
                if args.model and not args.smoke:
                    eval_keys["model"] = args.model
                eval_keys.update(_override_dict(args.eval.split()))
                eval_keys["output_dir"] = str(out / stage)
                timings[stage] = _deltameta(["evaluate", "--overwrite", *_keys(eval_keys)], out / f"{stage}.log")
    if timings:
        previous = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
        (out / "timings.json").write_text(json.dumps({**previous, **timings}, indent=2))
    if "report" in stages:
        rows = []
        for stage in ("eval-rules", "eval-families", "eval-dev"):
            path = out / stage / "results.json"
            if path.exists():
                results = json.loads(path.read_text(encoding="utf-8"))
                state = Path(str(results.get("config", {}).get("adapter", ""))).name == "best"
                rows += _report_rows(args.name, stage + (" (best/)" if state else ""), results)
        header = ["| config | evaluation | method | step | accuracy % ± 95% CI | acc_norm % | tasks | "
                  "paired differences, points ± 95% CI (* excludes 0) |", "|---|---|---|---|---|---|---|---|"]
        text = "\n".join(header + rows) + "\n"
        (out / "study.md").write_text(text, encoding="utf-8")
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
