"""Pool a study's seeds: paired differences per seed and over all (seed, task) pairs.

Run (one ``--seed`` per seed; each names the evaluations that hold its methods, all on the same
episodes; ``DIR:method,method`` takes only those methods from DIR):

    python benchmarks/pool_seeds.py --step 2 \
        --seed runs/study/metasgd-lora-mc6-hold-kv/eval-families \
               runs/study/maml-lora-mc-hold-kv/eval-families:fresh-lora \
               runs/study/metasgd-lora-mc-hold-kv/eval-families:icl \
        --seed runs/study/metasgd-lora-mc6-hold-kv-seed1/eval-families \
               runs/study/metasgd-lora-mc6-hold-kv-seed1/eval-families-icl:icl \
        --pairs meta-multitask,meta-fresh-lora,meta-zero-shot,meta-icl

prints a markdown table (a column per seed, one pooled) and, with ``--out FILE``, writes it and
the numbers (``FILE`` with ``.json``). The pooled unit is the (seed, task) pair, or the task
averaged over seeds when the seeds evaluated the same tasks (``--unit``; see
``deltameta.evaluate.pooling``). Seeds may be adapters of different meta-train seeds scored on the
same episodes (one evaluation seed); the same adapters given twice are refused. ``--smoke DIR``
first runs two tiny evaluations (seeds 0 and 1, plus ICL of seed 0 as a separate part) under DIR
and pools them (the test suite does this). ``--earlier FILE.json`` adds the seeds of an earlier
pooling (the JSON its ``--out`` wrote) to the ones given, pooled by (seed, task) pairs from their
statistics, which is exact: for seeds whose evaluations are gone. ``--group-by REGEX`` adds the same
rows per group of tasks: a task's group is what ``re.search(REGEX, description)`` finds in the
description of its built-in task, regenerated from the evaluation's config (the first capture
group if the regex has one, else the match; ``(no match)`` where it finds nothing), e.g.
``--group-by ' through (\\w+)'`` groups ``string_op_pick`` tasks by their hidden operation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from deltameta.atomic import atomic_write_json, atomic_write_text
from deltameta.errors import ConfigError
from deltameta.evaluate.pooling import (SeedPart, SeedScores, extend_pooled, parse_pairs, pool_seeds, pooled_table,
                                        seed_scores)

SMOKE_EVAL = dict(model="tiny-random-llama", quantization="none", tasks="builtin:kv_lookup", splits="train=1",
                  split="train", builtin_tasks_per_family=2, builtin_examples_per_task=12, max_tasks=2, episodes=1,
                  shots=2, query_size=2, max_length=48, plots=False, progress=False)
NO_MATCH = "(no match)"


def _smoke_parts(root: Path) -> list[list[str]]:
    """Two tiny seeds; seed 0's ICL from a separate evaluation scored at step 0 only."""
    from deltameta.config import build_config
    from deltameta.evaluate import EvaluateConfig, run_evaluate

    runs = [(0, ["zero-shot", "fresh-lora"], [0, 1], "seed0"), (0, ["icl"], [0], "seed0-icl"),
            (1, ["zero-shot", "fresh-lora", "icl"], [0, 1], "seed1")]
    for seed, methods, steps, name in runs:
        config = build_config(EvaluateConfig, overrides=dict(SMOKE_EVAL, seed=seed, methods=methods, steps=steps,
                                                               output_dir=str(root / name)))
        run_evaluate(config, overwrite=True)
    return [[str(root / "seed0"), f"{root / 'seed0-icl'}:icl"], [str(root / "seed1")]]


