"""The data model: an :class:`Example`, a :class:`PromptTemplate` and a :class:`Task`.

A task is a named list of examples that share one hidden rule; its *family* is the unit of the
train / validation / test split (tasks of one family never appear on both sides). A multiple-choice
example carries its ``options`` and the indices of the ``correct`` ones; a free-form example has
neither.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from deltameta.errors import ConfigError, DataError

#: Separator between a family and the rest of a task name (``color__hex`` -> family ``color``).
FAMILY_SEPARATOR = "__"


def family_of(name: str) -> str:
    """Return the family of a task name: the part before the first ``__`` (or the whole name).

    Args:
        name: Task name such as ``arithmetic__1_digit_addition``.

    Returns:
        The family, e.g. ``arithmetic``.
    """
    head = name.split(FAMILY_SEPARATOR, 1)[0]
    return head or name


def parse_json(text: str, where: str, invalid: str, with_line: bool = True) -> Any:
    """Parse JSON text, turning every parser failure into a :class:`DataError` naming ``where``.

    Args:
        text: The JSON text.
        where: The message's subject, e.g. ``"'task.json'"`` or ``"'data.jsonl' line 3:"``.
        invalid: What to call bad JSON, e.g. ``"is not valid JSON"`` or ``"malformed JSON"``.
        with_line: Report the line as well as the column of a syntax error.

    Raises:
        DataError: ``{where} {invalid}: {detail}.``
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        position = f"line {error.lineno}, column {error.colno}" if with_line else f"column {error.colno}"
        raise DataError(f"{where} {invalid}: {error.msg} at {position}.") from None
    except RecursionError:
        raise DataError(f"{where} {invalid}: nested too deeply to parse.") from None
    except ValueError as error:  # e.g. an integer literal beyond Python's digit limit
        raise DataError(f"{where} {invalid}: {error}.") from None


