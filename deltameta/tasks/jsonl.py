"""Reader of MetaICL / CrossFit jsonl files: one JSON object per line.

Each line holds ``input`` and ``output`` (strings), optionally ``options`` (the answer options of
a multiple-choice task; ``output`` must be one of them; empty or missing for free-form) and
``task`` (the task name; the file stem when missing). An optional ``family`` overrides the family
derived from the task name. Blank lines are skipped. Lines of several tasks may be interleaved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltameta.errors import DataError
from deltameta.tasks.task import DEFAULT_TEMPLATE, Example, PromptTemplate, Task, family_of, parse_json


def _text_field(record: dict[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field '{key}' (fields present: {', '.join(map(str, record)) or 'none'}).")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__} {value!r:.40}.")
    return value


def parse_record(record: Any, where: str, default_task: str) -> tuple[str, str | None, Example]:
    """Turn one jsonl record into ``(task name, family or None, example)``.

    Args:
        record: The parsed line.
        where: ``'file' line N`` for error messages.
        default_task: Task name when the record has no ``task`` field.

    Returns:
        The task name, the explicit family (or ``None``) and the example.

    Raises:
        DataError: not an object, missing/mistyped field, output not among the options.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'input' and 'output', got {type(record).__name__}.")
    text = _text_field(record, "input", where)
    output = _text_field(record, "output", where)
    task = _text_field(record, "task", where) if "task" in record else default_task
    if not task.strip():
        raise DataError(f"{where}: field 'task' is empty.")
    family = _text_field(record, "family", where) if "family" in record else None
    options = record.get("options")
    if options is not None and not isinstance(options, list):
        raise DataError(f"{where}: field 'options' must be a list of strings, got {type(options).__name__}.")
    try:
        example = Example(input=text, target=output, options=list(options) if options else None)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    return task, family, example


def group_examples(rows: list[tuple[str, str | None, Example]], source: str, template: PromptTemplate) -> list[Task]:
    """Group ``(task, family, example)`` rows into tasks, in order of first appearance.

    Raises:
        DataError: one task given two different families.
    """
    examples: dict[str, list[Example]] = {}
    families: dict[str, str | None] = {}
    for task, family, example in rows:
        if task in families and family is not None and families[task] not in (None, family):
            raise DataError(f"'{source}': task '{task}' is given two families, '{families[task]}' and '{family}'.")
        if families.get(task) is None:
            families[task] = family
        examples.setdefault(task, []).append(example)
    return [
        Task(name=name, family=families[name] or family_of(name), examples=items, source=source, template=template)
        for name, items in examples.items()
    ]


def read_jsonl(path: str | Path, template: PromptTemplate = DEFAULT_TEMPLATE) -> list[Task]:
    """Read a MetaICL/CrossFit jsonl file.

    Args:
        path: The ``.jsonl`` file.
        template: Prompt template of its tasks.

    Returns:
        The tasks in order of first appearance.

    Raises:
        DataError: unreadable file, invalid UTF-8, malformed JSON line, bad record, or no
            examples at all (each naming the file and line).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read '{path}': {error.strerror or error}.") from None
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"'{path}' line {number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{where}: not valid UTF-8 (byte {error.start}).") from None
        if not line.strip():
            continue
        record = parse_json(line, f"{where}:", "malformed JSON", with_line=False)
        rows.append(parse_record(record, where, path.stem))
    if not rows:
        raise DataError(f"'{path}' holds no examples (it is empty or blank).")
    return group_examples(rows, str(path), template)
