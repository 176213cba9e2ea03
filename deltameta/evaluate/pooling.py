"""Pool paired comparisons over a study's seeds.

A study's seeds are replications, so one seed's 95% CI over 30 tasks is wide, and the question is
what the seeds say together. :func:`pool_seeds` gives, per method pair, the paired difference of
every seed and of all seeds pooled. The unit of the pooled interval (``unit``):

- ``pair``: each (seed, task) pair, for seeds that evaluate *different* tasks: the built-in families
  generate each seed's tasks from that seed, so ``kv_lookup__000`` of seed 1 is another rule than
  that of seed 0;
- ``task``: each task, its difference averaged over the seeds that evaluated it, for seeds that
  evaluate the *same* tasks (e.g. bigbench-lite ``dev``), whose pairs would not be independent;
- ``auto`` (default): ``pair`` when no task name repeats across seeds, or when every seed read
  built-in tasks with its own seed; else ``task``.

Seeds may share episodes: adapters meta-trained with different seeds and all evaluated with one
evaluation seed is the tighter paired design (every seed's baselines score the very same queries).
Their pooled unit is then the task; ``pair`` is refused, since a task's pairs are not independent.
Two seeds whose shared episodes carry identical scores of every trained method are the same
adapters given twice, and are refused.

Seeds whose evaluations are gone pool from the statistics an earlier pooling wrote
(:func:`extend_pooled`; exact for the ``pair`` unit, see :func:`pool_summaries`).

One seed's methods may come from several evaluations of *the same episodes* (a baseline evaluated
later, ICL from another run): a :class:`SeedPart` names an evaluation and the methods taken from it.
The parts of a seed must have evaluated the same tasks with the same episodes, model, quantization
and max_length. A method that does not train (``zero-shot``, ``icl``) scores the same after any
number of steps, so a part that scored it only at step 0 serves every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from deltameta.errors import ConfigError
from deltameta.evaluate.config import METHODS, TRAINING_METHODS
from deltameta.evaluate.report import (check_same_episodes, comparison_pairs, format_diff, mean_ci, t_quantile,
                                       task_means, with_verdict)
from deltameta.evaluate.runner import load_results

#: Config fields the parts of one seed must share (the episodes check covers seed, shots and query size).
SAME_CONFIG = ("model", "quantization", "compute_dtype", "max_length")
Unit = Literal["auto", "pair", "task"]


@dataclass(frozen=True)
class SeedPart:
    """One evaluation's contribution to a seed.

    Attributes:
        path: An evaluation's output dir (or its ``results.json``).
        methods: The methods taken from it (empty: all of them).
    """

    path: Path
    methods: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> SeedPart:
        """Read ``DIR`` or ``DIR:method,method``.

        Args:
            spec: An evaluation's output dir, optionally with the methods taken from it after the
                last ``:`` (an existing path is taken whole, colons included).

        Raises:
            ConfigError: nothing follows the ``:``.
        """
        if ":" not in spec or Path(spec).exists():
            return cls(Path(spec))
        path, methods = spec.rsplit(":", 1)
        names = tuple(m.strip() for m in methods.split(",") if m.strip())
        if not names:
            raise ConfigError(f"'{spec}': name the methods after ':' (e.g. {path}:icl,zero-shot).")
        return cls(Path(path), names)

    def load(self) -> dict[str, Any]:
        """The ``results.json`` content of this part (see :func:`~deltameta.evaluate.runner.load_results`)."""
        return load_results(self.path)


@dataclass
class SeedScores:
    """One seed's per-task scores, and what identifies its tasks and episodes.

    Attributes:
        scores: ``{method: {task: mean over the task's episodes}}``.
        episodes: ``{task: episode fingerprints}``.
        config: The first part's evaluation config.
        name: How errors name the seed (its first part).
        trained: The methods of ``scores`` that train (their scores depend on the seed's adapters).
    """

    scores: dict[str, dict[str, float]]
    episodes: dict[str, list[Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    trained: tuple[str, ...] = ()


def _trains(results: dict[str, Any], method: str) -> bool:
    info = results["methods"].get(method) or {}
    return bool(info["trains"]) if "trains" in info else method in TRAINING_METHODS


def seed_scores(parts: Sequence[SeedPart], step: int | str, key: str = "accuracy") -> SeedScores:
    """Per method, per task: the mean ``key`` over the task's episodes after ``step`` steps.

    Args:
        parts: The evaluations of one seed, all on the same tasks and episodes.
        step: The number of adaptation steps (a method that does not train may have been scored at 0 only).
        key: ``accuracy`` or ``accuracy_norm``.

    Returns:
        The seed's :class:`SeedScores`.

    Raises:
        ConfigError: a part lacks a named method or the step, the parts differ in tasks, episodes
            or :data:`SAME_CONFIG`, or two parts give the same method.
    """
    if not parts:
        raise ConfigError("a seed needs at least one evaluation.")
    step = str(step)
    scores: dict[str, dict[str, float]] = {}
    trained: list[str] = []
    reference: dict[str, Any] = {}
    for part in parts:
        results = part.load()
        methods = list(part.methods) or list(results["methods"])
        missing = [m for m in methods if m not in results["methods"]]
        if missing:
            raise ConfigError(f"'{part.path}' has no method(s) {missing}; it has {list(results['methods'])}.")
        if not reference:
            reference = results
        else:
            check_same_episodes(reference, results, f"'{part.path}'", f"'{parts[0].path}'")
            for name in SAME_CONFIG:
                ours, theirs = results.get("config", {}).get(name), reference.get("config", {}).get(name)
                if ours != theirs:
                    raise ConfigError(f"'{part.path}' was evaluated with {name}={ours}, '{parts[0].path}' with "
                                      f"{name}={theirs}; the parts of a seed must share {', '.join(SAME_CONFIG)}.")
        means = task_means(results, key)
        scored = [str(s) for s in results["steps"]]
        for method in methods:
            if method in scores:
                raise ConfigError(f"method '{method}' comes from two parts of one seed (the second: '{part.path}'); "
                                  f"take it from one, e.g. '{part.path}:<other methods>'.")
            at = step if step in scored else ("0" if not _trains(results, method) and "0" in scored else None)
            if at is None:
                raise ConfigError(f"'{part.path}' scored {method} after steps {scored}, not after {step}.")
            scores[method] = means[method][at]
            if _trains(results, method):
                trained.append(method)
    episodes = {task: [r.get("fingerprint") or r["id"] for r in entry["episodes"]]
                for task, entry in reference["tasks"].items()}
    return SeedScores(scores, episodes, reference.get("config", {}), str(parts[0].path), tuple(trained))


def _resolve_unit(seeds: Sequence[SeedScores], unit: Unit) -> str:
    """``pair`` or ``task`` (see the module docstring); refuses the same adapters given twice."""
    share_episodes = False
    for i, a in enumerate(seeds):
        for b in seeds[i + 1:]:
            shared = [t for t in a.episodes if a.episodes[t] == b.episodes.get(t)]
            if not shared:
                continue
            share_episodes = True
            trained = [m for m in a.trained if m in b.trained]
            if not trained:
                raise ConfigError(
                    f"seeds '{a.name}' and '{b.name}' evaluated the same episodes of {shared[:3]} but share no trained "
                    f"method (trained: {a.trained or 'none'} and {b.trained or 'none'}): their baselines score the "
                    "same queries, so pooling them repeats one measurement; give each seed its trained adapters.")
            if all(a.scores[m].get(t) == b.scores[m].get(t) for m in trained for t in shared):
                raise ConfigError(
                    f"seeds '{a.name}' and '{b.name}' evaluated the same episodes of {shared[:3]} and score them "
                    f"identically with every trained method {trained}: the same adapters (the same seed) given twice?")
    if share_episodes and unit == "pair":
        raise ConfigError("some seeds evaluated the same episodes, so their (seed, task) pairs are not independent: "
                          "pool with unit 'task' (or 'auto').")
    if unit != "auto":
        return unit
    if share_episodes:
        return "task"
    names = [t for seed in seeds for t in seed.episodes]
    if len(names) == len(set(names)):
        return "pair"
    builtin = all(str(s.config.get("tasks", "")).startswith("builtin") for s in seeds)
    distinct_seeds = len({s.config.get("seed") for s in seeds}) == len(seeds)
    return "pair" if builtin and distinct_seeds else "task"


def pool_seeds(seeds: Sequence[SeedScores], pairs: Sequence[tuple[str, str]] | None = None,
               unit: Unit = "auto") -> dict[str, Any]:
    """Paired differences per seed and pooled over the seeds.

    Args:
        seeds: :func:`seed_scores` of each seed.
        pairs: ``(a, b)`` pairs reported as ``a - b`` (default: :func:`comparison_pairs` of the
            methods every seed has).
        unit: The unit of the pooled interval: ``pair``, ``task`` or ``auto`` (module docstring).

    Returns:
        ``methods`` (common to every seed), ``seeds`` (their number), ``unit`` (the one used),
        ``convention`` and ``comparisons``: ``{"a - b": {"seeds": [stats per seed], "pooled": stats}}``,
        each stats dict as :func:`mean_ci` gives it (accuracy units) with ``excludes_zero``.

    Raises:
        ConfigError: no seed, a pair's method missing from some seed, two seeds that are the same adapters
            (identical trained scores on the same episodes), or ``unit='pair'`` for seeds sharing episodes.
    """
    if not seeds:
        raise ConfigError("pooling needs at least one seed.")
    common = [m for m in seeds[0].scores if all(m in seed.scores for seed in seeds)]
    if pairs is None:
        pairs = comparison_pairs(common)
    used = _resolve_unit(seeds, unit)
    out: dict[str, Any] = {
        "methods": common, "seeds": len(seeds), "unit": used, "comparisons": {},
        "convention": "per task: mean over its episodes; paired difference per task; pooled: mean and Student-t "
                      "95% CI across " + ("all (seed, task) pairs" if used == "pair" else
                                          "tasks, each task's difference averaged over the seeds")}
    for a, b in pairs:
        missing = [m for m in (a, b) if m not in common]
        if missing:
            raise ConfigError(f"pair '{a} - {b}': method(s) {missing} are not in every seed (common: {common}).")
        per_seed = [{t: s.scores[a][t] - s.scores[b][t] for t in s.scores[a] if t in s.scores[b]} for s in seeds]
        if used == "pair":
            units = [d for diffs in per_seed for d in diffs.values()]
        else:
            by_task: dict[str, list[float]] = {}
            for diffs in per_seed:
                for task, d in diffs.items():
                    by_task.setdefault(task, []).append(d)
            units = [sum(v) / len(v) for v in by_task.values()]
        out["comparisons"][f"{a} - {b}"] = {"seeds": [with_verdict(mean_ci(list(d.values()))) for d in per_seed],
                                            "pooled": with_verdict(mean_ci(units))}
    return out


def pool_summaries(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The pair-unit interval over several seeds from each seed's paired-difference statistics alone.

    Each seed's ``mean``, ``std`` and ``n`` (as :func:`mean_ci` gave them) determine the mean and the
    sample variance of all its differences together, so this equals :func:`mean_ci` over every
    (seed, task) pair exactly: seeds whose evaluations are gone still pool from the numbers an
    earlier pooling wrote (:func:`extend_pooled`).

    Raises:
        ConfigError: a seed has fewer than two differences (no standard deviation).
    """
    short = [s for s in stats if not s.get("n") or s["n"] < 2 or s.get("std") is None]
    if short:
        raise ConfigError(f"pooling from statistics needs each seed's mean, std and n >= 2; got {short[0]}.")
    n = sum(int(s["n"]) for s in stats)
    mean = sum(s["mean"] * s["n"] for s in stats) / n
    squares = sum((s["n"] - 1) * s["std"] ** 2 + s["n"] * (s["mean"] - mean) ** 2 for s in stats)
    std = math.sqrt(squares / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": half, "low": mean - half, "high": mean + half, "n": n}


def extend_pooled(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """Pool the seeds of an earlier pooling (its JSON) with later seeds, over all (seed, task) pairs.

    Args:
        earlier: :func:`pool_seeds` output of the first seeds (``unit`` ``pair``), as written beside
            ``pool_seeds.py --out``.
        later: :func:`pool_seeds` output of the new seeds (``unit`` ``pair``).

    Returns:
        :func:`pool_seeds`-shaped output: the earlier seeds' columns, then the later ones', pooled by
        :func:`pool_summaries`; its methods are those both poolings have.

    Raises:
        ConfigError: either pooling is not by (seed, task) pairs, or a pair of the later pooling is
            missing from the earlier one.
    """
    for name, pooled in (("earlier", earlier), ("later", later)):
        if pooled.get("unit") != "pair":
            raise ConfigError(f"the {name} pooling's unit is '{pooled.get('unit')}': only (seed, task) pairs pool "
                              "from statistics (seeds of the same tasks are not independent pairs).")
    missing = [name for name in later["comparisons"] if name not in earlier["comparisons"]]
    if missing:
        raise ConfigError(f"pair(s) {missing} are not in the earlier pooling; it has {list(earlier['comparisons'])}.")
    for name, entry in later["comparisons"].items():
        for stats in entry["seeds"]:
            if stats in earlier["comparisons"][name]["seeds"]:
                raise ConfigError(f"'{name}': a later seed has exactly the statistics of an earlier one "
                                  f"({format_diff(stats)}, n={stats['n']}); the same seed given twice?")
    out = dict(later, methods=[m for m in later["methods"] if m in earlier["methods"]],
               seeds=earlier["seeds"] + later["seeds"], comparisons={})
    for name, entry in later["comparisons"].items():
        seeds = list(earlier["comparisons"][name]["seeds"]) + list(entry["seeds"])
        out["comparisons"][name] = {"seeds": seeds, "pooled": with_verdict(pool_summaries(seeds))}
    return out


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """Read ``A-B,C-D`` (or ``A - B`` as tables print it) into method pairs.

    Method names contain hyphens (``fresh-lora-zero-shot`` is ``fresh-lora`` − ``zero-shot``): each
    item is split at the one hyphen whose two sides are both method names.

    Raises:
        ConfigError: an item is not two method names joined by ``-``.
    """
    pairs = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        splits = [(item[:i].strip(), item[i + 1:].strip()) for i, char in enumerate(item) if char == "-"]
        found = [(a, b) for a, b in splits if a in METHODS and b in METHODS]
        if len(found) != 1:
            raise ConfigError(f"pair '{item}': expected METHOD-METHOD with methods among {list(METHODS)}.")
        pairs.append(found[0])
    return pairs


def pooled_table(pooled: dict[str, Any], labels: Sequence[str] | None = None) -> str:
    """A markdown table of :func:`pool_seeds` output: a row per method pair, a column per seed, one pooled.

    Args:
        pooled: :func:`pool_seeds` output.
        labels: Column names of the seeds (default ``seed 0``, ``seed 1``, ...).
    """
    labels = list(labels) if labels else [f"seed {i}" for i in range(pooled["seeds"])]
    lines = ["| difference | " + " | ".join(labels) + f" | pooled ({pooled['unit']}s) |",
             "|---|" + "---|" * (len(labels) + 1)]
    cell = lambda stats: f"{format_diff(stats)} (n={stats['n']})"  # noqa: E731
    for name, entry in pooled["comparisons"].items():
        lines.append(f"| {name} | " + " | ".join(cell(s) for s in entry["seeds"]) + f" | {cell(entry['pooled'])} |")
    return "\n".join(lines) + "\n"
