"""Every recipe under deltameta/recipes/ parses and validates; the default recipe matches the built-in defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deltameta.config import build_config, load_recipe
from deltameta.meta.config import MetaTrainConfig

RECIPES = Path(__file__).resolve().parent.parent / "deltameta" / "recipes"
ALL = sorted(RECIPES.glob("*/*.yaml")) + sorted(RECIPES.glob("*/*.yml"))
META = [p for p in ALL if p.parent.name == "meta_train"]


def test_recipes_exist():
    names = {p.name for p in META}
    assert {"smollm2_135m_tarp_builtin.yaml", "smollm2_135m_tarp_bigbench.yaml",
            "smollm2_135m_tarp_maml_second_order.yaml", "llama3_8b_nf4_24gb_template.yaml"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_parses_and_validates(path):
    data = load_recipe(path)
    assert data, f"{path} is empty"
    header = path.read_text().splitlines()[0:12]
    assert any("deltameta " in line and line.startswith("#") for line in header), f"{path}: header shows no command"
    if path.parent.name == "meta_train":
        config = build_config(MetaTrainConfig, path)
        config.delta_config()
        command = next(line for line in path.read_text().splitlines() if "deltameta meta-train --config" in line)
        assert f"--config {path.parent.name}/{path.stem}" in command  # the shipped name, usable from any directory


def test_default_recipe_is_the_embedded_default():
    recipe = build_config(MetaTrainConfig, RECIPES / "meta_train" / "smollm2_135m_tarp_builtin.yaml")
    default = MetaTrainConfig()
    differing = {f.name for f in dataclasses.fields(MetaTrainConfig) if getattr(recipe, f.name) != getattr(default, f.name)}
    assert differing == {"output_dir"}


def test_template_recipe_is_first_order_nf4_bf16_checkpointed():
    config = build_config(MetaTrainConfig, RECIPES / "meta_train" / "llama3_8b_nf4_24gb_template.yaml")
    assert config.quantization == "nf4" and config.compute_dtype == "bfloat16"
    assert config.gradient_checkpointing and config.is_first_order()
    second = build_config(MetaTrainConfig, RECIPES / "meta_train" / "smollm2_135m_tarp_maml_second_order.yaml")
    assert not second.is_first_order()
