"""Summaries of an evaluation: means with 95% confidence intervals, the markdown table, the plots.

Confidence intervals are taken **across tasks**: each task contributes its mean accuracy over its
episodes, and the interval is the Student-t interval of the mean of those per-task values (tasks
are the unit of generalisation; episodes of one task are not independent draws of the task
distribution). Method differences (``meta - multitask``, ...) are paired: per task, the
difference of the two methods' means over the same episodes, then the Student-t interval of the
mean of those per-task differences.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from deltameta.evaluate.config import ADAPTER_OF

#: Every trained method is compared with each of these (those present), then these extra pairs.
BASELINES = ("multitask", "fresh-lora", "zero-shot")
EXTRA_PAIRS = (("meta-dynamic", "meta"), ("meta-dynamic", "multitask-dynamic"), ("meta", "icl"))


def t_quantile(df: int) -> float:
    """Two-sided 95% Student-t quantile with ``df`` degrees of freedom (``scipy.stats.t``; NaN below 1)."""
    if df < 1:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and 95% CI half-width of ``values``.

    Returns:
        ``mean``, ``std``, ``ci95`` (``None`` with fewer than two values), ``low``, ``high``, ``n``.
    """
    values = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "low": None, "high": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "std": None, "ci95": None, "low": None, "high": None, "n": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": half, "low": mean - half, "high": mean + half, "n": n}


def comparison_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """The ``(a, b)`` pairs reported as ``a - b``.

    Every trained method present (the meta-learners first) against each of :data:`BASELINES`
    present, then the :data:`EXTRA_PAIRS` present; a pair already reported the other way round
    (``multitask - fresh-lora`` vs ``fresh-lora - multitask``) is not repeated.
    """
    from deltameta.evaluate.config import METHODS, TRAINING_METHODS

    trained = [m for m in reversed(METHODS) if m in TRAINING_METHODS and m in methods]
    pairs: list[tuple[str, str]] = []
    candidates = [(a, b) for a in trained for b in BASELINES if b in methods and b != a]
    candidates += [p for p in EXTRA_PAIRS if p[0] in methods and p[1] in methods]
    for a, b in candidates:
        if (a, b) not in pairs and (b, a) not in pairs:
            pairs.append((a, b))
    return pairs


