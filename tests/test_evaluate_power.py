"""Evaluation power: defaults, family-spread task selection, the paired-difference table."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest

from deltameta.config import build_config
from deltameta.evaluate import EvaluateConfig, run_evaluate
from deltameta.evaluate.report import (comparison_pairs, markdown_table, merge_results, preparation_parity, summarize,
                                       t_quantile)
from deltameta.evaluate.runner import spread_over_families
from test_finetune_helpers import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_defaults_are_powered():
    config = EvaluateConfig()
    assert config.episodes >= 5 and config.query_size >= 16
    for recipe in ("recipes/evaluate/smollm2_135m_builtin.yaml", "recipes/evaluate/smollm2_135m_bigbench_dev.yaml"):
        loaded = build_config(EvaluateConfig, recipe=recipe)
        assert loaded.episodes >= 5 and loaded.query_size >= 16, recipe


@dataclasses.dataclass
class FakeTask:
    name: str
    family: str


def _fake_tasks():
    sizes = {"alpha": 5, "beta": 1, "gamma": 3, "delta": 4}
    return [FakeTask(f"{family}__{i}", family) for family, n in sizes.items() for i in range(n)]


def test_max_tasks_spread_over_families():
    tasks = _fake_tasks()
    drawn = spread_over_families(tasks, 6, seed=0)
    assert len(drawn) == 6
    counts = Counter(t.family for t in drawn)
    # round robin over 4 families: beta has one task, so the others get 2, 2, 1 or so
    assert set(counts) == {"alpha", "beta", "gamma", "delta"} and max(counts.values()) - min(counts.values()) <= 1
    assert drawn != tasks[:6], "never the first N"
    assert [t for t in tasks if t in drawn] == drawn, "kept in the source order"
    assert spread_over_families(tasks, 6, seed=0) == drawn, "seeded"
    assert spread_over_families(list(reversed(tasks)), 6, seed=0) == [t for t in reversed(tasks) if t in drawn], \
        "the draw does not depend on the source order"
    assert any(spread_over_families(tasks, 6, seed=s) != drawn for s in range(1, 6)), "the seed matters"
    assert spread_over_families(tasks, 3, seed=0) and len({t.family for t in spread_over_families(tasks, 3, seed=0)}) == 3
    assert spread_over_families(tasks, 50, seed=0) == tasks


def test_evaluate_draws_across_families_and_records_short_tasks(tmp_path):
    values = dict(TINY, tasks="builtin", splits="train=0.5,validation=0.5", split="validation",
                  builtin_tasks_per_family=3, builtin_examples_per_task=12, max_tasks=4, methods=["zero-shot"],
                  episodes=1, shots=2, steps=[0], max_length=48, plots=False, progress=False,
                  output_dir=str(tmp_path / "eval"))
    results = run_evaluate(build_config(EvaluateConfig, overrides=values))
    families = [entry["family"] for entry in results["tasks"].values()]
    assert len(families) == 4 and len(set(families)) == 4, families
    # 12 examples, k=2: each task allows 10 query examples of the default 16, recorded per task
    assert {entry["query_size"] for entry in results["tasks"].values()} == {10}
    assert all(len(r["query"]) == 10 for entry in results["tasks"].values() for r in entry["episodes"])
    assert any("fewer query examples" in w for w in results["warnings"])
    assert "16 requested (10 where a task has fewer than shots + query_size examples)" in (tmp_path / "eval" / "results.md").read_text()


def _results(families=("family0", "family1", "family2")):
    """Three tasks, two episodes; per-task means chosen so that the differences are easy by hand."""
    acc = {  # method -> per task, the accuracies of the two episodes (after 0 and 5 steps alike)
        "zero-shot": [[0.5, 0.5], [0.25, 0.25], [0.5, 0.5]],
        "fresh-lora": [[0.5, 0.75], [0.25, 0.5], [0.5, 0.5]],
        "multitask": [[0.5, 0.5], [0.5, 0.5], [0.75, 0.75]],
        "meta": [[0.75, 0.75], [0.75, 0.75], [1.0, 1.0]],
    }
    norm = {m: [[v / 2 for v in task] for task in tasks] for m, tasks in acc.items()}
    steps = [0, 5]
    tasks = {}
    for i in range(3):
        methods = {}
        for m in acc:
            methods[m] = {"accuracy": {str(s): acc[m][i] for s in steps},
                          "accuracy_norm": {str(s): norm[m][i] for s in steps},
                          "mean": {str(s): sum(acc[m][i]) / 2 for s in steps}}
        tasks[f"{families[i]}__t{i}"] = {"family": families[i], "kind": "multiple_choice", "num_examples": 20,
                                  "query_size": 16, "episodes": [], "methods": methods}
    results = {"config": dict(dataclasses.asdict(EvaluateConfig()), model="tiny", quantization="none"), "steps": steps,
               "methods": {m: {"trains": m != "zero-shot"} for m in acc}, "tasks": tasks,
               "budget": {"adaptation": {"max_steps": 5, "optimizer": "sgd", "lr": 0.05, "clip": 1.0},
                          "preparation": {}, "parity": {"preparation": None}}}
    results["summary"] = summarize(results)
    return results


def test_paired_difference_table_by_hand():
    results = _results()
    summary = results["summary"]
    assert comparison_pairs(list(results["methods"])) == [
        ("meta", "multitask"), ("meta", "fresh-lora"), ("meta", "zero-shot"),
        ("multitask", "fresh-lora"), ("multitask", "zero-shot"), ("fresh-lora", "zero-shot")]
    assert set(summary["comparisons"]) == {f"{a} - {b}" for a, b in comparison_pairs(list(results["methods"]))}
    t2 = 4.302653  # two-sided 95% t quantile, 2 degrees of freedom
    assert t_quantile(2) == pytest.approx(t2, abs=1e-6)

    # meta - multitask: per-task differences 0.25, 0.25, 0.25 -> mean 0.25, no spread -> CI [0.25, 0.25]
    stats = summary["comparisons"]["meta - multitask"]["5"]
    assert stats["mean"] == pytest.approx(0.25) and stats["ci95"] == pytest.approx(0.0) and stats["excludes_zero"]

    # meta - fresh-lora: task means 0.75 - 0.625, 0.75 - 0.375, 1.0 - 0.5 = 0.125, 0.375, 0.5
    stats = summary["comparisons"]["meta - fresh-lora"]["0"]
    diffs = [0.125, 0.375, 0.5]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert stats["mean"] == pytest.approx(mean) and stats["std"] == pytest.approx(std)
    assert stats["ci95"] == pytest.approx(t2 * std / math.sqrt(3), rel=1e-6)
    assert stats["low"] == pytest.approx(mean - t2 * std / math.sqrt(3), rel=1e-6)
    assert stats["excludes_zero"] is False  # 0.333 - 0.475 < 0

    # fresh-lora - zero-shot: 0.125, 0.125, 0 -> mean 0.0833, CI includes 0
    stats = summary["comparisons"]["fresh-lora - zero-shot"]["5"]
    assert stats["mean"] == pytest.approx(0.25 / 3) and stats["excludes_zero"] is False

    # length-normalised accuracy: here exactly half of the raw one, differences too
    assert summary["methods_norm"]["meta"]["0"]["mean"] == pytest.approx(summary["methods"]["meta"]["0"]["mean"] / 2)
    assert summary["comparisons_norm"]["meta - multitask"]["0"]["mean"] == pytest.approx(0.125)

    table = markdown_table(results)
    assert "| meta - multitask | +25.0 ± 0.0 **excl. 0** | +25.0 ± 0.0 **excl. 0** |" in table
    assert f"| meta - fresh-lora | +{100 * mean:.1f} ± {100 * t2 * std / math.sqrt(3):.1f} (incl. 0) |" in table
    assert "acc_norm 5 steps" in table and "Paired differences of length-normalised accuracy" in table
    assert "per task, the mean over its episodes" in table
    assert "comparisons_by_family" not in summary and "family as the unit" not in table  # one task per family


def test_paired_differences_with_the_family_as_unit():
    """Two tasks of one family count once: per family the mean of its tasks' differences, t CI across families."""
    results = _results(families=("fam0", "fam0", "fam1"))
    by_family = results["summary"]["comparisons_by_family"]
    assert set(by_family) == set(results["summary"]["comparisons"])
    # meta - fresh-lora after 0 steps: task differences 0.125, 0.375 (fam0) and 0.5 (fam1) -> 0.25, 0.5
    stats = by_family["meta - fresh-lora"]["0"]
    std = math.sqrt(2 * 0.125 ** 2)
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(0.375) and stats["std"] == pytest.approx(std)
    assert stats["ci95"] == pytest.approx(t_quantile(1) * std / math.sqrt(2)) and stats["excludes_zero"] is False
    assert results["summary"]["comparisons"]["meta - fresh-lora"]["0"]["n"] == 3  # the task-level one is unchanged
    table = markdown_table(results)
    assert "mean ± 95% CI across the 2 families" in table
    assert f"| meta - fresh-lora | +37.5 ± {100 * t_quantile(1) * std / math.sqrt(2):.1f} (incl. 0) |" in table


