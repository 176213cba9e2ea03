"""Pooling a study's seeds: one seed from several evaluations, and (seed, task) pairs as units."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from deltameta.errors import ConfigError
from deltameta.evaluate.pooling import SeedPart, parse_pairs, pool_seeds, pooled_table, seed_scores
from deltameta.evaluate.report import mean_ci, summarize

TRAINS = {"zero-shot": False, "icl": False, "fresh-lora": True, "multitask": True, "meta": True}


def _results(methods, steps=(0, 2), tasks=("t0", "t1", "t2"), episodes=2, seed=0, fingerprint="f", source="builtin",
             adapters=""):
    """A results.json of ``methods`` with random per-episode accuracies (non-training methods equal at every step).

    ``seed`` is the evaluation seed (it sets the episodes); ``adapters`` names other trained adapters on them.
    """
    rng = random.Random(f"{seed}-{','.join(methods)}{adapters}")
    out = {"steps": list(steps), "methods": {m: {"trains": TRAINS[m]} for m in methods}, "tasks": {},
           "config": {"model": "m", "quantization": "nf4", "max_length": 64, "tasks": source, "seed": seed}}
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
    assert set(scores.scores) == {"zero-shot", "multitask", "meta", "icl"}
    pooled = pool_seeds([scores], [("meta", "multitask"), ("meta", "icl")])
    expected = summarize(whole)["comparisons"]
    for name in ("meta - multitask", "meta - icl"):
        assert pooled["comparisons"][name]["seeds"][0]["mean"] == pytest.approx(expected[name]["2"]["mean"])
        assert pooled["comparisons"][name]["pooled"]["ci95"] == pytest.approx(expected[name]["2"]["ci95"])


def test_pooled_units_are_seed_task_pairs(tmp_path):
    seeds = [seed_scores([SeedPart.parse(_write(tmp_path, f"s{s}", _results(["fresh-lora", "meta"], seed=s)))], 2)
             for s in range(3)]
    pooled = pool_seeds(seeds)
    assert list(pooled["comparisons"]) == ["meta - fresh-lora"] and pooled["unit"] == "pair"
    diffs = [s.scores["meta"][t] - s.scores["fresh-lora"][t] for s in seeds for t in s.scores["meta"]]
    entry = pooled["comparisons"]["meta - fresh-lora"]
    assert entry["pooled"]["n"] == 9 and entry["pooled"]["mean"] == pytest.approx(mean_ci(diffs)["mean"])
    assert entry["pooled"]["ci95"] == pytest.approx(mean_ci(diffs)["ci95"])
    assert [s["n"] for s in entry["seeds"]] == [3, 3, 3]
    table = pooled_table(pooled, ["a", "b", "c"])
    assert table.splitlines()[0] == "| difference | a | b | c | pooled (pairs) |"
    assert "(n=9)" in table and table.count("\n") == 3


def test_seeds_of_the_same_tasks_pool_by_task(tmp_path):
    """Seeds that evaluate the same (non built-in) tasks: each task one unit, averaged over the seeds."""
    seeds = [seed_scores([SeedPart.parse(_write(tmp_path, f"s{s}", _results(["fresh-lora", "meta"], seed=s,
                                                                            source="bigbench")))], 2) for s in range(3)]
    pooled = pool_seeds(seeds)
    assert pooled["unit"] == "task"
    by_task = [sum(s.scores["meta"][t] - s.scores["fresh-lora"][t] for s in seeds) / 3 for t in ("t0", "t1", "t2")]
    entry = pooled["comparisons"]["meta - fresh-lora"]["pooled"]
    assert entry["n"] == 3 and entry["mean"] == pytest.approx(mean_ci(by_task)["mean"])
    assert entry["ci95"] == pytest.approx(mean_ci(by_task)["ci95"])
    assert pool_seeds(seeds, unit="pair")["comparisons"]["meta - fresh-lora"]["pooled"]["n"] == 9
    same_seed = [seed_scores([SeedPart.parse(_write(tmp_path, f"b{s}", _results(["fresh-lora", "meta"], seed=0)))], 2)
                 for s in range(2)]  # built-in tasks read with the same seed: the same rules
    with pytest.raises(ConfigError, match="same episodes"):
        pool_seeds(same_seed)


def test_seeds_of_other_adapters_on_the_same_episodes_pool_by_task(tmp_path):
    """Meta-train seeds scored on one evaluation seed's episodes: accepted, each task one unit."""
    baselines = _write(tmp_path, "baselines", _results(["zero-shot", "icl"]))
    seeds = [seed_scores([SeedPart.parse(_write(tmp_path, f"m{s}", _results(["zero-shot", "multitask", "meta"],
                                                                           adapters=f"train-seed-{s}"))),
                          SeedPart.parse(baselines + ":icl")], 2) for s in range(3)]
    assert all(s.trained == ("multitask", "meta") for s in seeds)
    pooled = pool_seeds(seeds, [("meta", "multitask"), ("meta", "icl")])
    assert pooled["unit"] == "task"
    for a, b in (("meta", "multitask"), ("meta", "icl")):
        by_task = [sum(s.scores[a][t] - s.scores[b][t] for s in seeds) / 3 for t in ("t0", "t1", "t2")]
        entry = pooled["comparisons"][f"{a} - {b}"]["pooled"]
        assert entry["n"] == 3 and entry["mean"] == pytest.approx(mean_ci(by_task)["mean"])
    assert pool_seeds(seeds, unit="task")["unit"] == "task"
    with pytest.raises(ConfigError, match="not independent"):
        pool_seeds(seeds, unit="pair")
    with pytest.raises(ConfigError, match="the same adapters"):  # one seed's evaluation given twice
        pool_seeds([seeds[0], seed_scores([SeedPart.parse(str(tmp_path / "m0"))], 2)])
    only_baselines = seed_scores([SeedPart.parse(baselines)], 2)  # nothing trained tells the seeds apart
    with pytest.raises(ConfigError, match=r"share no trained method \(trained: none and \('multitask', 'meta'\)\)"):
        pool_seeds([only_baselines, seeds[0]])