def task_means(results: dict[str, Any], key: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {step: {task: mean over the task's episodes}}}`` of ``accuracy`` or ``accuracy_norm``."""
    steps = [str(s) for s in results["steps"]]
    out: dict[str, dict[str, dict[str, float]]] = {m: {s: {} for s in steps} for m in results["methods"]}
    for task, entry in results["tasks"].items():
        for method in results["methods"]:
            data = entry["methods"].get(method)
            if data is None:
                continue
            for s in steps:
                values = [v for v in data.get(key, {}).get(s, []) if v is not None]
                if values:
                    out[method][s][task] = sum(values) / len(values)
    return out


def with_verdict(stats: dict[str, Any]) -> dict[str, Any]:
    """Add ``excludes_zero``: whether the 95% CI lies entirely above or below 0 (None without a CI)."""
    stats["excludes_zero"] = None if stats["ci95"] is None else bool(stats["low"] > 0 or stats["high"] < 0)
    return stats


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per method and step: mean accuracy across tasks with its 95% CI; paired differences.

    Args:
        results: The ``results.json`` content (``tasks``, ``methods``, ``steps``).

    Returns:
        ``methods`` (``{method: {step: stats}}``, raw accuracy), ``methods_norm`` (the same for
        length-normalised accuracy), ``comparisons`` and ``comparisons_norm``
        (``{"meta - multitask": {step: stats}}``, each with ``excludes_zero``),
        ``comparisons_by_family`` (accuracy differences with the family as the unit; only when some
        family holds several tasks), and ``convention`` (how the intervals are computed).
    """
    steps = [str(s) for s in results["steps"]]
    methods = list(results["methods"])
    summary: dict[str, Any] = {"convention": "per task: mean over its episodes; then mean and Student-t 95% CI "
                                             "across tasks (differences paired per task)"}
    per_task_by_key = {key: task_means(results, key) for key in ("accuracy", "accuracy_norm")}
    for key, suffix in (("accuracy", ""), ("accuracy_norm", "_norm")):
        per_task = per_task_by_key[key]
        summary["methods" + suffix] = {m: {s: mean_ci(list(per_task[m][s].values())) for s in steps} for m in methods}
        summary["comparisons" + suffix] = {
            f"{a} - {b}": {
                s: with_verdict(mean_ci([per_task[a][s][t] - per_task[b][s][t] for t in per_task[a][s]
                                          if t in per_task[b][s]]))
                for s in steps
            }
            for a, b in comparison_pairs(methods)
        }
    families = {task: entry.get("family") or task for task, entry in results["tasks"].items()}
    if len(set(families.values())) < len(families):
        summary["comparisons_by_family"] = _family_comparisons(results, per_task_by_key["accuracy"], families, steps)
    return summary


def _family_comparisons(results: dict[str, Any], per_task: dict[str, dict[str, dict[str, float]]],
                        families: dict[str, str], steps: list[str]) -> dict[str, Any]:
    """Paired accuracy differences with the family as the unit: tasks of one family are not independent.

    Per family, the mean of its tasks' paired differences; then mean and Student-t 95% CI across
    families (``n`` = families). ``per_task`` is :func:`task_means` of ``accuracy``.
    """
    out: dict[str, Any] = {}
    for a, b in comparison_pairs(list(results["methods"])):
        out[f"{a} - {b}"] = {}
        for s in steps:
            by_family: dict[str, list[float]] = {}
            for task, value in per_task[a][s].items():
                if task in per_task[b][s]:
                    by_family.setdefault(families[task], []).append(value - per_task[b][s][task])
            out[f"{a} - {b}"][s] = with_verdict(mean_ci([sum(v) / len(v) for v in by_family.values()]))
    return out


def format_pct(stats: dict[str, Any], signed: bool = False) -> str:
    """``"mean ± ci95"`` in points (``"-"`` without a mean, no CI with one unit); ``signed`` adds the sign."""
    if stats["mean"] is None:
        return "-"
    mean = f"{100 * stats['mean']:+.1f}" if signed else f"{100 * stats['mean']:.1f}"
    return mean if stats["ci95"] is None else f"{mean} ± {100 * stats['ci95']:.1f}"


def format_diff(stats: dict[str, Any]) -> str:
    """A paired difference as :func:`format_pct` (signed) plus whether its 95% CI excludes 0."""
    text = format_pct(stats, signed=True)
    if stats.get("excludes_zero"):
        text += " **excl. 0**"
    elif stats.get("excludes_zero") is False:
        text += " (incl. 0)"
    return text


def _families(results: dict[str, Any]) -> str:
    families = {entry.get("family") for entry in results["tasks"].values()}
    text = f"{len(families)} families"
    if results["config"].get("max_tasks"):
        text += f", drawn spread over the split's families: max_tasks={results['config']['max_tasks']}"
    return text


def _query_sizes(results: dict[str, Any]) -> str:
    requested = results["config"]["query_size"]
    sizes = sorted({entry.get("query_size", requested) for entry in results["tasks"].values()})
    if not sizes or sizes == [requested]:
        return str(requested)
    span = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return f"{requested} requested ({span} where a task has fewer than shots + query_size examples)"


def _preparation_line(method: str, prep: dict[str, Any]) -> str:
    """The budget line of one method: the passes (forward-only ones apart) that prepared its adapter."""
    passes = prep.get("forward_backward_passes")
    if method == "fresh-lora":
        return "- preparation of fresh-lora: none (standard LoRA init)"
    if passes is None:
        return f"- preparation of {method}: unknown (adapter without run metadata)"
    tokens = f", {prep['tokens']} tokens" if prep.get("tokens") else ""
    forwards = prep.get("forward_passes") or 0
    per_task = f"{prep.get('inner_steps')} + 1" + (" forward-only" if forwards else "")
    return (f"- preparation of {method}: {passes} forward/backward passes"
            + (f" and {forwards} forward-only passes" if forwards else "")
            + f" ({prep.get('algorithm')}, {prep.get('outer_steps')} outer steps x "
            f"{prep.get('meta_batch_size')} tasks x ({per_task}) passes{tokens})")


def _query_context_line(results: dict[str, Any]) -> str:
    """A sentence naming the adapted methods whose queries carried the support examples (``query_context=support``)."""
    methods = [m for m, info in results["methods"].items()
               if (info.get("inner_loop") or {}).get("query_context") == "support"]
    if not methods:
        return ""
    return (f" {', '.join(methods)} score each query after the k support examples as demonstrations "
            "(`query_context=support`, as icl does).")


def markdown_table(results: dict[str, Any]) -> str:
    """Render the summary as markdown: accuracy (%) ± 95% CI across tasks, per method and step."""
    steps = [str(s) for s in results["steps"]]
    summary = results["summary"]
    n_tasks = len(results["tasks"])
    config = results["config"]
    lines = [
        f"# Few-shot adaptation: {config['model']} ({config['quantization']}), tasks `{config['tasks']}`"
        + (f" split `{config['split']}`" if config.get("split") else ""),
        "",
        f"{n_tasks} tasks ({_families(results)}) x {config['episodes']} episodes, k={config['shots']} support / {_query_sizes(results)} query "
        f"examples per episode, seed {config['seed']}. Multiple choice by log-likelihood, free-form by exact match; "
        "`acc` sums the option's token log-likelihoods, `acc_norm` divides them by the option's token count "
        "(free form: match after normalising case, punctuation and articles)."
        + _query_context_line(results),
        "",
        "Statistics: per task, the mean over its episodes; then the mean across tasks ± the 95% CI half-width "
        "(Student t over the per-task means, n = tasks). Differences are paired: per task, the difference of the "
        "two methods' means over the same episodes, then mean ± 95% CI across tasks.",
        "",
        "Accuracy (%), mean across tasks ± 95% CI:",
        "",
        "| method | " + " | ".join(f"acc {s} steps | acc_norm {s} steps" for s in steps) + " | trains |",
        "|---|" + "---|---|" * len(steps) + "---|",
    ]
    norm = summary.get("methods_norm", {})
    for method, info in results["methods"].items():
        cells = []
        for s in steps:
            cells.append(format_pct(summary["methods"][method][s]))
            cells.append(format_pct(norm[method][s]) if method in norm else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'yes' if info['trains'] else 'no'} |")
    by_family = summary.get("comparisons_by_family") or {}
    n_families = next((stats[s]["n"] for stats in by_family.values() for s in steps), 0)  # units summarize used
    for key, heading in (
        ("comparisons", "Paired differences of accuracy (percentage points, same tasks and episodes; mean ± 95% CI; "
                        "**excl. 0** where the CI excludes 0):"),
        ("comparisons_norm", "Paired differences of length-normalised accuracy (percentage points, same tasks and "
                             "episodes; mean ± 95% CI; **excl. 0** where the CI excludes 0):"),
        ("comparisons_by_family", "Paired differences of accuracy with the family as the unit (tasks of one family "
                                  "are not independent): per family, the mean of its tasks' differences, then mean ± "
                                  f"95% CI across the {n_families} families:"),
    ):
        if not summary.get(key):
            continue
        lines += ["", heading, "", "| difference | " + " | ".join(f"{s} steps" for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for name, stats in summary[key].items():
            lines.append(f"| {name} | " + " | ".join(format_diff(stats[s]) for s in steps) + " |")
    budget = results["budget"]
    adaptation = budget["adaptation"]
    lines += [
        "",
        "## Budget",
        "",
        f"- adaptation: every training method gets the same {adaptation['max_steps']} steps "
        f"(one forward/backward pass per step on the full k-shot support set), scored after {', '.join(steps)} steps.",
    ]
    for method, info in results.get("methods", {}).items():
        inner = info.get("inner_loop") or {}
        if inner.get("optimizer"):
            rate = "learned Meta-SGD rates" if inner.get("learned_rates") else f"lr {inner.get('lr')}"
            lines.append(f"  - {method}: {inner['optimizer']}, {rate}, clip {inner.get('clip')}")
    lines += [_preparation_line(method, prep) for method, prep in budget["preparation"].items()]
    parity = budget["parity"]
    lines.append(f"- preparation parity between trained adapters: {parity['preparation']}" +
                 (f" ({parity['note']})" if parity.get("note") else ""))
    last = steps[-1]
    lines += ["", f"## Per task (accuracy % after {last} steps, mean over episodes)", "",
              "| task | " + " | ".join(results["methods"]) + " |", "|---|" + "---|" * len(results["methods"])]
    for task, entry in results["tasks"].items():
        cells = []
        for method in results["methods"]:
            value = entry["methods"][method]["mean"][last]
            cells.append("-" if value is None else f"{100 * value:.1f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if results.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    return "\n".join(lines) + "\n"


def write_plots(out: Path, results: dict[str, Any]) -> list[Path]:
    """Write ``plots/accuracy_vs_steps.png`` and ``plots/per_task.png``.

    Returns:
        The files written.
    """
    from deltameta.plots import pyplot

    plt = pyplot()
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    steps = results["steps"]
    methods = list(results["methods"])
    summary = results["summary"]["methods"]
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method in methods:
        stats = [summary[method][str(s)] for s in steps]
        xs = [s for s, st in zip(steps, stats) if st["mean"] is not None]
        ys = [100 * st["mean"] for st in stats if st["mean"] is not None]
        if not xs:
            continue
        style = "--" if not results["methods"][method]["trains"] else "-"
        line, = ax.plot(xs, ys, style, marker="o", markersize=4, label=method)
        lows = [100 * (st["low"] if st["low"] is not None else st["mean"]) for st in stats if st["mean"] is not None]
        highs = [100 * (st["high"] if st["high"] is not None else st["mean"]) for st in stats if st["mean"] is not None]
        ax.fill_between(xs, [max(v, 0.0) for v in lows], [min(v, 100.0) for v in highs], color=line.get_color(), alpha=0.12)
    ax.set_xlabel("adaptation steps on the k-shot support set")
    ax.set_ylabel("query accuracy (%)")
    ax.set_title(f"{len(results['tasks'])} held-out tasks, k={results['config']['shots']} (95% CI across tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_steps.png", dpi=110)
    plt.close(fig)
    written.append(folder / "accuracy_vs_steps.png")

    last = str(steps[-1])
    tasks = list(results["tasks"])
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(tasks) * max(1, len(methods)) / 2), 4.2))
    for i, method in enumerate(methods):
        values = [results["tasks"][t]["methods"][method]["mean"][last] for t in tasks]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [100 * (v or 0.0) for v in values], width=width, label=method)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"query accuracy after {last} steps (%)")
    ax.set_title("per task (mean over episodes)")
    ax.legend(fontsize=7, ncol=min(len(methods), 3))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "per_task.png", dpi=110)
    plt.close(fig)
    written.append(folder / "per_task.png")
    return written


#: Start of the warning an evaluation gives when its multitask and meta adapters had different budgets.
BUDGET_WARNING = "preparation budgets differ: "


def with_budget_warning(warnings: list[str], parity: dict[str, Any]) -> list[str]:
    """Replace any budget warning in ``warnings`` by the one ``parity`` calls for.

    Args:
        warnings: An evaluation's warnings.
        parity: What :func:`preparation_parity` returned for the evaluated methods.

    Returns:
        ``warnings`` without earlier budget warnings, plus ``BUDGET_WARNING`` and the parity note
        when the preparation budgets differ.
    """
    kept = [w for w in warnings if not w.startswith(BUDGET_WARNING)]
    return kept + [BUDGET_WARNING + parity["note"]] if parity["preparation"] is False else kept


def preparation_parity(preparation: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether the multitask and meta adapters were prepared with the same forward/backward passes.

    Each adapter is read from the first method that evaluates it (``ADAPTER_OF``: ``meta`` and
    ``meta-dynamic`` are the same meta-adapter).

    Args:
        preparation: ``{method: {"forward_backward_passes": int | None, "tokens": ...}}`` of the
            methods evaluated (the ``budget.preparation`` of ``results.json``).

    Returns:
        ``{"adaptation": True, "preparation": True | False | None}``, with a ``note`` when it is
        False (the passes of each) or unknown although both adapters were evaluated (no run metadata).
    """
    parity: dict[str, Any] = {"adaptation": True, "preparation": None}
    passes: dict[str, Any] = {}
    for method, prep in preparation.items():
        if method in ADAPTER_OF:
            passes.setdefault(ADAPTER_OF[method], (prep or {}).get("forward_backward_passes"))
    if len(passes) == 2:
        if None in passes.values():
            parity["note"] = "unknown for an adapter without run metadata"
        else:
            parity["preparation"] = passes["multitask"] == passes["meta"]
            if not parity["preparation"]:
                parity["note"] = (f"meta used {passes['meta']} and multitask {passes['multitask']} forward/backward "
                                  "passes; the comparison is not compute-matched")
    return parity


def check_same_episodes(reference: dict[str, Any], part: dict[str, Any], name: str, reference_name: str) -> None:
    """Raise unless ``part`` evaluated the tasks and episodes of ``reference`` (two ``results.json`` contents).

    Args:
        reference: The evaluation compared against.
        part: The evaluation checked.
        name: How errors name ``part`` (e.g. a path).
        reference_name: How errors name ``reference``.

    Raises:
        ConfigError: other tasks, or other episodes (ids or fingerprints) of some task.
    """
    from deltameta.errors import ConfigError

    if set(part["tasks"]) != set(reference["tasks"]):
        raise ConfigError(f"{name} evaluated other tasks than {reference_name}: "
                          f"{sorted(set(part['tasks']) ^ set(reference['tasks']))[:5]}")
    for task, entry in part["tasks"].items():
        ids = [(record["id"], record.get("fingerprint")) for record in entry["episodes"]]
        expected = [(record["id"], record.get("fingerprint")) for record in reference["tasks"][task]["episodes"]]
        if ids != expected:
            raise ConfigError(f"task '{task}': {name} used episodes {ids}, {reference_name} used {expected}; "
                              "run every part with the same seed, shots, query_size and episodes.")


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge evaluations of *different methods* on the same tasks and episodes into one.

    Lets the methods of one comparison run as separate processes (e.g. in parallel, or a
    baseline added later); the merged result is what a single run of all methods would give.

    Args:
        parts: ``results.json`` contents, each with a disjoint set of methods.

    Returns:
        The merged results, with the summary recomputed.

    Raises:
        ConfigError: the parts differ in steps, tasks or episodes, or share a method.
    """
    from deltameta.errors import ConfigError

    if len(parts) < 2:
        raise ConfigError("merging needs at least two evaluation results.")
    first = parts[0]
    merged = json.loads(json.dumps(first))
    for index, part in enumerate(parts[1:], start=1):
        if part["steps"] != first["steps"]:
            raise ConfigError(f"part {index} was scored after steps {part['steps']}, part 0 after {first['steps']}.")
        shared = set(part["methods"]) & set(merged["methods"])
        if shared:
            raise ConfigError(f"part {index} repeats method(s) {sorted(shared)}; merge parts with disjoint methods.")
        check_same_episodes(first, part, f"part {index}", "part 0")
        for task, entry in part["tasks"].items():
            merged["tasks"][task]["methods"].update(entry["methods"])
        merged["methods"].update(part["methods"])
        merged["warnings"] = merged.get("warnings", []) + part.get("warnings", [])
        timing = merged.setdefault("timing", {})
        timing["seconds"] = timing.get("seconds", 0.0) + part.get("timing", {}).get("seconds", 0.0)
        for key in ("per_method_seconds", "per_episode_seconds"):
            timing.setdefault(key, {}).update(part.get("timing", {}).get(key, {}))
        budget = merged.setdefault("budget", {})
        if isinstance(budget.get("preparation"), dict) and isinstance(part.get("budget", {}).get("preparation"), dict):
            budget["preparation"].update(part["budget"]["preparation"])
    if isinstance(merged.get("budget", {}).get("preparation"), dict):
        parity = preparation_parity(merged["budget"]["preparation"])  # of the merged methods
        merged["budget"]["parity"] = parity
        # the parts' own budget warnings compared only their own methods: say it once, for the merge
        merged["warnings"] = with_budget_warning(merged.get("warnings", []), parity)
    merged["merged_from"] = len(parts)
    merged["summary"] = summarize(merged)
    return merged