def _read_earlier(args: argparse.Namespace) -> dict:
    """The JSON of an earlier pooling, checked against this one's step, key and unit."""
    path = Path(args.earlier)
    if args.unit == "task":
        raise ConfigError("--earlier pools (seed, task) pairs from statistics; --unit task cannot.")
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"--earlier {path}: cannot read it as JSON ({error}); give the .json that "
                          "pool_seeds.py --out wrote beside its table.") from None
    if not isinstance(earlier, dict) or "comparisons" not in earlier or "seeds" not in earlier:
        raise ConfigError(f"--earlier {path}: not a pooling's JSON (no 'comparisons'/'seeds').")
    for key, value in (("step", str(args.step)), ("key", args.key)):
        if str(earlier.get(key)) != value:
            raise ConfigError(f"--earlier {path}: pooled with {key}={earlier.get(key)}, this pooling has {key}={value}.")
    given = {spec.split(":")[0] for specs in earlier.get("seeds_given") or [] for spec in specs}
    again = [spec for specs in args.seed for spec in specs if spec.split(":")[0] in given]
    if again:
        raise ConfigError(f"--seed {again[0]}: already one of the earlier pooling's seeds ({path}).")
    return earlier


def _descriptions(seed: SeedScores) -> dict[str, str]:
    """Each task's description: the built-in tasks regenerated as ``deltameta evaluate`` read them.

    Args:
        seed: A seed's scores; its ``config`` is the evaluation's (``results.json`` ``config``).

    Returns:
        Task name -> description, for every task the seed evaluated.

    Raises:
        ConfigError: a task is not a built-in task, or not among the regenerated ones.
    """
    from deltameta.config import build_config
    from deltameta.evaluate import EvaluateConfig
    from deltameta.tasks import load_tasks
    from deltameta.tasks.builtin import SOURCE
    from deltameta.tasks.loader import data_options, source_parts

    keys = {f.name for f in dataclasses.fields(EvaluateConfig)}  # a key an older evaluate wrote is not read back
    config = build_config(EvaluateConfig, overrides={k: v for k, v in seed.config.items() if k in keys})
    builtin = [str(p) for p in source_parts(config.tasks) if str(p) == SOURCE or str(p).startswith(SOURCE + ":")]
    # the runner's own reading (load_tasks with data_options) minus its split and selection, which keep task names
    tasks = load_tasks(builtin, **data_options(config, builtin)) if builtin else []
    found = {t.name: t.description for t in tasks}
    for name in seed.episodes:
        if name in found:
            continue
        if len(builtin) < len(source_parts(config.tasks)):
            raise ConfigError(f"--group-by: task '{name}' of '{seed.name}' is not a built-in task (tasks="
                              f"'{config.tasks}'); --group-by needs built-in tasks, whose descriptions it regenerates "
                              "from the evaluation's config.")
        raise ConfigError(f"--group-by: task '{name}' of '{seed.name}' is not among the built-in tasks regenerated "
                          f"from its config (tasks='{config.tasks}', seed={config.seed}, builtin_tasks_per_family="
                          f"{config.builtin_tasks_per_family}); its description is unknown.")
    return {name: found[name] for name in seed.episodes}


def _group_of(pattern: re.Pattern[str], description: str) -> str:
    """The first capture group (the whole match if there is none, or it took no part) or :data:`NO_MATCH`."""
    match = pattern.search(description)
    if match is None:
        return NO_MATCH
    return match.group(1) if pattern.groups and match.group(1) is not None else match.group(0)


def _pool_groups(seeds: list[SeedScores], pattern: re.Pattern[str], pairs: list[tuple[str, str]] | None,
                 unit: str) -> dict[str, dict]:
    """:func:`pool_seeds` of each group's tasks, with the unit the pooling of all tasks chose.

    Returns:
        Group label -> pooled output, labels sorted with :data:`NO_MATCH` last.
    """
    labels = [{name: _group_of(pattern, text) for name, text in _descriptions(seed).items()} for seed in seeds]
    out = {}
    for group in sorted({g for by_task in labels for g in by_task.values()}, key=lambda g: (g == NO_MATCH, g)):
        # episodes left out: the pooling of all tasks already checked the seeds and chose the unit
        subset = [SeedScores({m: {t: v for t, v in scores.items() if by_task.get(t) == group}
                              for m, scores in seed.scores.items()}, {}, seed.config, seed.name, seed.trained)
                  for seed, by_task in zip(seeds, labels)]
        out[group] = pool_seeds(subset, pairs, unit)
    return out


