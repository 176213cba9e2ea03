"""Readers of task sources: BIG-bench JSON, MetaICL jsonl, Hugging Face datasets, built-in families."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from deltameta.errors import ConfigError, DataError
from deltameta.tasks import Example, PromptTemplate, TaskCollection, load_tasks
from deltameta.tasks.bigbench import read_bigbench_file
from deltameta.tasks.builtin import DEFAULT_FAMILIES, FAMILIES, generate_family
from deltameta.tasks.jsonl import read_jsonl
from deltameta.tasks.loader import data_options, source_parts

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
BIGBENCH = FIXTURES / "bigbench"


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Example


def test_example_validates_options():
    example = Example("x", "b", options=["a", "b"])
    assert example.correct == [1] and example.label == 1
    with pytest.raises(DataError, match="not among the options"):
        Example("x", "c", options=["a", "b"])
    with pytest.raises(DataError, match="duplicates"):
        Example("x", "a", options=["a", "a"])
    with pytest.raises(DataError, match="target is empty"):
        Example("x", " ")
    with pytest.raises(DataError, match="correct index 5"):
        Example("x", "a", options=["a", "b"], correct=[5])


# ---------------------------------------------------------------------------------------------
# BIG-bench


def test_bigbench_multiple_choice_file():
    task = read_bigbench_file(BIGBENCH / "color__hex.json")
    assert task.name == "color__hex" and task.family == "color"
    assert len(task) == 8 and task.is_multiple_choice
    first = task.examples[0]
    assert first.input == "red" and first.target == "#ff0000" and first.options[first.label] == "#ff0000"
    prompt = task.template.render_prompt(first)
    assert prompt.startswith("Give the hex code.\n\nColor: red\n  option: #ff0000")
    assert prompt.endswith("\nHex:") and task.template.render_target(first.target) == " #ff0000"


def test_bigbench_no_choices_and_free_form():
    name = read_bigbench_file(BIGBENCH / "color__name.json")
    assert "choice" not in name.template.render_prompt(name.examples[0])
    assert name.template.render_prompt(name.examples[0]) == "Q: #ff0000\nA:"  # BIG-bench default prefixes
    add = read_bigbench_file(BIGBENCH / "math__add.json")
    assert not add.is_multiple_choice and add.num_options is None
    assert add.examples[-1].target == "2"  # first of a list of acceptable targets


def test_bigbench_directory_skips_splits_file():
    collection = load_tasks(BIGBENCH)
    assert sorted(collection.names) == ["animal_sound", "color__hex", "color__name", "math__add"]
    assert collection.families == ["animal_sound", "color", "math"]


def test_bigbench_multiple_correct_answers(tmp_path):
    path = write_json(tmp_path / "t.json", {"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0, "c": 1}}]})
    example = read_bigbench_file(path).examples[0]
    assert example.correct == [0, 2] and example.target == "a"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"examples": []}, "has no examples"),
        ({"foo": 1}, "missing field 'examples'"),
        ([{"input": "a"}], "must be a JSON object"),
        ({"examples": [{"target": "a"}]}, r"examples\[0\]: missing field 'input'"),
        ({"examples": [{"input": "a"}, {"input": "b"}]}, r"examples\[0\]: missing field 'target'"),
        ({"examples": [{"input": "a", "target_scores": {"x": 0, "y": 0}}]}, "no option .* positive score"),
        ({"examples": [{"input": "a", "target_scores": {"x": "1"}}]}, "must be a finite number"),
        ({"examples": [{"input": 3, "target": "a"}]}, "'input' must be a string"),
        ({"examples": [{"input": "a", "target": ""}]}, "target is empty"),
        ({"examples": [{"input": "a", "target": "b"}], "append_choices_to_input": 3}, "append_choices_to_input"),
    ],
)
def test_bigbench_errors_name_file_and_field(tmp_path, data, message):
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=message) as info:
        read_bigbench_file(path)
    assert "bad.json" in str(info.value)


def test_bigbench_malformed_json_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"examples": [\n  {"input": "a",, }\n]}')
    with pytest.raises(DataError, match=r"broken.json.*line 2"):
        read_bigbench_file(path)


# ---------------------------------------------------------------------------------------------
# MetaICL jsonl


def test_jsonl_reader_groups_tasks():
    tasks = {t.name: t for t in read_jsonl(FIXTURES / "metaicl.jsonl")}
    assert set(tasks) == {"glue__sst2", "copy__word"}
    assert tasks["glue__sst2"].is_multiple_choice and len(tasks["glue__sst2"]) == 6
    assert tasks["glue__sst2"].family == "glue"
    assert not tasks["copy__word"].is_multiple_choice  # empty options -> free-form
    assert tasks["copy__word"].template.render_prompt(tasks["copy__word"].examples[0]) == "word0\nAnswer:"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"input": "a", "output": "b"}', "{not json"], "line 2: malformed JSON"),
        (['{"input": "a"}'], "line 1: missing field 'output'"),
        (['{"output": "a"}'], "line 1: missing field 'input'"),
        (['{"input": "a", "output": "c", "options": ["a", "b"]}'], "line 1: target 'c' is not among the options"),
        (['{"input": "a", "output": "b", "options": "a|b"}'], "line 1: field 'options' must be a list"),
        (['[1, 2]'], "line 1: expected a JSON object"),
        (["", "  "], "holds no examples"),
        (['{"input": "a", "output": "b", "task": ""}'], "field 'task' is empty"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as info:
        read_jsonl(path)
    assert "bad.jsonl" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (local files)


def test_hf_csv_with_column_mapping():
    collection = load_tasks(FIXTURES / "qa.csv", columns={"input": "question", "output": "answer", "options": "choices", "task": "name"})
    task = collection["plus__one"]
    assert task.family == "plus" and len(task) == 6
    assert task.examples[0].input == "0 plus 1?" and task.examples[0].target == "1"
    assert task.examples[0].options == ["1", "2"]


def test_hf_jsonl_without_task_column_is_one_task(tmp_path):
    path = tmp_path / "mini.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) for i in range(4)) + "\n")
    collection = load_tasks(path, columns={"input": "q", "output": "a"})
    assert collection.names == ["mini"] and len(collection["mini"]) == 4


def test_hf_unknown_column_lists_available():
    with pytest.raises(DataError, match=r"unknown column 'prompt'.*Available columns: question, answer, choices, name"):
        load_tasks(FIXTURES / "qa.csv", columns={"input": "prompt", "output": "answer"})
    with pytest.raises(DataError, match="no column for 'input'.*Available columns"):
        load_tasks(FIXTURES / "qa.csv", columns={"output": "answer"})
    with pytest.raises(ConfigError, match="unknown column mapping key"):
        load_tasks(FIXTURES / "qa.csv", columns={"inputs": "question", "output": "answer"})


def test_hf_bad_rows_name_the_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('q,a,opts\nx,1,"[""2"", ""3""]"\n')
    with pytest.raises(DataError, match=r"row 0: target '1' is not among the options"):
        load_tasks(path, columns={"input": "q", "output": "a", "options": "opts"})


# ---------------------------------------------------------------------------------------------
# built-in families


def test_builtin_is_seeded_and_distinct():
    first = generate_family("caesar", 6, 20, seed=3)
    again = generate_family("caesar", 6, 20, seed=3)
    other = generate_family("caesar", 6, 20, seed=4)
    assert [t.description for t in first] == [t.description for t in again]
    assert [e.input for e in first[0].examples] == [e.input for e in again[0].examples]
    assert [t.description for t in first] != [t.description for t in other]
    assert len({t.description for t in first}) == 6  # distinct hidden rules


def test_builtin_families_are_short_and_meaningful():
    collection = load_tasks("builtin:" + ",".join(FAMILIES), builtin_tasks_per_family=3, builtin_examples_per_task=24)
    assert collection.families == sorted(FAMILIES)
    kinds = {t.family: t.is_multiple_choice for t in collection}
    assert any(kinds.values()) and not all(kinds.values())
    for task in collection:
        assert task.source == "builtin" and len(task) == 24
        assert len({e.input for e in task.examples}) == len(task)  # no repeated inputs
        assert all(len(e.input) < 60 and len(e.target) < 40 for e in task.examples)


def test_plain_builtin_reads_the_default_families_only():
    """``builtin`` alone keeps meaning the first eight families, so earlier runs reproduce."""
    collection = load_tasks("builtin", builtin_tasks_per_family=2, builtin_examples_per_task=8)
    assert collection.families == sorted(DEFAULT_FAMILIES)
    assert set(DEFAULT_FAMILIES) < set(FAMILIES)
    assert load_tasks("builtin:word_property", builtin_tasks_per_family=2).families == ["word_property"]


def _position_rule(task):
    """The answer sits at the position the description names, in every example."""
    position = int(task.description.split()[1]) - 1  # "item 2 of 4 words"
    return all(e.options.index(e.target) == position for e in task.examples)


def _compare_rule(task):
    numbers = [[int(o) for o in e.options] for e in task.examples]
    answers = [int(e.target) for e in task.examples]
    words = task.description.split()
    if "closest" in words or "farthest" in words:
        center, pick = int(words[-1]), (min if "closest" in words else max)
        return all(a == pick(xs, key=lambda x: abs(x - center)) for xs, a in zip(numbers, answers))
    pick = {"largest": max, "smallest": min, "middle": lambda xs: sorted(xs)[1]}[words[1]]
    return all(a == pick(xs) for xs, a in zip(numbers, answers))


def _property_rule(task):
    """Two fixed label words, both used; the first is the answer exactly when the word has the property."""
    labels = {tuple(e.options) for e in task.examples}
    if len(labels) != 1 or {e.target for e in task.examples} != set(next(iter(labels))):
        return False
    yes = next(iter(labels))[0]
    has = {"longer": lambda w, p: len(w) > int(p), "contains": lambda w, p: p in w,
           "starts_before": lambda w, p: w[0] < p, "ends_vowel": lambda w, p: w[-1] in "aeiou"}
    text = task.description
    if "more than" in text:
        test, parameter = has["longer"], text.split("more than ")[1].split()[0]
    elif "contains" in text:
        test, parameter = has["contains"], text.split("contains '")[1][0]
    elif "starts before" in text:
        test, parameter = has["starts_before"], text.split("before '")[1][0]
    else:
        test, parameter = has["ends_vowel"], None
    return all((e.target == yes) == test(e.input, parameter) for e in task.examples)


def _count_rule(task):
    """The answer counts the input's words of the category the description names (and only they occur)."""
    from deltameta.tasks.builtin import CATEGORIES

    counted = task.description.split(" of category ")[1].split(" (")[0]
    others = task.description.split("(others: ")[1].rstrip(")").split(", ")
    allowed = set(CATEGORIES[counted]).union(*(CATEGORIES[o] for o in others))
    answers = {e.target for e in task.examples}
    return len(answers) > 1 and all(
        set(e.input.split()) <= allowed and len(e.input.split()) == 3
        and int(e.target) == sum(w in CATEGORIES[counted] for w in e.input.split()) for e in task.examples)


