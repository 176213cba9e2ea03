"""Every shipped recipe for finetune and evaluate validates and documents its command."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from deltameta.config import build_config, load_recipe
from deltameta.evaluate import EvaluateConfig
from deltameta.finetune import FinetuneConfig

RECIPES = Path(__file__).resolve().parent.parent / "deltameta" / "recipes"
CONFIGS = {"finetune": FinetuneConfig, "evaluate": EvaluateConfig}
FILES = sorted(p for kind in CONFIGS for p in (RECIPES / kind).glob("*.y*ml"))


def test_recipes_exist():
    names = {p.name for p in FILES}
    assert {"smollm2_135m_cpu.yaml", "llama32_1b_qlora_24gb.yaml", "llama3_8b_qlora_24gb.yaml",
            "smollm2_135m_bigbench_dev.yaml", "smollm2_135m_builtin.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates_and_header_states_command_and_memory(path):
    kind = path.parent.name
    config = build_config(CONFIGS[kind], path)
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    command = next(line for line in header if f"deltameta {kind} --config" in line)
    assert f"--config {path.parent.name}/{path.stem}" in command  # the shipped name, usable from any directory
    assert any(re.search(r"memory|RAM", line) for line in header), f"{path}: no expected memory in the header"
    if "24gb" in path.name:
        assert config.quantization == "nf4" and config.gradient_checkpointing and config.bf16
        assert any("estimate" in line for line in header), "GPU memory must be labelled an estimate"
    assert load_recipe(path)


def test_default_finetune_recipe_is_the_embedded_default():
    recipe = build_config(FinetuneConfig, RECIPES / "finetune" / "smollm2_135m_cpu.yaml")
    default = FinetuneConfig()
    differing = {f.name for f in dataclasses.fields(FinetuneConfig) if getattr(recipe, f.name) != getattr(default, f.name)}
    assert differing == set()