def main(argv: list[str] | None = None) -> int:
    """Pool the seeds named on the command line; print (and with ``--out`` write) the table. Exit 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", nargs="+", action="append", default=[], metavar="DIR[:METHODS]",
                        help="the evaluations of one seed (repeat per seed)")
    parser.add_argument("--step", default=None, help="adaptation steps to compare after (default 2; 1 with --smoke)")
    parser.add_argument("--unit", default="auto", choices=["auto", "pair", "task"],
                        help="unit of the pooled CI: (seed, task) pairs, or tasks averaged over seeds (default: "
                             "pairs unless seeds share episodes, or task names repeat across seeds that are not "
                             "seed-generated built-in tasks)")
    parser.add_argument("--key", default="accuracy", choices=["accuracy", "accuracy_norm"])
    parser.add_argument("--pairs", default="", help="comma-separated A-B pairs (default: every trained method "
                                                    "against multitask, fresh-lora, zero-shot)")
    parser.add_argument("--labels", default="", help="comma-separated column names of the seeds")
    parser.add_argument("--out", default=None, help="also write the table to this .md file (and the numbers "
                                                     "beside it as .json)")
    parser.add_argument("--earlier", default=None, metavar="FILE.json",
                        help="the numbers an earlier pooling wrote beside its --out table: its seeds come first and "
                             "the pooled CI covers every (seed, task) pair of all seeds, exactly as if their "
                             "evaluations were given (for seeds whose evaluations are gone)")
    parser.add_argument("--smoke", default=None, metavar="DIR", help="tiny evaluations under DIR, then pool them")
    parser.add_argument("--group-by", default=None, metavar="REGEX",
                        help="also pool per group of tasks: re.search(REGEX, description) of each built-in task "
                             "(regenerated from the evaluation's config) gives its group, the first capture group "
                             f"if any, else the match; '{NO_MATCH}' where it does not match")
    args = parser.parse_args(argv)
    try:
        if args.out and Path(args.out).suffix != ".md":
            raise ConfigError(f"--out {args.out}: expected a .md file (the numbers go beside it as .json).")
        if args.smoke and args.seed:
            raise ConfigError("--smoke pools its own tiny evaluations; drop --seed (or --smoke to pool yours).")
        if not args.smoke and not args.seed:
            raise ConfigError("name the evaluations of each seed with --seed DIR [DIR:METHODS ...] (repeat per seed).")
        args.step = args.step or ("1" if args.smoke else "2")
        seeds = _smoke_parts(Path(args.smoke)) if args.smoke else args.seed
        earlier = _read_earlier(args) if args.earlier else None
        if earlier and args.group_by:
            raise ConfigError("--group-by needs every task's scores; an --earlier pooling holds only statistics.")
        try:
            pattern = re.compile(args.group_by) if args.group_by else None
        except re.error as error:
            raise ConfigError(f"--group-by {args.group_by!r}: not a regular expression ({error}).") from None
        scores = [seed_scores([SeedPart.parse(spec) for spec in specs], args.step, args.key) for specs in seeds]
        pairs = parse_pairs(args.pairs) if args.pairs else None
        pooled = pool_seeds(scores, pairs, "pair" if earlier else args.unit)
        groups = _pool_groups(scores, pattern, pairs, pooled["unit"]) if pattern else {}
        if earlier:
            pooled = extend_pooled(earlier, pooled)
            seeds = list(earlier.get("seeds_given") or [[]] * earlier["seeds"]) + list(seeds)
        labels = [s.strip() for s in args.labels.split(",") if s.strip()] or None
        if labels and len(labels) != pooled["seeds"]:
            raise ConfigError(f"--labels names {len(labels)} seeds, there are {pooled['seeds']}.")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = (f"Paired differences of {args.key} after {args.step} steps (percentage points; mean ± 95% CI; "
             f"{pooled['convention']}):\n\n" + pooled_table(pooled, labels))
    for group, entry in groups.items():
        table += f"\nGroup `{group}` of the tasks' descriptions (--group-by `{args.group_by}`):\n\n"
        table += pooled_table(entry, labels)
    print(table)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out, table)
        extra = dict(group_by=args.group_by, groups=groups) if groups else {}
        atomic_write_json(out.with_suffix(".json"), dict(pooled, step=args.step, key=args.key, seeds_given=seeds,
                                                         **extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
