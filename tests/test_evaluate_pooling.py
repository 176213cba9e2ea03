"""Pooling a study's seeds: one seed from several evaluations, and (seed, task) pairs as units."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from deltameta.errors import ConfigError
from deltameta.evaluate.pooling import SeedPart, pool_seeds, pooled_table, seed_scores
from deltameta.evaluate.report import mean_ci, summarize

TRAINS = {"zero-shot": False, "icl": False, "fresh-lora": True, "multitask": True, "meta": True}


def _results(methods, steps=(0, 2), tasks=("t0", "t1", "t2"), episodes=2, seed=0, fingerprint="f"):
    """A results.json of ``methods`` with random per-episode accuracies (non-training methods equal at every step)."""
    rng = random.Random(f"{seed}-{','.join(methods)}")
    out = {"steps": list(steps), "methods": {m: {"trains": TRAINS[m]} for m in methods}, "tasks": {}}
    for task in tasks:
        entry = {"family": "fam", "episodes": [{"id": f"{task}#{i}", "fingerprint": f"{fingerprint}{seed}{i}"}
                                                for i in range(episodes)], "methods": {}}
        for m in methods:
            fixed = [rng.random() for _ in range(episodes)]
            acc = {str(s): (fixed if not TRAINS[m] else [rng.random() for _ in range(episodes)]) for s in steps}
            entry["methods"][m] = {"accuracy": acc, "accuracy_norm": acc}
        out["tasks"][task] = entry
    return out


def _write(tmp_path, name, results):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return str(folder)


def test_one_seed_from_two_parts_equals_the_evaluations_own_differences(tmp_path):
    """Seed scores assembled from parts give the paired differences `summarize` gives the whole evaluation."""
    whole = _results(["zero-shot", "icl", "multitask", "meta"])
    main_part = dict(whole, methods={m: whole["methods"][m] for m in ("zero-shot", "multitask", "meta")})
    icl_part = json.loads(json.dumps(whole))  # the same episodes, ICL scored at step 0 only, zero-shot too
    icl_part["steps"] = [0]
    for entry in icl_part["tasks"].values():
        for data in entry["methods"].values():
            data["accuracy"] = {"0": data["accuracy"]["0"]}
    parts = [SeedPart.parse(_write(tmp_path, "main", main_part)), SeedPart.parse(_write(tmp_path, "icl", icl_part) + ":icl")]
    scores = seed_scores(parts, 2)
    assert set(scores) == {"zero-shot", "multitask", "meta", "icl"}
    pooled = pool_seeds([scores], [("meta", "multitask"), ("meta", "icl")])
    expected = summarize(whole)["comparisons"]
    for name in ("meta - multitask", "meta - icl"):
        assert pooled["comparisons"][name]["seeds"][0]["mean"] == pytest.approx(expected[name]["2"]["mean"])
        assert pooled["comparisons"][name]["pooled"]["ci95"] == pytest.approx(expected[name]["2"]["ci95"])


def test_pooled_units_are_seed_task_pairs(tmp_path):
    seeds = [seed_scores([SeedPart.parse(_write(tmp_path, f"s{s}", _results(["fresh-lora", "meta"], seed=s)))], 2)
             for s in range(3)]
    pooled = pool_seeds(seeds)
    assert list(pooled["comparisons"]) == ["meta - fresh-lora"]
    diffs = [seed["meta"][t] - seed["fresh-lora"][t] for seed in seeds for t in seed["meta"]]
    entry = pooled["comparisons"]["meta - fresh-lora"]
    assert entry["pooled"]["n"] == 9 and entry["pooled"]["mean"] == pytest.approx(mean_ci(diffs)["mean"])
    assert entry["pooled"]["ci95"] == pytest.approx(mean_ci(diffs)["ci95"])
    assert [s["n"] for s in entry["seeds"]] == [3, 3, 3]
    table = pooled_table(pooled, ["a", "b", "c"])
    assert table.splitlines()[0] == "| difference | a | b | c | pooled |"
    assert f"(n=9)" in table and table.count("\n") == 3


def test_parts_of_a_seed_must_fit_together(tmp_path):
    base = _write(tmp_path, "base", _results(["zero-shot", "meta"]))
    other = _write(tmp_path, "other", _results(["fresh-lora"], fingerprint="g"))  # other episodes
    with pytest.raises(ConfigError, match="other episodes"):
        seed_scores([SeedPart.parse(base), SeedPart.parse(other)], 2)
    fewer = _write(tmp_path, "fewer", _results(["fresh-lora"], tasks=("t0", "t1")))
    with pytest.raises(ConfigError, match="other tasks"):
        seed_scores([SeedPart.parse(base), SeedPart.parse(fewer)], 2)
    again = _write(tmp_path, "again", _results(["zero-shot", "fresh-lora"]))
    with pytest.raises(ConfigError, match="'zero-shot' comes from two parts"):
        seed_scores([SeedPart.parse(base), SeedPart.parse(again)], 2)
    assert set(seed_scores([SeedPart.parse(base), SeedPart.parse(again + ":fresh-lora")], 2)) == {"zero-shot", "meta", "fresh-lora"}
    with pytest.raises(ConfigError, match=r"has no method\(s\) \['icl'\]"):
        seed_scores([SeedPart.parse(base + ":icl")], 2)
    trained_at_zero = _write(tmp_path, "zero", _results(["zero-shot", "meta"], steps=(0,)))
    with pytest.raises(ConfigError, match="scored meta after steps"):  # a method that trains needs the step itself
        seed_scores([SeedPart.parse(trained_at_zero)], 2)
    with pytest.raises(ConfigError, match="holds no results.json"):
        seed_scores([SeedPart.parse(str(tmp_path / "nope"))], 2)
    with pytest.raises(ConfigError, match="not in every seed"):
        pool_seeds([seed_scores([SeedPart.parse(base)], 2), seed_scores([SeedPart.parse(again)], 2)], [("meta", "zero-shot")])


def test_a_part_spec_names_its_methods_unless_the_path_itself_exists(tmp_path):
    assert SeedPart.parse("runs/x:icl, zero-shot") == SeedPart(Path("runs/x"), ("icl", "zero-shot"))
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert SeedPart.parse(str(odd)) == SeedPart(odd, ())
    with pytest.raises(ConfigError, match="name the methods"):
        SeedPart.parse("runs/x:")
