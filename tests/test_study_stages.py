"""benchmarks/study.py: which tasks each evaluation stage reads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", REPO / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def meta_run(tmp_path):
    """A meta-train run folder whose config read two multiple-choice built-in families."""
    run = tmp_path / "meta"
    run.mkdir()
    config = {"tasks": "builtin:word_category,number_property", "splits": "train=1", "train_split": "train",
              "seed": 3, "builtin_tasks_per_family": 4, "builtin_examples_per_task": 16}
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return run


def test_new_rules_are_the_unseen_indices_of_the_training_families(study, meta_run, tmp_path):
    stages = study.evaluations(tmp_path, meta_run, None, smoke=False)
    rules = stages["eval-rules"]
    assert rules["tasks"] == "builtin:number_property,word_category"
    assert rules["builtin_tasks_per_family"] == 8 and rules["seed"] == 3
    assert rules["task_names"] == "[" + ",".join(
        f"{f}__{i:03d}" for f in ("number_property", "word_category") for i in range(4, 8)) + "]"
    assert stages["eval-families"]["splits"] == "train=0.75,validation=0.25"  # default: the validation split
    assert "eval-dev" not in stages


def test_heldout_families_evaluates_the_named_unseen_families(study, meta_run, tmp_path):
    stages = study.evaluations(tmp_path, meta_run, "bb", smoke=False, heldout_families=["kv_lookup"])
    families = stages["eval-families"]
    assert families["tasks"] == "builtin:kv_lookup"
    assert (families["splits"], families["split"]) == ("", "")
    assert (families["builtin_tasks_per_family"], families["builtin_examples_per_task"], families["seed"]) == (4, 16, 3)
    assert families["adapter"] == str(meta_run) and families["multitask_adapter"] == str(tmp_path / "multitask")
    assert stages["eval-dev"]["split"] == "dev"


def test_heldout_families_refuses_a_meta_trained_family(study, meta_run, tmp_path):
    with pytest.raises(SystemExit, match="word_category were meta-trained on"):
        study.evaluations(tmp_path, meta_run, None, smoke=False, heldout_families=["kv_lookup", "word_category"])
