"""Collections, family splits and episode sampling."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from deltameta.errors import ConfigError, DataError
from deltameta.tasks import EpisodeSampler, Example, Task, TaskCollection, check_no_family_leak, load_tasks

BIGBENCH = Path(__file__).parent / "fixtures" / "tasks" / "bigbench"


def make_task(name: str, size: int, options: list[str] | None = None, family: str = "") -> Task:
    examples = [
        Example(f"{name} {i}", options[i % len(options)] if options else f"t{i}", options=list(options) if options else None)
        for i in range(size)
    ]
    return Task(name=name, family=family, examples=examples)


@pytest.fixture(scope="module")
def builtin():
    return load_tasks("builtin", builtin_tasks_per_family=3, builtin_examples_per_task=24, seed=1)


def assert_no_leak(splits: dict[str, TaskCollection]) -> None:
    seen: dict[str, str] = {}
    for name, collection in splits.items():
        for task in collection:
            assert seen.setdefault(task.family, name) == name, f"family {task.family} leaks into {name}"
    check_no_family_leak(splits)


# ---------------------------------------------------------------------------------------------
# collections and splits


def test_split_from_file_by_family():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = load_tasks(BIGBENCH, splits=BIGBENCH / "splits.json")
    assert list(splits) == ["meta_train", "dev"]
    # color__name is not listed but follows its family (color) into meta_train
    assert sorted(splits["meta_train"].names) == ["color__hex", "color__name", "math__add"]
    assert splits["dev"].names == ["animal_sound"]
    assert_no_leak(splits)


def test_split_file_errors(tmp_path):
    collection = load_tasks(BIGBENCH)
    bad = tmp_path / "splits.json"
    bad.write_text(json.dumps({"train": ["color__hex"], "dev": ["color__name"]}))
    with pytest.raises(DataError, match="family 'color' appears in splits 'train' and 'dev'"):
        collection.split_from_file(bad)
    bad.write_text(json.dumps({"train": ["color__hex", "ghost"]}))
    with pytest.raises(DataError, match="match no task or family.*ghost"):
        collection.split_from_file(bad)
    bad.write_text(json.dumps({"train": ["color"]}))
    with pytest.warns(UserWarning, match="left out: animal_sound, math__add"):
        splits = collection.split_from_file(bad)
    assert sorted(splits["train"].names) == ["color__hex", "color__name"]
    bad.write_text("{oops")
    with pytest.raises(DataError, match="splits.json' is not valid JSON"):
        collection.split_from_file(bad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_by_ratio_no_leak(builtin, seed):
    splits = builtin.split_by_ratio({"train": 0.6, "dev": 0.2, "test": 0.2}, seed=seed)
    assert_no_leak(splits)
    assert all(len(c) > 0 for c in splits.values())
    assert sum(len(c) for c in splits.values()) == len(builtin)
    again = builtin.split_by_ratio({"train": 0.6, "dev": 0.2, "test": 0.2}, seed=seed)
    assert {k: v.names for k, v in splits.items()} == {k: v.names for k, v in again.items()}


def test_split_by_ratio_string_and_errors(builtin):
    splits = load_tasks("builtin:linear,caesar,word_map", builtin_tasks_per_family=2, splits="train=0.5,dev=0.5")
    assert_no_leak(splits)
    with pytest.raises(DataError, match="cannot split 1 family into 2"):
        load_tasks("builtin:linear", builtin_tasks_per_family=2, splits="train=0.5,dev=0.5")
    with pytest.raises(ConfigError, match="bad split ratio 'dev=x'"):
        load_tasks("builtin:linear", splits="train=0.5,dev=x")
    with pytest.raises(ConfigError, match="neither an existing splits.json file nor ratios"):
        load_tasks("builtin:linear", splits="train:0.5")
    with pytest.raises(ConfigError, match="non-negative"):
        builtin.split_by_ratio({"train": -1.0})


@pytest.mark.parametrize("fraction, held_per_family", [(0.125, 1), (0.25, 1), (0.5, 2), (0.9, 2)])
def test_hold_out_tasks_takes_some_tasks_of_every_family(builtin, fraction, held_per_family):
    """New tasks of seen families: every family keeps tasks and gives round(fraction * 3), clamped to [1, 2]."""
    kept, held = builtin.hold_out_tasks(fraction, seed=4)
    assert not set(kept.names) & set(held.names) and len(kept) + len(held) == len(builtin)
    assert kept.families == held.families == builtin.families
    assert all(len(tasks) == held_per_family for tasks in held.by_family().values())
    assert [n for n in builtin.names if n in set(held.names)] == held.names  # collection order kept
    assert builtin.hold_out_tasks(fraction, seed=4)[1].names == held.names  # seeded
    others = {tuple(builtin.hold_out_tasks(fraction, seed=s)[1].names) for s in range(5, 10)}
    assert held_per_family == 2 or len(others | {tuple(held.names)}) > 1  # the seed chooses which


def test_a_family_loses_the_same_tasks_whichever_other_families_are_present(builtin):
    alone = builtin.subset(["linear"]).hold_out_tasks(0.34, seed=2)[1].names
    assert [n for n in builtin.hold_out_tasks(0.34, seed=2)[1].names if n.startswith("linear__")] == alone


@pytest.mark.parametrize(("size", "held"), [(4, 1), (12, 2), (20, 3), (3, 1)])
def test_hold_out_tasks_rounds_half_up(size, held):
    """0.125 of 4 tasks is 0.5 -> 1, of 12 is 1.5 -> 2, of 20 is 2.5 -> 3 (not banker's rounding)."""
    collection = TaskCollection([make_task(f"f{i}", 8, family="f") for i in range(size)])
    assert len(collection.hold_out_tasks(0.125)[1]) == held


def test_hold_out_tasks_keeps_single_task_families_and_refuses_when_none_has_two():
    collection = TaskCollection([make_task("a1", 8, family="a"), make_task("a2", 8, family="a"),
                                 make_task("b1", 8, family="b")])
    kept, held = collection.hold_out_tasks(0.5, seed=0)
    assert len(held) == 1 and held.families == ["a"] and "b1" in kept
    with pytest.raises(DataError, match="every one of the 2 families has a single task"):
        TaskCollection([make_task("a1", 8, family="a"), make_task("b1", 8, family="b")]).hold_out_tasks(0.5)
    with pytest.raises(DataError, match="the collection is empty"):
        TaskCollection().hold_out_tasks(0.5)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match=f"hold-out fraction {bad}: expected a fraction in \\(0, 1\\)"):
            collection.hold_out_tasks(bad)


