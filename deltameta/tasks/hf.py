"""Reader of Hugging Face ``datasets``: a local json/jsonl/csv/parquet file or a hub id.

A column mapping says which column holds each field: ``input`` and ``output`` (required; ``target``
is another name of ``output``),
``options`` (a list, or a string holding a JSON list; optional) and ``task`` (optional; without
it, the whole dataset is one task named after the file or the dataset). Mapping values default
to the field names. An ``output`` column of ``ClassLabel`` type becomes a multiple-choice task
whose options are the label names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from deltameta.errors import ConfigError, DataError
from deltameta.home import deltameta_home
from deltameta.tasks.jsonl import group_examples
from deltameta.tasks.task import DEFAULT_TEMPLATE, Example, PromptTemplate

#: Fields a column mapping may name.
COLUMN_FIELDS = ("input", "output", "options", "task")
#: Other names of a field in a column mapping (``target`` is the :class:`Example` field of ``output``).
COLUMN_ALIASES = {"target": "output"}
#: File suffix -> ``datasets`` builder name.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return f"{type(error).__name__}: {error}"


def load_hf_dataset(source: str, *, split: str = "train", config: str | None = None, revision: str | None = None):
    """Load a ``datasets.Dataset`` from a local file or the hub.

    Args:
        source: Path of a json/jsonl/csv/tsv/parquet file, or a hub id (``org/name``).
        split: Split to read.
        config: Dataset configuration (hub only).
        revision: Hub revision.

    Returns:
        The dataset.

    Raises:
        DataError: unsupported file type or a file/dataset that cannot be read.
    """
    import datasets

    cache_dir = str(deltameta_home() / "datasets")
    path = Path(source).expanduser()
    try:
        if path.exists():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"'{path}': unsupported file type '{path.suffix}'; Hugging Face datasets are read from "
                    f"{', '.join(sorted(FILE_BUILDERS))} files or a hub id."
                )
            kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **kwargs)
        return datasets.load_dataset(source, config, split=split, revision=revision, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets/pyarrow raise many unrelated types
        raise DataError(f"cannot load dataset '{source}': {_root_cause(error)}") from None


def parse_columns(value: Any, key: str = "columns") -> dict[str, str]:
    """Read a column mapping given as a mapping or as ``FIELD=COLUMN,...`` text.

    The text may also be a YAML flow mapping (``{input: text, target: label}``), which is how a
    mapping reaches a ``key=value`` override or ``tasks --columns``.

    Args:
        value: A mapping, or text.
        key: The key it was given as (for messages).

    Returns:
        The mapping (field -> column; see :func:`normalize_columns` for the fields).

    Raises:
        ConfigError: not a mapping of names to column names.
    """
    example = f"{key}={{input: text, target: label}} or {key}=input=text,target=label"
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            import yaml

            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConfigError(f"{key}={text!r} is not a valid mapping; write {example}.") from None
        else:
            value = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                field, sep, column = part.partition("=")
                if not sep or not field.strip() or not column.strip():
                    raise ConfigError(f"{key}: bad column mapping {part!r}; write {example}.")
                value[field.strip()] = column.strip()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}={value!r}: expected a mapping of fields to column names, e.g. {example}.")
    result = {}
    for field, column in value.items():
        if column is None and isinstance(field, str) and ":" in field:  # YAML read {input:text} as one key
            raise ConfigError(f"{key}: {field!r} needs a space after the colon in a YAML mapping; write {example}.")
        if not isinstance(column, (str, int)) or isinstance(column, bool) or not str(column).strip():
            raise ConfigError(f"{key}: field '{field}' maps to {column!r}; expected a column name, e.g. {example}.")
        result[str(field)] = str(column)
    return result


def normalize_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    """Check the keys of a column mapping and replace aliases (``target`` -> ``output``).

    Raises:
        ConfigError: a key that is not a field, or a field given under two names.
    """
    result: dict[str, str] = {}
    valid = ", ".join(COLUMN_FIELDS + tuple(COLUMN_ALIASES))
    for name, column in (columns or {}).items():
        field = COLUMN_ALIASES.get(name, name)
        if field not in COLUMN_FIELDS:
            raise ConfigError(f"unknown column mapping key '{name}'; valid keys: {valid}.")
        if field in result:
            raise ConfigError(f"column mapping gives '{field}' twice (as '{field}' and its alias); give one of them.")
        result[field] = column
    return result


def resolve_columns(columns: Mapping[str, str] | None, available: list[str], source: str) -> dict[str, str]:
    """Map field -> column, checking every named column exists.

    Args:
        columns: User mapping (field -> column name, aliases allowed); missing fields default to
            the column of the field's name (or an alias's) when there is one.
        available: Column names of the dataset.
        source: For messages.

    Returns:
        Mapping for the fields that are present (always ``input`` and ``output``).

    Raises:
        ConfigError: a key that is not a field.
        DataError: a column that does not exist (the available columns are listed).
    """
    columns = normalize_columns(columns)
    resolved = {}
    for field in COLUMN_FIELDS:
        name = columns.get(field)
        if name is None:
            defaults = [field] + [alias for alias, target in COLUMN_ALIASES.items() if target == field]
            present = [column for column in defaults if column in available]
            if present:
                resolved[field] = present[0]
            elif field in ("input", "output"):
                raise DataError(
                    f"'{source}': no column for '{field}'; map one with columns={{'{field}': NAME}}. "
                    f"Available columns: {', '.join(available)}."
                )
            continue
        if name not in available:
            raise DataError(
                f"'{source}': unknown column '{name}' (for '{field}'). Available columns: {', '.join(available)}."
            )
        resolved[field] = name
    return resolved


def _as_text(value: Any, column: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: column '{column}' must hold text, got {type(value).__name__} {value!r:.40}.")


def _as_options(value: Any, column: str, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise DataError(f"{where}: column '{column}' holds a string that is not a JSON list: {value!r:.60}.") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: column '{column}' must hold a list of options, got {type(value).__name__}.")
    return [_as_text(v, column, where) for v in value] or None


def tasks_from_dataset(
    dataset,
    source: str,
    columns: Mapping[str, str] | None = None,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    default_task: str | None = None,
):
    """Turn a ``datasets.Dataset`` into tasks.

    Args:
        dataset: The dataset.
        source: File path or hub id, for messages and task sources.
        columns: Field -> column mapping (see :func:`resolve_columns`).
        template: Prompt template of the tasks.
        default_task: Task name when no ``task`` column is mapped (default: file stem / dataset name).

    Returns:
        The tasks.

    Raises:
        DataError: unknown column, bad row (naming the row), empty dataset.
    """
    mapping = resolve_columns(columns, list(dataset.column_names), source)
    name = default_task or Path(source).stem.replace("/", "__") or "dataset"
    label_names = None
    feature = dataset.features.get(mapping["output"]) if hasattr(dataset, "features") else None
    if feature is not None and type(feature).__name__ == "ClassLabel":
        label_names = list(feature.names)
    if len(dataset) == 0:
        raise DataError(f"'{source}' holds no rows.")
    rows = []
    for index, row in enumerate(dataset):
        where = f"'{source}' row {index}"
        text = _as_text(row[mapping["input"]], mapping["input"], where)
        output_value = row[mapping["output"]]
        options = _as_options(row[mapping["options"]], mapping["options"], where) if "options" in mapping else None
        if label_names is not None and isinstance(output_value, int) and not isinstance(output_value, bool):
            if not 0 <= output_value < len(label_names):
                raise DataError(f"{where}: label {output_value} is outside the {len(label_names)} class names.")
            output_value, options = label_names[output_value], options or label_names
        output = _as_text(output_value, mapping["output"], where)
        task = _as_text(row[mapping["task"]], mapping["task"], where) if "task" in mapping else name
        if not task.strip():
            raise DataError(f"{where}: column '{mapping['task']}' is empty.")
        try:
            rows.append((task, None, Example(input=text, target=output, options=options)))
        except DataError as error:
            raise DataError(f"{where}: {error}") from None
    return group_examples(rows, source, template)


def read_hf(
    source: str,
    columns: Mapping[str, str] | None = None,
    *,
    split: str = "train",
    config: str | None = None,
    revision: str | None = None,
    template: PromptTemplate = DEFAULT_TEMPLATE,
):
    """Read tasks from a local data file or a hub dataset through ``datasets``.

    Args:
        source: File path or hub id (an ``hf:`` prefix is stripped).
        columns: Field -> column mapping.
        split: Hub split.
        config: Hub configuration name.
        revision: Hub revision.
        template: Prompt template.

    Returns:
        The tasks.

    Raises:
        DataError: see :func:`load_hf_dataset` and :func:`tasks_from_dataset`.
    """
    if source.startswith("hf:"):
        source = source[3:]
    dataset = load_hf_dataset(source, split=split, config=config, revision=revision)
    default = Path(source).stem if Path(source).exists() else source.rstrip("/").split("/")[-1]
    return tasks_from_dataset(dataset, source, columns, template, default_task=default)