def _pick_rule(task):
    """One word of each of the three named categories; the answer is the one of the picked category."""
    from deltameta.tasks.builtin import CATEGORIES

    picked = task.description.split(" of category ")[1].split(" (")[0]
    others = task.description.split("(others: ")[1].rstrip(")").split(", ")
    positions = {e.options.index(e.target) for e in task.examples}
    return len(positions) > 1 and all(
        e.input.split() == e.options and e.target in CATEGORIES[picked]
        and sorted(c for c in CATEGORIES for w in e.options if w in CATEGORIES[c]) == sorted([picked, *others])
        for e in task.examples)


def _number_pick_rule(task):
    """Exactly one of the three numbers has the property the description names, and it is the answer."""
    text = task.description.removeprefix("the number that ")
    parameter = int(text.split()[-1]) if text[-1].isdigit() else None
    has = {"is even": lambda x: x % 2 == 0, "is greater than": lambda x: x > parameter,
           "is divisible by": lambda x: x % parameter == 0, "contains the digit": lambda x: str(parameter) in str(x),
           "has an even digit sum": lambda x: sum(map(int, str(x))) % 2 == 0}
    test = next(test for prefix, test in has.items() if text.startswith(prefix))
    positions = {e.options.index(e.target) for e in task.examples}
    return len(positions) > 1 and all(
        e.input.split() == e.options and [o for o in e.options if test(int(o))] == [e.target]
        for e in task.examples)


