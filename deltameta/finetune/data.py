"""The data of a fine-tuning run: the user's task(s), a train/validation split, token rows."""

from __future__ import annotations

import dataclasses
import random
import warnings
from typing import Any, Mapping, Sequence

from deltameta.errors import ConfigError, DataError


@dataclasses.dataclass
class Item:
    """One example with the task it belongs to (for its prompt template)."""

    task: Any
    example: Any


@dataclasses.dataclass
class FinetuneData:
    """Training and validation examples.

    Attributes:
        train: Training items.
        validation: Validation items (may be empty).
        tasks: Task name -> ``{"train": n, "validation": m}``.
    """

    train: list[Item]
    validation: list[Item]
    tasks: dict[str, dict[str, int]]


def _load(source: str, config: Any, what: str):
    from deltameta.tasks import TaskCollection, load_tasks
    from deltameta.tasks.loader import data_options

    collection = load_tasks(source, **data_options(config, source))
    if config.task_names:
        missing = [n for n in config.task_names if n not in collection]
        if missing and what == "tasks":
            import difflib

            close = difflib.get_close_matches(missing[0], collection.names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Tasks: {', '.join(collection.names[:20])}."
            raise ConfigError(f"task_names: {missing} not in tasks='{source}'.{hint}")
        keep = [t for t in collection if t.name in set(config.task_names)]
        if keep or what == "tasks":
            collection = TaskCollection(keep)
    if len(collection) == 0:
        raise DataError(f"{what}='{source}' holds no tasks.")
    return collection


def load_finetune_data(config: Any) -> FinetuneData:
    """Read ``config.tasks`` and split each task's examples into train and validation.

    Args:
        config: A :class:`~deltameta.finetune.config.FinetuneConfig`.

    Returns:
        The items; the split is a seeded shuffle per task (``val_fraction``), or ``val_tasks``.

    Raises:
        DataError: the source cannot be read or leaves no training example.
        ConfigError: unknown task names, or ``shots`` larger than a task.
    """
    collection = _load(config.tasks, config, "tasks")
    train: list[Item] = []
    validation: list[Item] = []
    counts: dict[str, dict[str, int]] = {}
    for task in collection:
        examples = list(task.examples)
        random.Random(f"{config.seed}:{task.name}").shuffle(examples)
        n_val = 0
        if not config.val_tasks and config.val_fraction > 0 and len(examples) > 1:
            n_val = min(max(1, round(len(examples) * config.val_fraction)), len(examples) - 1)
        val, rest = examples[:n_val], examples[n_val:]
        if config.shots:
            if config.shots > len(rest):
                raise ConfigError(
                    f"shots={config.shots} but task '{task.name}' has only {len(rest)} training examples "
                    f"({len(examples)} in all, {n_val} held out for validation); lower shots or val_fraction."
                )
            rest = rest[: config.shots]
        train += [Item(task, e) for e in rest]
        validation += [Item(task, e) for e in val]
        counts[task.name] = {"train": len(rest), "validation": len(val)}
    if config.val_tasks:
        for task in _load(config.val_tasks, config, "val_tasks"):
            validation += [Item(task, e) for e in task.examples]
            counts.setdefault(task.name, {"train": 0, "validation": 0})["validation"] = len(task.examples)
    if not train:
        raise DataError(f"tasks='{config.tasks}' leaves no training example.")
    return FinetuneData(train, validation, counts)


def encode_items(tokenizer, items: Sequence[Item], max_length: int,
                 demonstrations: Mapping[str, Sequence[Any]] | None = None) -> list[tuple[list[int], list[int]]]:
    """Tokenize items one by one with their task's template: ``(input_ids, labels)`` rows.

    Args:
        tokenizer: The tokenizer.
        items: The items.
        max_length: Longest row in tokens (prompts are cut on the left).
        demonstrations: Task name -> examples put before each of that task's prompts as in-context
            demonstrations (none when ``None`` or the task is absent).
    """
    from deltameta.tasks import TruncationWarning, encode_examples

    rows = []
    truncated = 0
    for item in items:
        demos = (demonstrations or {}).get(item.task.name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TruncationWarning)
            batch = encode_examples(tokenizer, [item.example], item.task.template, max_length, in_context=demos)
        truncated += any(issubclass(w.category, TruncationWarning) for w in caught)
        length = int(batch["attention_mask"][0].sum())
        rows.append((batch["input_ids"][0, :length].tolist(), batch["labels"][0, :length].tolist()))
    if truncated:
        warnings.warn(f"{truncated} of {len(rows)} example(s) exceeded max_length={max_length} tokens; their prompts "
                      "were truncated on the left.", stacklevel=2)
    return rows


def group_by_task(items: Sequence[Item]) -> list[tuple[Any, list[Any]]]:
    """``[(task, examples)]`` in order of first appearance."""
    groups: dict[str, tuple[Any, list[Any]]] = {}
    for item in items:
        groups.setdefault(item.task.name, (item.task, []))[1].append(item.example)
    return list(groups.values())
