"""benchmarks/study.py: which tasks each evaluation stage reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from benchmark_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    return load_benchmark("study")


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


def test_checkpoint_best_evaluates_both_runs_best_state_and_refuses_without_one(study, meta_run, tmp_path):
    with pytest.raises(SystemExit, match=r"--checkpoint best: no best/ meta-state in .*meta/best, .*multitask/best"):
        study.evaluations(tmp_path, meta_run, None, smoke=False, checkpoint="best")
    for run in (meta_run, tmp_path / "multitask"):
        (run / "best").mkdir(parents=True)
        (run / "best" / "delta_config.json").write_text("{}")
    for keys in study.evaluations(tmp_path, meta_run, None, smoke=False, checkpoint="best").values():
        assert keys["adapter"] == str(meta_run / "best")
        assert keys["multitask_adapter"] == str(tmp_path / "multitask" / "best")


@pytest.mark.parametrize(("overrides", "message"), [
    (["eval_every=10"], "needs val_holdout > 0"),  # the study's validation split is what eval-families reads
    (["val_holdout=0.125", "val_holdout_unit=task"], "needs eval_every > 0"),
    (["val_holdout=0.125", "eval_every=10"], "TARP run's best/ has no fold statistics"),  # delta defaults to tarp
    (["val_holdout=some", "eval_every=10"], "val_holdout=some eval_every=10: expected a fraction and an integer"),
])
def test_checkpoint_best_is_refused_before_training_without_a_clean_selection(study, tmp_path, monkeypatch, capsys,
                                                                              overrides, message):
    calls = []
    monkeypatch.setattr(study, "_deltameta", lambda args, log, append=False: calls.append(args) or 1.0)
    with pytest.raises(SystemExit) as stop:
        study.main(["--name", "b", "--out", str(tmp_path), "--checkpoint", "best", "--", *overrides])
    assert stop.value.code == 2 and message in capsys.readouterr().err and not calls


@pytest.mark.parametrize(("argv", "message"), [
    (["--eval", "shots=eight"], "--eval: shots='eight' on the command line: expected int"),
    (["--eval", "episodes=0"], "--eval: episodes=0: expected an integer >= 1"),
    (["--eval", "shotz=8"], "--eval: "),  # an unknown key
    (["--eval", "max_tasks"], "--eval: max_tasks is not key=value"),
    (["--", "seed"], "after --: seed is not key=value"),
])
def test_bad_overrides_are_refused_before_any_training(study, tmp_path, monkeypatch, capsys, argv, message):
    calls = []
    monkeypatch.setattr(study, "_deltameta", lambda args, log, append=False: calls.append(args) or 1.0)
    with pytest.raises(SystemExit) as stop:
        study.main(["--name", "v", "--out", str(tmp_path), *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err and not calls
    assert not (tmp_path / "v").exists()


def test_an_evaluation_of_other_adapters_is_not_reused(study, tmp_path):
    done = tmp_path / "eval-families" / "results.json"
    done.parent.mkdir()
    done.write_text(json.dumps({"config": {"adapter": "r/meta", "multitask_adapter": "r/multitask"}}))
    study._check_evaluated(done, {"adapter": "r/meta", "multitask_adapter": "r/multitask"}, "final")  # the same: reused
    study._check_evaluated(done, {"adapter": str(Path("r/meta").resolve()), "multitask_adapter": "r/./multitask"},
                           "final")  # the same folders, written otherwise
    with pytest.raises(SystemExit, match=r"evaluated adapter=r/meta, not r/meta/best \(--checkpoint best\); remove"):
        study._check_evaluated(done, {"adapter": "r/meta/best", "multitask_adapter": "r/multitask/best"}, "best")


def test_a_mixed_run_gets_new_rules_of_its_builtin_families_only(study, tmp_path):
    """A run that read built-in families beside BIG-bench tasks: eval-rules names only the built-in ones."""
    bigbench = REPO / "tests" / "fixtures" / "tasks" / "bigbench"
    splits = tmp_path / "mix.json"
    splits.write_text('{"meta_train": ["color__hex", "math__add", "kv_lookup"], "dev": ["animal_sound"]}')
    run = tmp_path / "meta"
    run.mkdir()
    config = {"tasks": f"builtin:kv_lookup+{bigbench}", "splits": str(splits), "train_split": "meta_train",
              "seed": 0, "builtin_tasks_per_family": 2, "builtin_examples_per_task": 8}
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    stages = study.evaluations(tmp_path, run, str(bigbench), smoke=False)
    assert stages["eval-rules"]["tasks"] == "builtin:kv_lookup"
    assert stages["eval-rules"]["task_names"] == "[kv_lookup__002,kv_lookup__003]"
    bigbench_only = dict(config, tasks=str(bigbench), splits=str(bigbench / "splits.json"))
    (run / "config.yaml").write_text(yaml.safe_dump(bigbench_only), encoding="utf-8")
    assert "eval-rules" not in study.evaluations(tmp_path, run, str(bigbench), smoke=False)


def test_an_explicit_eval_dev_without_bigbench_fails_before_any_training(study, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        study.main(["--name", "x", "--out", str(tmp_path), "--stages", "meta,eval-dev"])
    assert error.value.code == 2 and "eval-dev needs --bigbench" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_mix_builtin_adds_the_families_to_meta_train_and_keeps_dev(study, tmp_path):
    bigbench = REPO / "tests" / "fixtures" / "tasks" / "bigbench"
    keys = study.mixed_splits(tmp_path, str(bigbench), ["kv_lookup"])
    assert keys["tasks"] == f"builtin:kv_lookup+{bigbench}" and keys["train_split"] == "meta_train"
    from deltameta.tasks import load_tasks

    splits = load_tasks(keys["tasks"], splits=keys["splits"], builtin_tasks_per_family=2, builtin_examples_per_task=8)
    assert splits["meta_train"].families == ["color", "kv_lookup", "math"]
    assert splits["dev"].names == ["animal_sound"]
    with pytest.raises(SystemExit, match="unknown built-in families nope"):
        study.mixed_splits(tmp_path, str(bigbench), ["nope"])


def test_a_stopped_meta_train_is_resumed_not_overwritten(study, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "_deltameta", lambda args, log, append=False: calls.append((args, append)) or 1.0)
    (tmp_path / "c" / "meta" / "checkpoints" / "step-000020").mkdir(parents=True)
    assert study.main(["--name", "c", "--out", str(tmp_path), "--stages", "meta,multitask"]) == 0
    assert calls[0] == (["meta-train", "--resume", str(tmp_path / "c" / "meta")], True)
    assert calls[1][0][:2] == ["meta-train", "--overwrite"] and "algorithm=multitask" in calls[1][0]


def test_the_twin_of_a_second_order_run_drops_only_first_order(study, tmp_path, monkeypatch):
    """`algorithm=metasgd first_order=false`: the twin is the same command with algorithm=multitask and
    without first_order (which meta-train refuses with multitask); every data/compute key is kept."""
    calls = []
    monkeypatch.setattr(study, "_deltameta", lambda args, log, append=False: calls.append(args) or 1.0)
    assert study.main(["--name", "so", "--out", str(tmp_path), "--stages", "meta,multitask", "--",
                       "algorithm=metasgd", "first_order=false", "inner_steps=2", "seed=3"]) == 0
    meta, twin = calls
    assert "first_order=false" in meta and "algorithm=metasgd" in meta
    assert "algorithm=multitask" in twin and not any(a.startswith("first_order=") for a in twin)
    assert {a for a in meta if not a.startswith(("algorithm=", "first_order=", "output_dir="))} == \
        {a for a in twin if not a.startswith(("algorithm=", "output_dir="))}
    from deltameta.config import build_config
    from deltameta.errors import ConfigError
    from deltameta.meta.config import MetaTrainConfig

    twin_keys = twin[2:]  # after "meta-train --overwrite"
    assert build_config(MetaTrainConfig, overrides=twin_keys).algorithm == "multitask"  # meta-train accepts it
    with pytest.raises(ConfigError, match="first_order=false contradicts algorithm=multitask"):
        build_config(MetaTrainConfig, overrides=twin_keys + ["first_order=false"])  # what the twin used to get


def test_the_twin_of_a_run_with_an_init_loss_drops_it(study, tmp_path, monkeypatch):
    """`init_loss_weight` adds no pass, so the twin is the λ = 0 run's twin (meta-train refuses it with multitask)."""
    calls = []
    monkeypatch.setattr(study, "_deltameta", lambda args, log, append=False: calls.append(args) or 1.0)
    assert study.main(["--name", "il", "--out", str(tmp_path), "--stages", "meta,multitask", "--",
                       "algorithm=metasgd", "init_loss_weight=1.0", "seed=3"]) == 0
    meta, twin = calls
    assert "init_loss_weight=1.0" in meta and not any(a.startswith("init_loss_weight=") for a in twin)
    from deltameta.config import build_config
    from deltameta.meta.config import MetaTrainConfig

    assert build_config(MetaTrainConfig, overrides=twin[2:]).algorithm == "multitask"