def test_family_table_counts_a_task_without_family_as_its_own_unit():
    """The heading's family count is the n of the family-level CIs, also when some tasks name no family."""
    results = _results(families=("fam0", "fam0", "x"))
    lone = results["tasks"].pop("x__t2")
    for name in ("solo__t2", "solo__t3"):
        results["tasks"][name] = dict(lone, family=None)
    results["summary"] = summarize(results)
    assert results["summary"]["comparisons_by_family"]["meta - fresh-lora"]["0"]["n"] == 3  # fam0, solo__t2, solo__t3
    assert "mean ± 95% CI across the 3 families" in markdown_table(results)


def _part(methods: dict[str, int | None]) -> dict:
    """A results.json of one task and episode whose methods had ``methods[m]`` preparation passes."""
    return {"steps": [0], "methods": {m: {} for m in methods},
            "tasks": {"t": {"episodes": [{"id": 0}], "methods": {m: {"accuracy": {"0": [0.5]}} for m in methods}}},
            "budget": {"preparation": {m: {"forward_backward_passes": n, "tokens": 1} for m, n in methods.items()},
                       "parity": preparation_parity({m: {"forward_backward_passes": n} for m, n in methods.items()})}}


def test_merged_parity_is_that_of_the_merged_methods_not_of_the_last_part():
    """A part without both adapters (e.g. fresh-lora alone) used to overwrite the first part's parity with None."""
    both = _part({"multitask": 768, "meta": 768})
    assert both["budget"]["parity"]["preparation"] is True
    merged = merge_results([both, _part({"fresh-lora": 0})])
    assert merged["budget"]["parity"]["preparation"] is True
    split = merge_results([_part({"multitask": 768, "fresh-lora": 0}), _part({"meta": 700})])  # each adapter in a part
    assert split["budget"]["parity"]["preparation"] is False and "meta used 700 and multitask 768" in \
        split["budget"]["parity"]["note"]
    unknown = merge_results([_part({"multitask": 768}), _part({"meta": None})])  # a published PEFT folder
    assert unknown["budget"]["parity"] == {"adaptation": True, "preparation": None,
                                           "note": "unknown for an adapter without run metadata"}
    assert preparation_parity({"zero-shot": {}, "fresh-lora": {"forward_backward_passes": 0}})["preparation"] is None