def test_filter_min_examples_warns_and_errors():
    collection = TaskCollection([make_task("a", 10), make_task("b", 3), make_task("c", 2)])
    with pytest.warns(UserWarning, match=r"skipping 2 of 3 tasks with fewer than 5 examples: b \(3\), c \(2\)"):
        kept = collection.filter_min_examples(5)
    assert kept.names == ["a"]
    with pytest.raises(DataError, match="no task has at least 20 examples"):
        collection.filter_min_examples(20)


def test_empty_task_is_an_error():
    with pytest.raises(DataError, match="task 'x' .* has no examples"):
        Task(name="x", family="", examples=[])


def test_unknown_task_suggests_names():
    collection = load_tasks(BIGBENCH)
    with pytest.raises(DataError, match="Did you mean 'color__hex'"):
        collection["color_hex"]


# ---------------------------------------------------------------------------------------------
# episodes


def test_episodes_disjoint_and_sized(builtin):
    sampler = EpisodeSampler(builtin, shots=5, query_size=7, seed=0)
    for _ in range(30):
        episode = sampler.sample()
        assert len(episode.support) == 5 and len(episode.query) == 7
        ids = [id(e) for e in episode.support + episode.query]
        assert len(set(ids)) == 12  # no example in both sets (or twice)
        assert all(e in episode.task.examples for e in episode.support + episode.query)


