"""Recipes by name: `deltameta recipes ls / cp`, and `--config NAME` from any directory."""

from __future__ import annotations

import pytest

from deltameta.cli import main
from deltameta.config import build_config, load_recipe
from deltameta.errors import ConfigError
from deltameta.finetune import FinetuneConfig
from deltameta.meta.config import MetaTrainConfig
from deltameta.recipes import ROOT, recipe_purpose, resolve_recipe, shipped_recipes


def test_ls_lists_every_shipped_recipe_with_its_purpose(capsys):
    assert main(["recipes", "ls"]) == 0
    out = capsys.readouterr().out.splitlines()
    recipes = shipped_recipes()
    assert len(out) == len(recipes) >= 9
    for line, (name, path) in zip(out, recipes.items()):
        purpose = recipe_purpose(path)
        assert line.startswith(name + " ") and line.endswith(purpose)
        assert 10 < len(purpose) < 110, f"{name}: purpose is not one short line: {purpose!r}"


@pytest.mark.parametrize(
    "given, expected",
    [
        ("meta_train/smollm2_135m_tarp_builtin", "meta_train/smollm2_135m_tarp_builtin.yaml"),
        ("smollm2_135m_tarp_builtin", "meta_train/smollm2_135m_tarp_builtin.yaml"),  # unique base name
        ("smollm2_135m_cpu.yaml", "finetune/smollm2_135m_cpu.yaml"),
        ("recipes/evaluate/smollm2_135m_builtin.yaml", "evaluate/smollm2_135m_builtin.yaml"),  # old checkout path
        ("./recipes/finetune/llama3_8b_qlora_24gb.yaml", "finetune/llama3_8b_qlora_24gb.yaml"),
    ],
)
def test_names_resolve_from_any_directory(given, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    assert resolve_recipe(given) == ROOT / expected
    assert load_recipe(given) == load_recipe(ROOT / expected)


def test_build_config_takes_a_name_and_a_local_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = build_config(FinetuneConfig, "finetune/smollm2_135m_cpu", ["steps=3"])
    assert config.steps == 3 and config.model == "smollm2-135m"
    local = tmp_path / "smollm2_135m_tarp_builtin.yaml"
    local.write_text("outer_steps: 7\n")
    assert build_config(MetaTrainConfig, "smollm2_135m_tarp_builtin.yaml").outer_steps == 7  # a path is a path


@pytest.mark.parametrize(
    "given, message",
    [
        ("smollm2_135m_tarp_bultin", r"neither a file nor a shipped recipe\. Did you mean .*smollm2_135m_tarp_builtin"),
        ("no/such/thing.yaml", r"deltameta recipes ls"),
    ],
)
def test_unknown_recipe_is_a_clear_error(given, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        resolve_recipe(given)


def test_cli_config_by_name_and_unknown_name_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["meta-train", "--config", "smollm2_135m_tarp_bultin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean" in err.lower() and "Traceback" not in err


def test_cp_copies_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["recipes", "cp", "finetune/smollm2_135m_cpu", str(tmp_path)]) == 0
    copied = tmp_path / "smollm2_135m_cpu.yaml"
    assert copied.read_text() == (ROOT / "finetune" / "smollm2_135m_cpu.yaml").read_text()
    assert "--config" in capsys.readouterr().out
    assert main(["recipes", "cp", "finetune/smollm2_135m_cpu", str(copied)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    copied.write_text("steps: 1\n")
    assert main(["recipes", "cp", "smollm2_135m_cpu", str(copied), "--overwrite"]) == 0
    assert copied.read_text().startswith("# The default fine-tuning run")
    other = tmp_path / "mine.yaml"
    assert main(["recipes", "cp", "smollm2_135m_tarp_builtin", str(other)]) == 0
    assert build_config(MetaTrainConfig, other).outer_steps == MetaTrainConfig().outer_steps
    assert main(["recipes", "cp", "nope", str(tmp_path / "x.yaml")]) == 2
    assert main(["recipes", "cp", str(other), str(tmp_path / "y.yaml")]) == 2  # not a shipped recipe


def test_package_data_ships_every_recipe():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["deltameta.recipes"]
    files = {p for pattern in patterns for p in ROOT.glob(pattern)}
    assert set(shipped_recipes().values()) == files
