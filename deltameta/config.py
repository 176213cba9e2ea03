"""Recipes: YAML files plus ``key=value`` overrides, validated against a dataclass.

Every command that takes a recipe (``meta-train``, ``finetune``, ``evaluate``) describes its keys
with a dataclass whose fields carry ``help`` metadata. :func:`build_config` merges, in order, the
dataclass defaults, the recipe file and the command-line overrides, then checks every key and
value: an unknown key gets the closest valid key suggested, a wrong type names the key, the value
and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from deltameta.errors import ConfigError

T = TypeVar("T")


def field(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - mirrors argparse
    """Declare a config field with a help text.

    Args:
        default: Default value (lists and dicts are copied per instance).
        help: One-line description shown by ``--help`` and in errors.
        **kwargs: Passed to :func:`dataclasses.field`.
    """
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass
class BaseModelKeys:
    """The frozen base model's keys, shared by ``meta-train``, ``finetune`` and ``evaluate``.

    Config dataclasses inherit them (they come first in ``--help`` and in ``config.yaml``); a
    command may redeclare one to give it its own help text, which keeps its place.
    """

    model: str = field("smollm2-135m", "base model: alias (smollm2-135m, tiny-random-llama), local dir or hub id")
    quantization: Literal["nf4", "fp4", "none"] = field("nf4", "4-bit quantization of the frozen base")
    double_quant: bool = field(False, "double-quantize the 4-bit constants")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field("auto", "compute dtype (auto: bf16 on CUDA, fp32 on CPU)")
    device: str = field("auto", "cpu, cuda, cuda:N or auto")


def columns_field() -> Any:
    """The ``columns`` key of every command that reads tasks (one definition, one help text)."""
    return field({}, "column mapping of csv/parquet/jsonl/hub data: {input: COL, target: COL, options: COL, task: COL}")


def template_field() -> Any:
    """The ``template`` key of every command that reads tasks."""
    return field("", "prompt template for every task: 'INPUT_FORMAT|||TARGET_FORMAT', e.g. '{input}\\nAnswer:||| {target}' ('': the tasks' own)")


def check_data_keys(config: Any) -> None:
    """Check and normalise a config's ``columns`` and ``template`` (called by ``validate()``).

    Raises:
        ConfigError: an unknown column field, a value that is not a column name, or a template
            without its placeholders.
    """
    from deltameta.tasks.hf import normalize_columns, parse_columns
    from deltameta.tasks.task import PromptTemplate

    if config.columns:
        normalize_columns(parse_columns(config.columns))  # raises on unknown fields
        config.columns = parse_columns(config.columns)
    if config.template:
        PromptTemplate.parse(config.template)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML (``3``, ``0.1``, ``true``, ``[a, b]``).

    Args:
        items: Command-line words.

    Returns:
        Mapping of keys to parsed values.

    Raises:
        ConfigError: a word is not of the form ``key=value``.
    """
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value (for example inner_lr=0.01).")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        result[key.strip()] = value
    return result


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a dict.

    Args:
        path: A YAML file, or the name of a shipped recipe (see
            :func:`deltameta.recipes.resolve_recipe`).

    Raises:
        ConfigError: no such file or recipe, not valid YAML, or not a mapping.
    """
    from deltameta.recipes import resolve_recipe

    path = resolve_recipe(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of keys to values, got {type(data).__name__}.")
    return data


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def coerce(value: Any, annotation: Any, key: str, where: str = "") -> Any:
    """Check ``value`` against ``annotation``, converting where lossless (``1`` -> ``1.0``).

    Args:
        value: The parsed value.
        annotation: The field's type.
        key: The key (for error messages).
        where: Where the value came from (for error messages).

    Raises:
        ConfigError: the value does not fit the type.
    """
    origin = get_origin(annotation)

    def fail() -> ConfigError:
        return ConfigError(f"{key}={value!r}{where}: expected {_type_name(annotation)}.")

    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        if value in get_args(annotation):
            return value
        suggestion = difflib.get_close_matches(str(value), [str(a) for a in get_args(annotation)], n=1)
        hint = f" (did you mean '{suggestion[0]}'?)" if suggestion else ""
        raise ConfigError(f"{key}={value!r}{where}: expected {_type_name(annotation)}{hint}.")
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise fail()
        (item_type,) = get_args(annotation)[:1] or (Any,)
        return [coerce(v, item_type, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str) and "=" in value and not value.strip().startswith("{"):
            pairs = [part.partition("=") for part in value.split(",") if part.strip()]
            if any(not sep or not k.strip() for k, sep, _ in pairs):
                raise fail()
            value = {k.strip(): yaml.safe_load(v.strip()) if v.strip() else "" for k, _, v in pairs}
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise fail() from None
        else:
            raise fail()
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r}{where}: expected a finite number (not nan or inf).")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    return value


def check_finite(config: Any) -> None:
    """Refuse ``nan`` and infinities in every float field of a config dataclass.

    Raises:
        ConfigError: names the first non-finite key.
    """
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for number in values:
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"{item.name}={value!r}: expected a finite number (not nan or inf).")


def build_config(cls: type[T], recipe: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> T:
    """Build a config dataclass from defaults, a recipe file and overrides (later wins).

    Args:
        cls: The command's config dataclass.
        recipe: Path of a YAML recipe, a shipped recipe's name, or ``None``.
        overrides: ``key=value`` words, or an already parsed mapping.

    Returns:
        A validated instance of ``cls``. If ``cls`` defines ``validate()``, it is called.

    Raises:
        ConfigError: unknown key (the closest valid key is suggested) or a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    sources: list[tuple[dict[str, Any], str]] = []
    if recipe is not None:
        sources.append((load_recipe(recipe), f" in recipe '{recipe}'"))
    if overrides:
        if isinstance(overrides, dict):
            parsed = overrides
        else:
            parsed = parse_overrides(list(overrides))
            for item in overrides:  # a text key keeps its text: template={input} is not a YAML mapping
                key, _, raw = item.partition("=")
                key = key.strip()
                if key in hints and hints[key] is str and isinstance(parsed.get(key), (dict, list)):
                    parsed[key] = raw
        sources.append((parsed, " on the command line"))
    for mapping, where in sources:
        for key, value in mapping.items():
            if key not in hints or key not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
                hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(names)}."
                raise ConfigError(f"unknown key '{key}'{where}.{hint}")
            values[key] = coerce(value, hints[key], key, where)
    config = cls(**values)
    check_finite(config)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Return a config dataclass as a plain dict."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Any) -> str:
    """Return a config dataclass as YAML (keys in declaration order)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def describe_keys(cls: type) -> str:
    """Return a ``--help`` epilogue listing every key with its default and help text."""
    lines = ["config keys (set in a recipe or as key=value):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name:<22} {f.metadata.get('help', '')} (default: {default!r})")
    return "\n".join(lines)


def resume_config(cls: type[T], run_dir: str | Path, overrides: list[str], mutable: tuple[str, ...],
                  recipe: str | Path | None = None, command: str = "", extend: str | None = None) -> T:
    """The config of a resumed run: its saved ``config.yaml`` plus the few overrides that keep its course.

    Args:
        cls: The command's config dataclass.
        run_dir: The run directory given to ``--resume``.
        overrides: ``key=value`` words.
        mutable: Keys that may change on resume (they do not change the result).
        recipe: ``--config``; must be ``None``.
        command: The command, for messages.
        extend: The one trajectory key a resume may change to extend the run (meta-train:
            ``outer_steps``), or ``None``.

    Raises:
        ConfigError: ``--config`` given, no ``config.yaml`` in ``run_dir``, or an override that
            changes a key outside ``mutable`` (repeating the saved value is fine).
    """
    if recipe is not None:
        raise ConfigError("--resume uses the run's saved config.yaml; do not pass --config with it.")
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there; is it a {command or 'deltameta'} run directory?")
    parsed = parse_overrides(overrides)
    fixed = {k: v for k, v in parsed.items() if k not in mutable and k not in (extend, "output_dir")}
    before = build_config(cls, saved, {"output_dir": str(run_dir)})
    after = build_config(cls, saved, {**fixed, "output_dir": str(run_dir)})  # unknown keys, types
    changed = sorted(k for k in fixed if getattr(after, k) != getattr(before, k))
    if changed:
        allowed = (f"{extend}=N to extend it, and {', '.join(mutable)}," if extend else ", ".join(mutable))
        raise ConfigError(
            f"--resume continues the run exactly as configured; cannot change {', '.join(changed)} "
            f"(only {allowed} may be given). Start a new run instead."
        )
    parsed["output_dir"] = str(run_dir)
    return build_config(cls, saved, parsed)