def test_merged_parity_false_warns_once_for_the_merge():
    """Each part compared only its own adapters; the merge says that the budgets differ, once."""
    from deltameta.evaluate.report import BUDGET_WARNING

    meta = _part({"meta": 480})
    meta["warnings"] = ["a warning of the meta part"]
    merged = merge_results([_part({"multitask": 720, "fresh-lora": 0}), meta])
    budget_warnings = [w for w in merged["warnings"] if w.startswith(BUDGET_WARNING)]
    assert budget_warnings == [BUDGET_WARNING + "meta used 480 and multitask 720 forward/backward passes; "
                                                "the comparison is not compute-matched"]
    assert "a warning of the meta part" in merged["warnings"]
    equal = _part({"meta": 720})
    equal["warnings"] = [BUDGET_WARNING + "stale, from a part that had another multitask"]
    merged = merge_results([_part({"multitask": 720}), equal])
    assert not [w for w in merged["warnings"] if w.startswith(BUDGET_WARNING)]


@pytest.mark.parametrize("parity,expected", [
    ({"preparation": False, "note": "meta used 1 and multitask 2"}, ["other", "BUDGET meta used 1 and multitask 2"]),
    ({"preparation": True, "note": ""}, ["other"]),
    ({"preparation": None, "note": "unknown"}, ["other"]),
])
def test_budget_warning_replaces_earlier_ones(parity, expected):
    """The evaluation and the merge both keep at most one budget warning, the one their parity calls for."""
    from deltameta.evaluate.report import BUDGET_WARNING, with_budget_warning

    warnings = ["other", BUDGET_WARNING + "stale"]
    got = with_budget_warning(warnings, parity)
    assert got == [w.replace("BUDGET ", BUDGET_WARNING) for w in expected]
    assert with_budget_warning(got, parity) == got  # idempotent
    assert warnings == ["other", BUDGET_WARNING + "stale"]  # the input is not changed


