"""Pool paired comparisons over seeds: each (seed, task) pair is one unit.

A study's seeds are independent replications (new training rules, other held-out tasks, other
episodes, another init), so one seed's 95% CI over 30 tasks is wide, and the question is what the
seeds say together. :func:`pool_seeds` gives, per method pair, the paired difference of every seed
and of all seeds pooled, the unit being the (seed, task) pair: per task the mean over its episodes,
then a Student-t interval across all pairs (tasks of different seeds are different draws, so the
pairs are not repeated measures of one task).

One seed's methods may come from several evaluations of *the same episodes* (a baseline evaluated
later, ICL from another run): a :class:`SeedPart` names an evaluation and the methods taken from it.
The parts of a seed must have evaluated the same tasks with the same episodes, as for
:func:`deltameta.evaluate.report.merge_results`. A method that does not train (``zero-shot``,
``icl``) scores the same after any number of steps, so a part that scored it only at step 0 serves
every step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from deltameta.errors import ConfigError
from deltameta.evaluate.report import _with_verdict, comparison_pairs, mean_ci

RESULTS_FILE = "results.json"


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
    def parse(cls, spec: str) -> "SeedPart":
        """``DIR`` or ``DIR:method,method`` (the methods taken from that evaluation)."""
        if ":" not in spec or Path(spec).exists():
            return cls(Path(spec))
        path, methods = spec.rsplit(":", 1)
        names = tuple(m.strip() for m in methods.split(",") if m.strip())
        if not names:
            raise ConfigError(f"'{spec}': name the methods after ':' (e.g. {path}:icl,zero-shot).")
        return cls(Path(path), names)

    def load(self) -> dict[str, Any]:
        """The ``results.json`` content of this part."""
        file = self.path / RESULTS_FILE if self.path.is_dir() else self.path
        if not file.is_file():
            raise ConfigError(f"'{self.path}' holds no {RESULTS_FILE}; pass the output dir of a finished evaluation.")
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"'{file}' is not valid JSON ({error}).") from None


def _trains(results: dict[str, Any], method: str) -> bool:
    info = results["methods"].get(method) or {}
    if "trains" in info:
        return bool(info["trains"])
    from deltameta.evaluate.config import TRAINING_METHODS

    return method in TRAINING_METHODS


def _episodes(entry: dict[str, Any]) -> list[tuple[Any, Any]]:
    return [(record["id"], record.get("fingerprint")) for record in entry["episodes"]]


def seed_scores(parts: Sequence[SeedPart], step: int | str, key: str = "accuracy") -> dict[str, dict[str, float]]:
    """Per method, per task: the mean ``key`` over the task's episodes after ``step`` steps.

    Args:
        parts: The evaluations of one seed, all on the same tasks and episodes.
        step: The number of adaptation steps (a method that does not train may have been scored at 0 only).
        key: ``accuracy`` or ``accuracy_norm``.

    Returns:
        ``{method: {task: mean}}``.

    Raises:
        ConfigError: a part lacks a named method or the step, the parts differ in tasks or episodes,
            or two parts give the same method.
    """
    step = str(step)
    scores: dict[str, dict[str, float]] = {}
    reference: dict[str, Any] | None = None
    for part in parts:
        results = part.load()
        methods = list(part.methods) or list(results["methods"])
        missing = [m for m in methods if m not in results["methods"]]
        if missing:
            raise ConfigError(f"'{part.path}' has no method(s) {missing}; it has {list(results['methods'])}.")
        if reference is None:
            reference = results
        elif set(results["tasks"]) != set(reference["tasks"]):
            raise ConfigError(f"'{part.path}' evaluated other tasks than '{parts[0].path}': "
                              f"{sorted(set(results['tasks']) ^ set(reference['tasks']))[:5]}")
        for task, entry in results["tasks"].items():
            if _episodes(entry) != _episodes(reference["tasks"][task]):
                raise ConfigError(f"task '{task}': '{part.path}' used other episodes than '{parts[0].path}'; the parts "
                                  "of a seed must come from evaluations with the same seed, shots, query_size and episodes.")
        for method in methods:
            if method in scores:
                raise ConfigError(f"method '{method}' comes from two parts of one seed (the second: '{part.path}'); "
                                  f"take it from one, e.g. '{part.path}:<other methods>'.")
            scored = [str(s) for s in results["steps"]]
            at = step if step in scored else ("0" if not _trains(results, method) and "0" in scored else None)
            if at is None:
                raise ConfigError(f"'{part.path}' scored {method} after steps {scored}, not after {step}.")
            per_task = {}
            for task, entry in results["tasks"].items():
                values = [v for v in entry["methods"].get(method, {}).get(key, {}).get(at, []) if v is not None]
                if values:
                    per_task[task] = sum(values) / len(values)
            scores[method] = per_task
    return scores


def pool_seeds(seeds: Sequence[dict[str, dict[str, float]]], pairs: Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Paired differences per seed and pooled over seeds, each (seed, task) pair one unit.

    Args:
        seeds: :func:`seed_scores` of each seed.
        pairs: ``(a, b)`` pairs reported as ``a - b`` (default: :func:`comparison_pairs` of the
            methods every seed has).

    Returns:
        ``{"methods": [...], "comparisons": {"a - b": {"seeds": [stats per seed], "pooled": stats}}}``,
        each stats dict as :func:`mean_ci` gives it, in accuracy units, with ``excludes_zero``.
    """
    if not seeds:
        raise ConfigError("pooling needs at least one seed.")
    common = [m for m in seeds[0] if all(m in seed for seed in seeds)]
    if pairs is None:
        pairs = comparison_pairs(common)
    out: dict[str, Any] = {"methods": common, "seeds": len(seeds), "comparisons": {},
                           "convention": "per task: mean over its episodes; paired difference per task; "
                                         "pooled: mean and Student-t 95% CI across all (seed, task) pairs"}
    for a, b in pairs:
        missing = [m for m in (a, b) if m not in common]
        if missing:
            raise ConfigError(f"pair '{a} - {b}': method(s) {missing} are not in every seed (common: {common}).")
        per_seed = [[seed[a][t] - seed[b][t] for t in seed[a] if t in seed[b]] for seed in seeds]
        out["comparisons"][f"{a} - {b}"] = {
            "seeds": [_with_verdict(mean_ci(diffs)) for diffs in per_seed],
            "pooled": _with_verdict(mean_ci([d for diffs in per_seed for d in diffs])),
        }
    return out


def _cell(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "–"
    if stats["ci95"] is None:
        return f"{100 * stats['mean']:+.1f} (n={stats['n']})"
    mark = " **excl. 0**" if stats["excludes_zero"] else ""
    return f"{100 * stats['mean']:+.1f} ± {100 * stats['ci95']:.1f} (n={stats['n']}){mark}"


def pooled_table(pooled: dict[str, Any], labels: Sequence[str] | None = None) -> str:
    """A markdown table: one row per method pair, a column per seed and one pooled."""
    labels = list(labels) if labels else [f"seed {i}" for i in range(pooled["seeds"])]
    lines = ["| difference | " + " | ".join(labels) + " | pooled |",
             "|---|" + "---|" * (len(labels) + 1)]
    for name, entry in pooled["comparisons"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(s) for s in entry["seeds"]) + f" | {_cell(entry['pooled'])} |")
    return "\n".join(lines) + "\n"