def test_parts_of_a_seed_must_fit_together(tmp_path):
    base = _write(tmp_path, "base", _results(["zero-shot", "meta"]))
    other = _write(tmp_path, "other", _results(["fresh-lora"], fingerprint="g"))  # other episodes
    with pytest.raises(ConfigError, match="used episodes"):
        seed_scores([SeedPart.parse(base), SeedPart.parse(other)], 2)
    fewer = _write(tmp_path, "fewer", _results(["fresh-lora"], tasks=("t0", "t1")))
    with pytest.raises(ConfigError, match="other tasks"):
        seed_scores([SeedPart.parse(base), SeedPart.parse(fewer)], 2)
    again = _write(tmp_path, "again", _results(["zero-shot", "fresh-lora"]))
    with pytest.raises(ConfigError, match="'zero-shot' comes from two parts"):
        seed_scores([SeedPart.parse(base), SeedPart.parse(again)], 2)
    assert set(seed_scores([SeedPart.parse(base), SeedPart.parse(again + ":fresh-lora")], 2).scores) == \
        {"zero-shot", "meta", "fresh-lora"}
    other_model = _results(["fresh-lora"])
    other_model["config"]["max_length"] = 128
    with pytest.raises(ConfigError, match="max_length=128"):
        seed_scores([SeedPart.parse(base), SeedPart.parse(_write(tmp_path, "long", other_model))], 2)
    not_results = tmp_path / "run.json"
    not_results.write_text('{"status": "finished"}')
    with pytest.raises(ConfigError, match="is not the results.json"):
        seed_scores([SeedPart.parse(str(not_results))], 2)
    not_results.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="is not a JSON file"):
        seed_scores([SeedPart.parse(str(not_results))], 2)
    with pytest.raises(ConfigError, match=r"has no method\(s\) \['icl'\]"):
        seed_scores([SeedPart.parse(base + ":icl")], 2)
    trained_at_zero = _write(tmp_path, "zero", _results(["zero-shot", "meta"], steps=(0,)))
    with pytest.raises(ConfigError, match="scored meta after steps"):  # a method that trains needs the step itself
        seed_scores([SeedPart.parse(trained_at_zero)], 2)
    with pytest.raises(ConfigError, match="holds no results.json"):
        seed_scores([SeedPart.parse(str(tmp_path / "nope"))], 2)
    with pytest.raises(ConfigError, match="not in every seed"):
        pool_seeds([seed_scores([SeedPart.parse(base)], 2),
                    seed_scores([SeedPart.parse(_write(tmp_path, "s1", _results(["zero-shot"], seed=1)))], 2)],
                   [("meta", "zero-shot")])


def test_a_part_spec_names_its_methods_unless_the_path_itself_exists(tmp_path):
    assert SeedPart.parse("runs/x:icl, zero-shot") == SeedPart(Path("runs/x"), ("icl", "zero-shot"))
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert SeedPart.parse(str(odd)) == SeedPart(odd, ())
    with pytest.raises(ConfigError, match="name the methods"):
        SeedPart.parse("runs/x:")


@pytest.mark.parametrize("text, pairs", [
    ("meta-multitask", [("meta", "multitask")]),
    ("fresh-lora-zero-shot, meta-dynamic-meta", [("fresh-lora", "zero-shot"), ("meta-dynamic", "meta")]),
    ("meta - icl", [("meta", "icl")]),
])
def test_pairs_split_at_the_hyphen_between_two_methods(text, pairs):
    assert parse_pairs(text) == pairs