@pytest.mark.parametrize("algorithm,controller,passes,forwards", [
    ("fomaml", "none", 3 * 4 * 3, 0),
    ("multitask", "none", 3 * 4 * 3, 0),
    ("reptile", "none", 3 * 4 * 2, 3 * 4),  # the query pass is a forward only: nothing is back-propagated
    ("reptile", "global", 3 * 4 * 3, 0),  # the query loss trains the controller
    ("reptile", None, 3 * 4 * 3, 0),  # no key: meta-train's default controller (global)
])
def test_preparation_counts_the_passes_each_algorithm_runs(tmp_path, algorithm, controller, passes, forwards):
    import yaml

    from deltameta.evaluate.report import _preparation_line
    from deltameta.finetune.adapters import read_preparation

    config = dict(algorithm=algorithm, outer_steps=3, meta_batch_size=4, inner_steps=2, shots=4, query_size=4)
    if controller is not None:
        config["controller"] = controller
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    prep = read_preparation(tmp_path, None)
    assert (prep["forward_backward_passes"], prep["forward_passes"]) == (passes, forwards)
    line = _preparation_line("meta", prep)
    assert line.startswith(f"- preparation of meta: {passes} forward/backward passes")
    assert (f"and {forwards} forward-only passes" in line) == bool(forwards)
    assert line.endswith("x (2 + 1 forward-only) passes)" if forwards else "x (2 + 1) passes)")


def test_preparation_of_a_best_state_counts_the_steps_it_saw(tmp_path):
    """best/ of a 4-step run saved at step 2: its passes and tokens are those of steps 1-2, not the run's."""
    import json

    import yaml

    from deltameta.finetune.adapters import read_preparation

    config = dict(algorithm="metasgd", outer_steps=4, meta_batch_size=2, inner_steps=2, shots=4, query_size=4)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"kind": "train", "step": step, "tokens": 10 * step} for step in (1, 2, 3, 4)]
    rows.insert(2, {"kind": "validation", "step": 2, "query_after": 1.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "meta_state.json").write_text(json.dumps({"config": config, "step": 2}))
    best = read_preparation(tmp_path, tmp_path / "best")
    assert (best["outer_steps"], best["forward_backward_passes"], best["tokens"]) == (2, 2 * 2 * 3, 10 + 20)
    whole = read_preparation(tmp_path, None)
    assert (whole["outer_steps"], whole["forward_backward_passes"], whole["tokens"]) == (4, 4 * 2 * 3, 100)


def test_parity_reads_the_meta_adapter_from_meta_dynamic_when_meta_is_not_evaluated():
    """A task-controller study evaluates only meta-dynamic (per-episode structure); its parity is still known."""
    assert preparation_parity({"multitask": {"forward_backward_passes": 720},
                               "meta-dynamic": {"forward_backward_passes": 720}})["preparation"] is True
    differ = preparation_parity({"multitask": {"forward_backward_passes": 720},
                                 "meta-dynamic": {"forward_backward_passes": 480}})
    assert differ["preparation"] is False and "meta used 480 and multitask 720" in differ["note"]
    both = preparation_parity({"multitask": {"forward_backward_passes": 720}, "meta": {"forward_backward_passes": 720},
                               "meta-dynamic": {"forward_backward_passes": 720}})
    assert both["preparation"] is True
    assert preparation_parity({"meta-dynamic": {"forward_backward_passes": 720}})["preparation"] is None