def _string_op_pick_rule(task):
    """The options are the input words through the three named operations; the answer is the hidden one's."""
    from deltameta.tasks.builtin import _STRING_OPS

    target = task.description.split(" through ")[1].split(" (")[0]
    others = task.description.split("(others: ")[1].rstrip(")").split(", ")
    positions = {e.options.index(e.target) for e in task.examples}
    return len(positions) > 1 and "last_word" not in (target, *others) and all(
        e.target == _STRING_OPS[target](e.input.split())
        and sorted(e.options) == sorted(_STRING_OPS[name](e.input.split()) for name in (target, *others))
        for e in task.examples)


@pytest.mark.parametrize("family, rule, options", [
    ("position_pick", _position_rule, range(3, 7)),
    ("number_compare", _compare_rule, {3}),
    ("word_property", _property_rule, {2}),
    ("category_count", _count_rule, {4}),
    ("category_pick", _pick_rule, {3}),
    ("number_pick", _number_pick_rule, {3}),
    ("string_op_pick", _string_op_pick_rule, {3}),
])
def test_later_families_follow_their_hidden_rule(family, rule, options):
    tasks = generate_family(family, 12, 32, seed=5)
    assert len({t.description for t in tasks}) == 12  # distinct hidden rules
    for task in tasks:
        assert task.is_multiple_choice and len(task) == 32
        for example in task.examples:
            assert example.target in example.options and len(set(example.options)) == len(example.options)
            assert len(example.options) in options and len(example.input) < 60
        assert rule(task), task.description


