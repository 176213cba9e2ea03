"""Fuzzing the readers: random bytes and random JSON raise only DataError, never another crash."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltameta.errors import DataError
from deltameta.tasks import Task, TaskCollection
from deltameta.tasks.bigbench import parse_bigbench, read_bigbench_file
from deltameta.tasks.hf import tasks_from_dataset
from deltameta.tasks.jsonl import read_jsonl

#: Inputs per reader: 4 x 750 = 3,000 fuzzed inputs (about half a minute on 2 shared cores);
#: DELTAMETA_FUZZ_EXAMPLES=N runs more (the issue-13 audit ran about 42,000).
EXAMPLES = int(os.environ.get("DELTAMETA_FUZZ_EXAMPLES", "750"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12
)
field_values = st.one_of(json_values, st.text(max_size=6), st.lists(st.text(max_size=4), max_size=4))
bigbench_examples = st.dictionaries(
    st.sampled_from(["input", "target", "target_scores", "comment"]),
    st.one_of(field_values, st.dictionaries(st.text(max_size=4), st.one_of(st.integers(-2, 2), st.floats(), st.text(max_size=2)), max_size=4)),
    max_size=4,
)
bigbench_tasks = st.fixed_dictionaries(
    {"examples": st.one_of(st.lists(bigbench_examples, max_size=4), json_values)},
    optional={
        "task_prefix": field_values,
        "example_input_prefix": field_values,
        "example_output_prefix": field_values,
        "choice_prefix": field_values,
        "append_choices_to_input": st.one_of(st.booleans(), field_values),
        "description": field_values,
    },
)
records = st.dictionaries(
    st.sampled_from(["task", "input", "output", "options", "family", "extra"]),
    st.one_of(field_values, st.sampled_from(["a", "b"]), st.lists(st.sampled_from(["a", "b", "c"]), max_size=3)),
    max_size=6,
)


def _check(build) -> None:
    try:
        tasks = build()
    except DataError as error:
        assert str(error)  # a message, never empty
        return
    tasks = tasks if isinstance(tasks, list) else [tasks]
    assert all(isinstance(t, Task) and len(t) > 0 for t in tasks)
    TaskCollection(tasks)


def _write(data: bytes, suffix: str) -> Path:
    handle = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    handle.write(data)
    handle.close()
    return Path(handle.name)


@SETTINGS
@given(st.binary(max_size=200))
def test_bigbench_random_bytes(data):
    path = _write(data, ".json")
    try:
        _check(lambda: read_bigbench_file(path))
    finally:
        path.unlink()


@SETTINGS
@given(st.one_of(json_values, bigbench_tasks))
def test_bigbench_random_json(data):
    _check(lambda: parse_bigbench(data, "fuzz", "fuzz.json"))
    path = _write(json.dumps(data).encode(), ".json")
    try:
        _check(lambda: read_bigbench_file(path))
    finally:
        path.unlink()


@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=40), records.map(lambda r: json.dumps(r).encode())), max_size=6))
def test_jsonl_random_lines(lines):
    path = _write(b"\n".join(lines), ".jsonl")
    try:
        _check(lambda: read_jsonl(path))
    finally:
        path.unlink()


class _Rows:
    """A minimal stand-in for ``datasets.Dataset`` (rows as dicts)."""

    def __init__(self, rows, columns):
        self.rows, self.column_names, self.features = rows, columns, {}

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)


@SETTINGS
@given(st.lists(records, max_size=5), st.dictionaries(st.sampled_from(["input", "output", "options", "task"]), st.sampled_from(["input", "output", "options", "task", "extra", "nope"]), max_size=3))
def test_hf_rows_random(rows, columns):
    names = ["task", "input", "output", "options", "family", "extra"]
    full = [{name: row.get(name) for name in names} for row in rows]
    _check(lambda: tasks_from_dataset(_Rows(full, names), "fuzz.csv", columns))
