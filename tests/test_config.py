"""Recipes and key=value overrides: merging order, types, and clear errors."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest

from deltameta.config import build_config, config_to_yaml, describe_keys, field, parse_overrides
from deltameta.errors import ConfigError


@dataclasses.dataclass
class Example:
    model: str = field("tiny-random-llama", "base model")
    inner_lr: float = field(0.1, "inner learning rate")
    inner_steps: int = field(1, "inner steps")
    delta: Literal["lora", "tarp"] = field("tarp", "delta kind")
    splits: Optional[str] = field(None, "splits file")
    targets: list[str] = field(["q_proj", "v_proj"], "target modules")
    bf16: bool = field(False, "bf16 autocast")


@pytest.mark.parametrize(
    "items, expected",
    [
        (["a=1"], {"a": 1}),
        (["a=0.5", "b=true"], {"a": 0.5, "b": True}),
        (["a=[x, y]"], {"a": ["x", "y"]}),
        (["path=../x/y.json"], {"path": "../x/y.json"}),
        (["a="], {"a": ""}),
    ],
)
def test_parse_overrides(items, expected):
    assert parse_overrides(items) == expected


def test_recipe_then_overrides_later_wins(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# header\ninner_lr: 0.5\ninner_steps: 3\ndelta: lora\n")
    config = build_config(Example, recipe, ["inner_steps=5", "splits=s.json", "targets=q_proj"])
    assert (config.inner_lr, config.inner_steps, config.delta, config.splits, config.targets) == (0.5, 5, "lora", "s.json", ["q_proj"])
    assert isinstance(config.inner_lr, float)
    assert "inner_steps: 5" in config_to_yaml(config)


def test_defaults_are_not_shared_between_instances():
    first = build_config(Example)
    first.targets.append("o_proj")
    assert build_config(Example).targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inner_lrr=0.1"], "unknown key 'inner_lrr' on the command line. Did you mean 'inner_lr'"),
        (["inner_steps=two"], "inner_steps='two' on the command line: expected int"),
        (["inner_steps=1.5"], "expected int"),
        (["delta=tarpp"], "expected one of 'lora', 'tarp' \\(did you mean 'tarp'\\?\\)"),
        (["bf16=maybe"], "bf16='maybe'.*expected bool"),
        (["noequals"], "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key_and_what_is_valid(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(Example, None, overrides)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(Example, tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(Example, broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config(Example, listing)
    typo = tmp_path / "typo.yaml"
    typo.write_text("modle: x\n")
    with pytest.raises(ConfigError, match=f"unknown key 'modle' in recipe '{typo}'. Did you mean 'model'"):
        build_config(Example, typo)


def test_describe_keys_lists_every_key():
    text = describe_keys(Example)
    for f in dataclasses.fields(Example):
        assert f.name in text