@pytest.mark.parametrize("text", ["meta", "meta-lora", "meta-multitask-icl"])
def test_a_pair_that_is_not_two_methods_is_refused(text):
    with pytest.raises(ConfigError, match="expected METHOD-METHOD"):
        parse_pairs(text)


@pytest.mark.parametrize(("argv", "message"), [
    (["--smoke", "{tmp}/x", "--seed", "y"], "--smoke pools its own tiny evaluations; drop --seed"),
    ([], "name the evaluations of each seed with --seed"),
    (["--seed", "y", "--out", "table.txt"], "--out table.txt: expected a .md file"),
    (["--seed", "{tmp}/missing"], "missing' holds no results.json"),
])
def test_the_script_refuses_bad_arguments_with_exit_2(argv, message, tmp_path, capsys):
    """benchmarks/pool_seeds.py: one line on stderr and exit 2, before any evaluation runs."""
    from benchmark_helpers import load_benchmark

    assert load_benchmark("pool_seeds").main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and not (tmp_path / "x").exists()


def test_seeds_pool_with_an_earlier_poolings_statistics_exactly(tmp_path):
    """Seeds 0 and 1 pooled and written; seed 2 added later from the JSON equals pooling all three at once."""
    from benchmark_helpers import load_benchmark

    dirs = [_write(tmp_path, f"s{s}", _results(["zero-shot", "fresh-lora", "meta"], seed=s)) for s in range(3)]
    script = load_benchmark("pool_seeds")
    pairs = ["--pairs", "meta-fresh-lora,meta-zero-shot"]
    assert script.main(["--seed", dirs[0], "--seed", dirs[1], *pairs, "--out", str(tmp_path / "first.md")]) == 0
    assert script.main(["--seed", dirs[2], *pairs, "--earlier", str(tmp_path / "first.json"),
                        "--labels", "a,b,c", "--out", str(tmp_path / "all.md")]) == 0
    extended = json.loads((tmp_path / "all.json").read_text())
    at_once = pool_seeds([seed_scores([SeedPart.parse(d)], 2) for d in dirs],
                         [("meta", "fresh-lora"), ("meta", "zero-shot")])
    assert extended["seeds"] == 3 and extended["unit"] == "pair"
    assert [specs[0] for specs in extended["seeds_given"]] == dirs
    for name, entry in at_once["comparisons"].items():
        got = extended["comparisons"][name]
        assert [s["mean"] for s in got["seeds"]] == pytest.approx([s["mean"] for s in entry["seeds"]])
        for key in ("mean", "std", "ci95", "n"):
            assert got["pooled"][key] == pytest.approx(entry["pooled"][key]), (name, key)
        assert got["pooled"]["excludes_zero"] == entry["pooled"]["excludes_zero"]
    rows = [line for line in (tmp_path / "all.md").read_text().splitlines() if line.startswith("|")]
    assert rows[0] == "| difference | a | b | c | pooled (pairs) |" and rows[2].startswith("| meta - fresh-lora |")
    assert rows[2].count("(n=3)") == 3 and rows[2].endswith("(n=9) |")


@pytest.mark.parametrize(("extra", "message"), [
    (["--seed", "{s0}"], "already one of the earlier pooling's seeds"),
    (["--seed", "{s2}", "--step", "0"], "pooled with step=2, this pooling has step=0"),
    (["--seed", "{s2}", "--unit", "task"], "--unit task cannot"),
    (["--seed", "{s2}", "--pairs", "meta-icl"], "not in every seed"),
    (["--seed", "{s2}", "--labels", "a,b"], "--labels names 2 seeds, there are 3"),
])
def test_an_earlier_pooling_that_does_not_fit_is_refused(extra, message, tmp_path, capsys):
    from benchmark_helpers import load_benchmark

    dirs = {f"s{s}": _write(tmp_path, f"s{s}", _results(["fresh-lora", "meta"], seed=s)) for s in range(3)}
    script = load_benchmark("pool_seeds")
    assert script.main(["--seed", dirs["s0"], "--seed", dirs["s1"], "--out", str(tmp_path / "first.md")]) == 0
    capsys.readouterr()
    argv = [a.format(**dirs) for a in extra] + ["--earlier", str(tmp_path / "first.json")]
    assert script.main(argv) == 2
    assert message in capsys.readouterr().err


