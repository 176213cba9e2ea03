"""Reader of BIG-bench JSON tasks (one ``task.json`` file, or a directory of them).

A file holds ``examples``, each with ``input`` and either ``target_scores`` (multiple choice:
option -> score, the highest positive scores are correct) or ``target`` (a string or a list of
acceptable strings, the first is used). The optional ``task_prefix``, ``example_input_prefix``,
``example_output_prefix``, ``choice_prefix`` and ``append_choices_to_input`` fields shape the
prompt exactly as BIG-bench does. The task name is the file stem; its family is the part of the
stem before ``__``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from deltameta.errors import DataError
from deltameta.tasks.task import Example, PromptTemplate, Task, family_of, parse_json

#: Files in a task directory that are not tasks.
NON_TASK_FILES = frozenset({"splits.json"})

_DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}


def load_json_file(path: Path) -> Any:
    """Read and parse a JSON file, turning every failure into a :class:`DataError`.

    Args:
        path: The file.

    Returns:
        The parsed value.

    Raises:
        DataError: unreadable file, invalid UTF-8 or malformed JSON (with line and column).
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read '{path}': {error.strerror or error}.") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"'{path}' is not valid UTF-8 (byte {error.start}).") from None
    return parse_json(text, f"'{path}'", "is not valid JSON")


def template_from_bigbench(spec: dict[str, Any], where: str = "") -> PromptTemplate:
    """Build the prompt template of a BIG-bench task from its formatting fields.

    Args:
        spec: The task's top-level object.
        where: File name for error messages.

    Returns:
        A template reproducing BIG-bench's prompt (the trailing space of the output prefix is
        moved to the front of the answer, so ``A: 5`` tokenizes with `` 5`` as the answer).

    Raises:
        DataError: a formatting field of the wrong type.
    """
    fields = {}
    for key, default in _DEFAULTS.items():
        value = spec.get(key, default)
        if isinstance(default, bool) and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"  # some BIG-bench files spell booleans as strings
        if type(value) is not type(default):
            raise DataError(f"{where}: field '{key}' must be a {type(default).__name__}, got {value!r:.60}.")
        fields[key] = value
    output_prefix = fields["example_output_prefix"]
    target_format = "{target}"
    if output_prefix.endswith(" "):
        output_prefix, target_format = output_prefix[:-1], " {target}"
    choices = "{choices}" if fields["append_choices_to_input"] else ""
    return PromptTemplate(
        input_format=fields["example_input_prefix"] + "{input}" + choices + output_prefix,
        target_format=target_format,
        instruction=fields["task_prefix"],
        separator="\n",
        choice_format=fields["choice_prefix"] + "{option}",
    )


def _parse_example(raw: Any, where: str) -> Example:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: an example must be a JSON object, got {type(raw).__name__}.")
    if "input" not in raw:
        raise DataError(f"{where}: missing field 'input'.")
    text = raw["input"]
    if not isinstance(text, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(text).__name__}.")
    try:
        if "target_scores" in raw:
            scores = raw["target_scores"]
            if not isinstance(scores, dict) or not scores:
                raise DataError("field 'target_scores' must be a non-empty object mapping option -> score.")
            for option, score in scores.items():
                if isinstance(score, bool) or not isinstance(score, (int, float)) or (isinstance(score, float) and not math.isfinite(score)):
                    raise DataError(f"target_scores[{option!r:.40}] must be a finite number, got {score!r:.40}.")
            options = list(scores)
            best = max(scores.values())
            if best <= 0:
                raise DataError("no option in 'target_scores' has a positive score, so no answer is correct.")
            correct = [i for i, option in enumerate(options) if scores[option] == best]
            return Example(input=text, target=options[correct[0]], options=options, correct=correct)
        if "target" in raw:
            target = raw["target"]
            if isinstance(target, list):
                if not target or not all(isinstance(t, str) for t in target):
                    raise DataError("field 'target' must be a string or a non-empty list of strings.")
                target = target[0]
            if not isinstance(target, str):
                raise DataError(f"field 'target' must be a string, got {type(target).__name__}.")
            return Example(input=text, target=target)
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    raise DataError(f"{where}: missing field 'target' (or 'target_scores' for multiple choice).")


def parse_bigbench(data: Any, name: str, source: str) -> Task:
    """Build a task from the parsed content of a BIG-bench JSON file.

    Args:
        data: Parsed JSON.
        name: Task name (the file stem).
        source: File path, for messages and :attr:`Task.source`.

    Returns:
        The task.

    Raises:
        DataError: wrong structure, bad example, or no examples (naming the file and example).
    """
    if not isinstance(data, dict):
        hint = " (to read a list of records, pass a column mapping so it is read as a Hugging Face dataset)" if isinstance(data, list) else ""
        raise DataError(f"'{source}': a BIG-bench task must be a JSON object with 'examples', got {type(data).__name__}{hint}.")
    if "examples" not in data:
        raise DataError(f"'{source}': missing field 'examples'.")
    raw_examples = data["examples"]
    if not isinstance(raw_examples, list):
        raise DataError(f"'{source}': field 'examples' must be a list, got {type(raw_examples).__name__}.")
    if not raw_examples:
        raise DataError(f"'{source}': task '{name}' has no examples (empty 'examples' list).")
    template = template_from_bigbench(data, f"'{source}'")
    examples = [_parse_example(raw, f"'{source}': examples[{i}]") for i, raw in enumerate(raw_examples)]
    description = data.get("description", "")
    return Task(
        name=name,
        family=family_of(name),
        examples=examples,
        source=source,
        template=template,
        description=description if isinstance(description, str) else "",
    )


def read_bigbench_file(path: str | Path) -> Task:
    """Read one BIG-bench JSON task file.

    Args:
        path: The ``.json`` file; its stem is the task name.

    Returns:
        The task.

    Raises:
        DataError: unreadable or malformed file, bad example.
    """
    path = Path(path)
    return parse_bigbench(load_json_file(path), path.stem, str(path))


def bigbench_files(directory: str | Path) -> list[Path]:
    """Return the task files of a directory (``*.json`` except ``splits.json``), sorted."""
    return sorted(p for p in Path(directory).glob("*.json") if p.is_file() and p.name not in NON_TASK_FILES)