def test_episodes_deterministic_and_resumable(builtin):
    def signature(episode):
        return episode.task.name, [e.input for e in episode.support], [e.input for e in episode.query]

    first = EpisodeSampler(builtin, shots=3, query_size=2, seed=7)
    stream = [signature(first.sample()) for _ in range(12)]
    second = EpisodeSampler(builtin, shots=3, query_size=2, seed=7)
    assert [signature(second.sample()) for _ in range(12)] == stream
    assert stream != [signature(e) for e in EpisodeSampler(builtin, shots=3, query_size=2, seed=8).sample_batch(12)]

    resumed = EpisodeSampler(builtin, shots=3, query_size=2, seed=7)
    partial = EpisodeSampler(builtin, shots=3, query_size=2, seed=7)
    [partial.sample() for _ in range(5)]
    state = json.loads(json.dumps(partial.state_dict()))
    resumed.load_state_dict(state)
    assert [signature(resumed.sample()) for _ in range(7)] == stream[5:]

    with pytest.raises(ConfigError, match="seed=7 but this sampler has 9"):
        EpisodeSampler(builtin, shots=3, query_size=2, seed=9).load_state_dict(state)
    with pytest.raises(ConfigError, match="tasks="):
        EpisodeSampler(builtin.subset(["linear"]), shots=3, query_size=2, seed=7).load_state_dict(state)


def test_meta_batch_sharding_matches_single_process(builtin):
    single = EpisodeSampler(builtin, shots=2, query_size=2, seed=3)
    batch = [e.index for e in single.sample_batch(6)]
    shards = []
    for rank in range(3):
        sampler = EpisodeSampler(builtin, shots=2, query_size=2, seed=3)
        shards.extend(e.index for e in sampler.sample_batch(6, rank=rank, world_size=3))
        assert sampler.next_index == 6
    assert sorted(shards) == batch
    with pytest.raises(ConfigError):
        single.sample_batch(4, rank=3, world_size=3)


def test_balanced_support_covers_classes():
    task = make_task("mc", 40, options=["a", "b", "c", "d"])
    sampler = EpisodeSampler(TaskCollection([task]), shots=8, query_size=4, seed=0, balanced=True)
    for _ in range(10):
        episode = sampler.sample()
        counts = {o: sum(e.target == o for e in episode.support) for o in "abcd"}
        assert set(counts.values()) == {2}
        assert {e.target for e in episode.query} == set("abcd")


def test_task_weights_and_bias(builtin):
    only = EpisodeSampler(builtin, shots=1, query_size=1, seed=0, task_weights={"caesar": 1.0})
    assert {only.sample().task.family for _ in range(20)} == {"caesar"}
    biased = EpisodeSampler(builtin, shots=1, query_size=1, seed=0, bias={"names": ["linear"], "probability": 0.9})
    families = [biased.sample().task.family for _ in range(200)]
    assert families.count("linear") > 150
    for spec in ("family", "examples"):
        EpisodeSampler(builtin, shots=1, query_size=1, task_weights=spec).sample()
    with pytest.raises(ConfigError, match="match no task or family"):
        EpisodeSampler(builtin, shots=1, query_size=1, task_weights={"ghost": 1.0})
    with pytest.raises(ConfigError, match="unknown task weighting"):
        EpisodeSampler(builtin, shots=1, query_size=1, task_weights="popular")
    with pytest.raises(ConfigError, match="probability in"):
        EpisodeSampler(builtin, shots=1, query_size=1, bias=(["linear"], 2.0))


def test_sampler_skips_small_tasks_with_warning():
    collection = TaskCollection([make_task("big", 10), make_task("small", 4)])
    with pytest.warns(UserWarning, match=r"small \(4\)"):
        sampler = EpisodeSampler(collection, shots=4, query_size=2)
    assert {sampler.sample().task.name for _ in range(5)} == {"big"}
    with pytest.raises(DataError, match="no task has at least 20"):
        EpisodeSampler(collection, shots=16, query_size=4)
    with pytest.raises(ConfigError, match="query_size"):
        EpisodeSampler(collection, shots=1, query_size=0)