def test_pooling_from_statistics_refuses_another_unit_and_a_repeated_seed():
    from deltameta.evaluate.pooling import extend_pooled, pool_summaries

    stats = mean_ci([0.1, 0.3, -0.2])
    pooled = {"unit": "pair", "seeds": 1, "methods": ["meta", "fresh-lora"],
              "comparisons": {"meta - fresh-lora": {"seeds": [stats], "pooled": stats}}}
    with pytest.raises(ConfigError, match="unit is 'task'"):
        extend_pooled(dict(pooled, unit="task"), pooled)
    with pytest.raises(ConfigError, match="same seed given twice"):
        extend_pooled(pooled, pooled)
    with pytest.raises(ConfigError, match="n >= 2"):
        pool_summaries([stats, mean_ci([0.5])])
    assert pool_summaries([stats, mean_ci([0.5, 0.1])])["ci95"] == pytest.approx(mean_ci([0.1, 0.3, -0.2, 0.5, 0.1])["ci95"])


def _builtin_results(tmp_path, family: str, seed: int, tasks_per_family: int = 4, names: int = 4) -> str:
    """A results.json of built-in tasks ``{family}__000`` ... as an evaluation with ``seed`` would name them."""
    results = _results(["fresh-lora", "meta"], tasks=[f"{family}__{i:03d}" for i in range(names)], seed=seed,
                       source=f"builtin:{family}")
    results["config"].update(builtin_tasks_per_family=tasks_per_family, builtin_examples_per_task=8)
    return _write(tmp_path, f"{family}-{seed}", results)


def test_group_by_pools_each_group_of_task_descriptions(tmp_path, capsys):
    """Groups from each seed's own regenerated rules; a group's pooled mean is that of its (seed, task) pairs."""
    from benchmark_helpers import load_benchmark

    from deltameta.tasks.builtin import generate_family

    dirs = [_builtin_results(tmp_path, "string_op_pick", s) for s in (0, 1)]
    argv = ["--seed", dirs[0], "--seed", dirs[1], "--pairs", "meta-fresh-lora", "--group-by", r" through (\w+)"]
    assert load_benchmark("pool_seeds").main([*argv, "--out", str(tmp_path / "g.md")]) == 0
    labels = [{t.name: t.description.split(" through ")[1].split(" (")[0]
               for t in generate_family("string_op_pick", 4, 8, seed=s)} for s in (0, 1)]
    assert labels[0] != labels[1]  # so a grouping by seed 0's rules for both seeds would fail below
    diffs: dict[str, list[float]] = {}
    for folder, by_task in zip(dirs, labels):
        for task, entry in json.loads((Path(folder) / "results.json").read_text())["tasks"].items():
            meta, fresh = (sum(entry["methods"][m]["accuracy"]["2"]) / 2 for m in ("meta", "fresh-lora"))
            diffs.setdefault(by_task[task], []).append(meta - fresh)
    written = json.loads((tmp_path / "g.json").read_text())
    assert written["group_by"] == r" through (\w+)" and set(written["groups"]) == set(diffs)
    for group, values in diffs.items():
        pooled = written["groups"][group]["comparisons"]["meta - fresh-lora"]["pooled"]
        assert pooled["n"] == len(values) and pooled["mean"] == pytest.approx(sum(values) / len(values)), group
    assert sum(len(v) for v in diffs.values()) == written["comparisons"]["meta - fresh-lora"]["pooled"]["n"] == 8
    out = capsys.readouterr().out
    assert all(f"Group `{group}` of the tasks' descriptions" in out for group in diffs)


def test_group_by_a_regex_that_never_matches_gives_one_no_match_group(tmp_path):
    from benchmark_helpers import load_benchmark

    dirs = [_builtin_results(tmp_path, "number_pick", s) for s in (0, 1)]
    assert load_benchmark("pool_seeds").main(["--seed", dirs[0], "--seed", dirs[1], "--group-by", r" through (\w+)",
                                              "--out", str(tmp_path / "g.md")]) == 0
    written = json.loads((tmp_path / "g.json").read_text())
    assert list(written["groups"]) == ["(no match)"]
    assert written["groups"]["(no match)"]["comparisons"] == written["comparisons"]


@pytest.mark.parametrize(("source", "message"), [
    ("bigbench", "task 't0' of '{tmp}/b' is not a built-in task (tasks='bigbench'); --group-by needs built-in tasks"),
    ("builtin:number_pick", "task 'number_pick__003' of '{tmp}/b' is not among the built-in tasks regenerated"),
])
def test_group_by_refuses_tasks_without_a_regenerated_description(source, message, tmp_path, capsys):
    """A task --group-by cannot regenerate is named, never put in a group."""
    from benchmark_helpers import load_benchmark

    names = ["t0", "t1"] if source == "bigbench" else [f"number_pick__{i:03d}" for i in range(4)]
    results = _results(["fresh-lora", "meta"], tasks=names, source=source)
    results["config"]["builtin_tasks_per_family"] = 3  # number_pick__003 is not among 3 generated tasks
    folder = _write(tmp_path, "b", results)
    assert load_benchmark("pool_seeds").main(["--seed", folder, "--group-by", "greater"]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