def _check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"field '{field}' must be a string, got {type(value).__name__} {_short(value)}.")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass
class Example:
    """One input with its answer.

    Attributes:
        input: The text the model reads (without the prompt template).
        target: The answer text; for multiple choice, the first correct option.
        options: The answer options of a multiple-choice example, ``None`` for free-form.
        correct: Indices into ``options`` of every correct option (at least one).

    Raises:
        DataError: a non-string input/target/option, an empty target, an empty or duplicated
            option list, or a target / correct index that is not among the options.
    """

    input: str
    target: str
    options: list[str] | None = None
    correct: list[int] | None = None

    def __post_init__(self) -> None:
        _check_text(self.input, "input")
        _check_text(self.target, "target")
        if self.options is None:
            if self.correct is not None:
                raise DataError("'correct' is given but the example has no options.")
            if not self.target.strip():
                raise DataError("target is empty; a free-form example needs a non-empty target.")
            return
        if not isinstance(self.options, (list, tuple)) or not self.options:
            raise DataError(f"options must be a non-empty list of strings, got {_short(self.options)}.")
        self.options = [_check_text(option, f"options[{i}]") for i, option in enumerate(self.options)]
        if len(set(self.options)) != len(self.options):
            duplicates = sorted({o for o in self.options if self.options.count(o) > 1})
            raise DataError(f"options contain duplicates: {_short(duplicates)}; every option must be distinct.")
        if self.correct is None:
            if self.target not in self.options:
                raise DataError(
                    f"target {_short(self.target)} is not among the options {_short(self.options, 120)}."
                )
            self.correct = [self.options.index(self.target)]
        else:
            if not isinstance(self.correct, (list, tuple)) or not self.correct:
                raise DataError(f"'correct' must be a non-empty list of option indices, got {_short(self.correct)}.")
            for index in self.correct:
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.options):
                    raise DataError(
                        f"correct index {_short(index)} is not an option index (0..{len(self.options) - 1})."
                    )
            self.correct = sorted(set(self.correct))
            if self.target not in [self.options[i] for i in self.correct]:
                raise DataError(f"target {_short(self.target)} is not one of the correct options.")

    @property
    def is_multiple_choice(self) -> bool:
        """Whether the example has answer options."""
        return self.options is not None

    @property
    def label(self) -> int:
        """Index of the (first) correct option; only for multiple-choice examples."""
        if self.correct is None:
            raise DataError("free-form example has no option label.")
        return self.correct[0]


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How an example is rendered as the prompt text and the answer text.

    Placeholders are replaced literally (no ``str.format``), so braces in data are harmless.

    Attributes:
        input_format: Prompt of one example; must contain ``{input}``; may contain ``{choices}``
            (the options, rendered with ``choice_format``; empty for free-form examples).
        target_format: Answer text; must contain ``{target}``. A leading space belongs here (not
            at the end of ``input_format``) so BPE tokenizers see `` answer`` as one word.
        instruction: Text put once at the very start of a prompt (BIG-bench ``task_prefix``).
        separator: Between in-context demonstrations and before the query.
        choice_format: One option inside ``{choices}``; must contain ``{option}``.
    """

    input_format: str = "{input}\nAnswer:"
    target_format: str = " {target}"
    instruction: str = ""
    separator: str = "\n\n"
    choice_format: str = "\n- {option}"

    def __post_init__(self) -> None:
        for field, placeholder in (("input_format", "{input}"), ("target_format", "{target}"), ("choice_format", "{option}")):
            value = getattr(self, field)
            if not isinstance(value, str) or placeholder not in value:
                raise ConfigError(f"prompt template field '{field}'={value!r} must be a string containing '{placeholder}'.")
        for field in ("instruction", "separator"):
            if not isinstance(getattr(self, field), str):
                raise ConfigError(f"prompt template field '{field}' must be a string.")

    @classmethod
    def parse(cls, spec: "str | PromptTemplate | dict[str, Any]") -> "PromptTemplate":
        """Build a template from a template, a dict of fields, or ``"INPUT_FORMAT|||TARGET_FORMAT"``.

        Args:
            spec: ``PromptTemplate``; dict of field values; or a string whose ``|||`` separates
                the input and target formats (a string without it is the input format).

        Returns:
            The template.

        Raises:
            ConfigError: unknown field or a format without its placeholder.
        """
        if isinstance(spec, PromptTemplate):
            return spec
        if isinstance(spec, dict):
            names = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(spec) - set(names))
            if unknown:
                raise ConfigError(f"unknown prompt template field(s) {unknown}; valid fields: {', '.join(names)}.")
            return cls(**spec)
        if isinstance(spec, str):
            spec = spec.replace("\\n", "\n")
            if "|||" in spec:
                input_format, target_format = spec.split("|||", 1)
                return cls(input_format=input_format, target_format=target_format)
            return cls(input_format=spec)
        raise ConfigError(f"prompt template must be a string, dict or PromptTemplate, got {type(spec).__name__}.")

    def render_input(self, example: Example) -> str:
        """Return the prompt part of one example (without the instruction)."""
        choices = ""
        if example.options is not None:
            choices = "".join(self.choice_format.replace("{option}", option) for option in example.options)
        return self.input_format.replace("{choices}", choices).replace("{input}", example.input)

    def render_target(self, target: str) -> str:
        """Return the answer text for ``target`` (an option or a free-form answer)."""
        return self.target_format.replace("{target}", target)

    def render_prompt(self, example: Example, in_context: Sequence[Example] = ()) -> str:
        """Return the whole prompt: instruction, demonstrations with answers, then the query input.

        Args:
            example: The query example.
            in_context: Demonstrations put before it (MetaICL-style in-context learning).

        Returns:
            The prompt text; the answer (:meth:`render_target`) follows it directly.
        """
        parts = [self.render_input(d) + self.render_target(d.target) for d in in_context]
        parts.append(self.render_input(example))
        return (self.instruction + self.separator.join(parts)).lstrip()


#: Template of MetaICL/CrossFit jsonl and Hugging Face datasets.
DEFAULT_TEMPLATE = PromptTemplate()


@dataclasses.dataclass
class Task:
    """A named set of examples sharing one rule.

    Attributes:
        name: Unique name within a collection.
        family: Split unit; tasks of one family are never on both sides of a split.
        examples: At least one example.
        source: Where the task was read from (file path, ``builtin``, hub id).
        template: How its examples are rendered.
        description: Free text (BIG-bench ``description``, built-in rule).

    Raises:
        DataError: empty name or no examples.
    """

    name: str
    family: str
    examples: list[Example]
    source: str = ""
    template: PromptTemplate = DEFAULT_TEMPLATE
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DataError(f"task name must be a non-empty string, got {_short(self.name)} (source '{self.source}').")
        if not self.examples:
            raise DataError(f"task '{self.name}' (source '{self.source}') has no examples.")
        if not self.family:
            self.family = family_of(self.name)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def is_multiple_choice(self) -> bool:
        """Whether every example has options."""
        return all(e.options is not None for e in self.examples)

    @property
    def num_options(self) -> int | None:
        """Most options of any example (``None`` for a free-form task)."""
        counts = [len(e.options) for e in self.examples if e.options is not None]
        return max(counts) if counts else None