def test_string_op_pick_raises_when_no_words_give_distinct_options(monkeypatch):
    """When every draw collides, the redraw loop raises instead of returning repeated options."""
    from deltameta.tasks import builtin

    monkeypatch.setattr(builtin, "_STRING_OPS", {name: (lambda words: "same") for name in builtin._PICK_OPERATIONS})
    with pytest.raises(RuntimeError, match="string_op_pick: no two words give distinct outputs"):
        generate_family("string_op_pick", 1, 4)


def test_builtin_family_subset_and_unknown_family():
    collection = load_tasks("builtin:linear,kv_lookup", builtin_tasks_per_family=2)
    assert collection.families == ["kv_lookup", "linear"]
    with pytest.raises(ConfigError, match="unknown built-in task family 'nope'"):
        load_tasks("builtin:nope")


# ---------------------------------------------------------------------------------------------
# load_tasks dispatch


def test_load_tasks_merges_sources_and_overrides_template():
    collection = load_tasks([BIGBENCH, FIXTURES / "metaicl.jsonl"], template="Q: {input}\\nA:||| {target}")
    assert isinstance(collection, TaskCollection) and len(collection) == 6
    task = collection["glue__sst2"]
    assert task.template == PromptTemplate("Q: {input}\nA:", " {target}")


def test_plus_joins_sources_and_a_splits_file_names_builtin_families(tmp_path):
    """'builtin:F+DIR' mixes built-in and BIG-bench tasks; a splits.json may name the built-in families."""
    splits = write_json(tmp_path / "splits.json", {"meta_train": ["kv_lookup", "color"], "dev": ["math", "animal_sound"]})
    result = load_tasks(f"builtin:kv_lookup+{BIGBENCH}", splits=splits, builtin_tasks_per_family=3,
                        builtin_examples_per_task=8)
    assert result["meta_train"].families == ["color", "kv_lookup"]
    assert sorted(result["meta_train"].names) == ["color__hex", "color__name", *(f"kv_lookup__{i:03d}" for i in range(3))]
    assert sorted(result["dev"].names) == ["animal_sound", "math__add"]
    assert len(load_tasks(f"{BIGBENCH}+{FIXTURES / 'metaicl.jsonl'}")) == 6  # the same as the list form


def test_plus_in_an_existing_path_is_one_source(tmp_path):
    folder = tmp_path / "tasks+more"
    folder.mkdir()
    write_json(folder / "a__b.json", {"examples": [{"input": "q", "target_scores": {"x": 1, "y": 0}}]})
    assert source_parts(str(folder)) == [str(folder)]
    assert load_tasks(str(folder)).names == ["a__b"]
    assert source_parts("builtin:linear + x.jsonl") == ["builtin:linear", "x.jsonl"]
    with pytest.raises(DataError, match="'nowhere' not found"):
        load_tasks("builtin:linear+nowhere")


def test_data_options_pass_builtin_sizes_when_any_part_is_builtin():
    config = SimpleNamespace(seed=1, tasks=f"{BIGBENCH}+builtin:linear", builtin_tasks_per_family=5,
                             builtin_examples_per_task=9, columns={}, template="")
    assert data_options(config) == {"seed": 1, "builtin_tasks_per_family": 5, "builtin_examples_per_task": 9}
    assert data_options(config, str(BIGBENCH)) == {"seed": 1}


def test_load_tasks_duplicate_names_and_missing_sources(tmp_path):
    with pytest.raises(DataError, match="appears twice"):
        load_tasks([BIGBENCH, BIGBENCH / "color__hex.json"])
    with pytest.raises(DataError, match="not found"):
        load_tasks(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported task file type"):
        load_tasks(tmp_path / "x.txt")
    with pytest.raises(DataError, match="holds no task files"):
        load_tasks(tmp_path)
    with pytest.raises(ConfigError, match="must be a string containing '{input}'"):
        load_tasks(BIGBENCH, template="no placeholder")
