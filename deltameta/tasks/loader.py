"""The single entry point :func:`load_tasks`: read any task source, merge, optionally split."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from deltameta.errors import ConfigError, DataError
from deltameta.tasks.bigbench import bigbench_files, read_bigbench_file
from deltameta.tasks.builtin import FAMILIES, SOURCE as BUILTIN, read_builtin
from deltameta.tasks.collection import TaskCollection, as_names, split_collection
from deltameta.tasks.hf import FILE_BUILDERS, read_hf
from deltameta.tasks.jsonl import read_jsonl
from deltameta.tasks.task import PromptTemplate, Task

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _progress(items: list, description: str, show: bool | None):
    if show is False or len(items) < 2:
        return items
    from tqdm.auto import tqdm

    # disable=None: a bar only on a terminal (logs and tests stay clean)
    return tqdm(items, desc=description, unit="file", disable=None if show is None else not show, leave=False)


def source_parts(source: str | Path | Sequence[str | Path]) -> list[str | Path]:
    """The sources of a ``tasks`` value: a list as is, ``'A+B'`` as ``[A, B]``, anything else alone.

    A string that names an existing file or directory is one source even when it holds ``+``.

    Args:
        source: A ``tasks`` value, e.g. ``'builtin:kv_lookup+../data/bigbench-lite'``.

    Returns:
        The sources, in order, empty parts dropped.
    """
    if not isinstance(source, (str, Path)):
        return list(source)
    text = str(source)
    if isinstance(source, Path) or "+" not in text or Path(text).expanduser().exists():
        return [source]
    return [part.strip() for part in text.split("+") if part.strip()]


def read_source(
    source: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    builtin_tasks_per_family: int = 16,
    builtin_examples_per_task: int = 64,
    seed: int = 0,
    hf_split: str = "train",
    hf_config: str | None = None,
    revision: str | None = None,
    show_progress: bool | None = None,
) -> list[Task]:
    """Read the tasks of one source (see :func:`load_tasks` for the accepted forms).

    Returns:
        The tasks, in source order.

    Raises:
        DataError: missing source, unsupported file type, or malformed content.
        ConfigError: unknown built-in family or bad column mapping key.
    """
    text = str(source)
    columns = columns or None
    if text == BUILTIN or text.startswith(BUILTIN + ":"):
        if columns is not None:
            raise ConfigError(f"columns={dict(columns)} applies to jsonl, csv/parquet and Hugging Face datasets sources; "
                              f"the built-in tasks ('{text}') have fixed fields. Drop columns or change tasks.")
        families = as_names(text.partition(":")[2]) or None  # None: read_builtin's DEFAULT_FAMILIES
        return read_builtin(families, builtin_tasks_per_family, builtin_examples_per_task, seed)
    if text.startswith("hf:"):
        return read_hf(text[3:], columns, split=hf_split, config=hf_config, revision=revision)
    path = Path(text).expanduser()
    try:
        path.stat()
    except FileNotFoundError:
        pass
    except OSError as error:  # e.g. a name too long for the file system
        shown = f"'{text}'" if len(text) <= 80 else f"'{text[:60]}...' ({len(text)} characters)"
        raise DataError(f"task source {shown} cannot be read as a path ({error.strerror}); give an existing file or "
                        "directory, 'builtin', or a hub id ('org/name' or 'hf:name').") from None
    if path.is_dir():
        files = sorted(bigbench_files(path) + [p for p in path.glob("*.jsonl") if p.is_file()])
        if not files:
            raise DataError(f"directory '{path}' holds no task files (*.json BIG-bench tasks or *.jsonl MetaICL files).")
        tasks: list[Task] = []
        for file in _progress(files, f"reading {path.name}", show_progress):
            if file.suffix == ".json":
                tasks.append(read_bigbench_file(file))
            elif columns is not None:  # a jsonl of other field names, read through datasets
                tasks.extend(read_hf(str(file), columns))
            else:
                tasks.extend(read_jsonl(file))
        return tasks
    if path.is_file():
        suffix = path.suffix.lower()
        if columns is not None and suffix in FILE_BUILDERS:
            return read_hf(str(path), columns)
        if suffix == ".json":
            return [read_bigbench_file(path)]
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix in FILE_BUILDERS:
            return read_hf(str(path), columns)
        raise DataError(
            f"'{path}': unsupported task file type '{path.suffix}'; expected .json (BIG-bench), .jsonl (MetaICL), "
            ".csv/.tsv/.parquet (Hugging Face datasets), a directory of tasks, 'builtin', or a hub id."
        )
    if _HUB_ID.match(text):
        return read_hf(text, columns, split=hf_split, config=hf_config, revision=revision)
    raise DataError(
        f"task source '{text}' not found: not an existing file or directory, not 'builtin' "
        f"(or 'builtin:FAMILY,...' with families {', '.join(FAMILIES)}), and not a hub id ('org/name' or 'hf:name')."
    )


def load_tasks(
    source: str | Path | Sequence[str | Path],
    *,
    splits: str | Path | Mapping[str, float] | None = None,
    columns: Mapping[str, str] | None = None,
    template: str | PromptTemplate | dict | None = None,
    builtin_tasks_per_family: int = 16,
    builtin_examples_per_task: int = 64,
    seed: int = 0,
    min_examples: int | None = None,
    hf_split: str = "train",
    hf_config: str | None = None,
    revision: str | None = None,
    show_progress: bool | None = None,
) -> TaskCollection | dict[str, TaskCollection]:
    """Read one or several task sources into a collection, optionally split by family.

    A source is

    * ``builtin`` (all built-in families) or ``builtin:caesar,linear`` (some of them);
    * a directory: every ``*.json`` (BIG-bench, except ``splits.json``) and ``*.jsonl`` (MetaICL);
    * a file: ``.json`` (BIG-bench), ``.jsonl`` (MetaICL), ``.csv``/``.tsv``/``.parquet`` (read
      with ``datasets``); with ``columns``, ``.json``/``.jsonl`` are read with ``datasets`` too;
    * a hub id ``org/name`` (or ``hf:name``), read with ``datasets`` using ``columns``.

    Several sources are merged: a list of them, or one string joining them with ``+``, e.g.
    ``builtin:kv_lookup+../data/bigbench-lite`` (see :func:`source_parts`). A ``splits.json`` may
    then name the built-in families beside the BIG-bench tasks.

    Args:
        source: One source, a list of them or ``'A+B'`` (merged; task names must be unique).
        splits: A ``splits.json`` path, ratios like ``"train=0.8,dev=0.1,test=0.1"``, or a ratio
            dict; families are the split unit. ``None`` or ``""``: no split.
        columns: Field -> column mapping for ``datasets`` sources (``input``, ``output`` (or
            ``target``), ``options``, ``task``); the ``*.jsonl`` files of a directory honour it too
            (BIG-bench files keep their fixed fields); an error with built-in tasks.
        template: Prompt template replacing every task's own (see :meth:`PromptTemplate.parse`).
        builtin_tasks_per_family: Tasks generated per built-in family.
        builtin_examples_per_task: Examples per built-in task.
        seed: Seed of built-in generation and of ratio splits.
        min_examples: Drop tasks with fewer examples (with a warning; error if none remain).
        hf_split: Split of a hub dataset.
        hf_config: Configuration of a hub dataset.
        revision: Revision of a hub dataset.
        show_progress: Progress bar while reading a directory (default: only on a terminal).

    Returns:
        A :class:`TaskCollection`, or split name -> collection when ``splits`` is given.

    Raises:
        DataError: missing or malformed source, duplicate task names, bad splits.
        ConfigError: bad column mapping key, template, family or ratios.
    """
    sources = source_parts(source)
    if not sources:
        raise DataError("no task source given.")
    tasks: list[Task] = []
    for item in sources:
        tasks.extend(
            read_source(
                item,
                columns=columns,
                builtin_tasks_per_family=builtin_tasks_per_family,
                builtin_examples_per_task=builtin_examples_per_task,
                seed=seed,
                hf_split=hf_split,
                hf_config=hf_config,
                revision=revision,
                show_progress=show_progress,
            )
        )
    if template is not None:
        parsed = PromptTemplate.parse(template)
        tasks = [dataclasses.replace(t, template=parsed) for t in tasks]
    collection = TaskCollection(tasks)
    if min_examples is not None:
        collection = collection.filter_min_examples(min_examples)
    if splits is None or splits == "":
        return collection
    return split_collection(collection, splits, seed)


def data_options(config: Any, source: str | None = None) -> dict[str, Any]:
    """The :func:`load_tasks` keywords a command's config sets (seed, built-in sizes, columns, template).

    Args:
        config: A ``meta-train``, ``finetune`` or ``evaluate`` config (``seed``, ``tasks``,
            ``builtin_*``, ``columns``, ``template``).
        source: The source read (default: ``config.tasks``).

    Returns:
        Keywords for :func:`load_tasks` (``columns``/``template`` only when set).
    """
    kwargs: dict[str, Any] = {"seed": config.seed}
    if any(str(part).startswith(BUILTIN) for part in source_parts(config.tasks if source is None else source)):
        kwargs.update(builtin_tasks_per_family=config.builtin_tasks_per_family,
                      builtin_examples_per_task=config.builtin_examples_per_task)
    if getattr(config, "columns", None):
        kwargs["columns"] = dict(config.columns)
    if getattr(config, "template", None):
        kwargs["template"] = config.template
    return kwargs
