"""The outer loop: run-dir layout, exact resume, non-finite handling, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from deltameta.errors import ConfigError, DeltametaError
from deltameta.meta import checkpoint as ckpt
from deltameta.meta.run_dir import prepare_run_dir
from deltameta.meta.trainer import MetaTrainer, TrainingError, run_meta_train
from meta_helpers import tiny_config

TIMING_KEYS = {"tokens_per_s", "seconds", "memory_mb"}


def _rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines if line.strip()]


def test_short_run_writes_the_run_dir(tmp_path):
    config = tiny_config(tmp_path, plots=True, export=True, controller="task", task_batched=True)
    result = run_meta_train(config)
    run = result.run_dir
    assert result.steps == 4 and result.skipped == 0 and result.export_error is None
    for name in ("config.yaml", "run.json", "metrics.jsonl", "controller_decisions.txt"):
        assert (run / name).is_file(), name
    for name in ("losses.png", "validation.png", "controller.png", "controller_decisions.png"):
        assert (run / "plots" / name).stat().st_size > 0, name
    for state in ("final", "best"):
        assert (run / state / "deltas.safetensors").is_file() and (run / state / "controller.json").is_file()
    assert (run / "final" / "fold_stats.safetensors").is_file()
    # best/ is a whole meta-state too: a TARP/controller export of it folds at the stored statistics
    from deltameta.deltas import load_meta_state

    assert load_meta_state(run / "best").task_embedding_mean is not None
    assert (run / "peft" / "adapter_config.json").is_file() and (run / "peft" / "adapter_model.safetensors").is_file()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 4]
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 4
    assert status["base"]["name"] == "tiny-random-llama" and "origin" in status["base"]["weights"]
    rows = _rows(run)
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "validation"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in val] == [0, 2, 4]
    for key in ("support_before", "query_after", "controller_entropy", "controller_budget", "tokens", "lr", "tau"):
        assert all(isinstance(r[key], (int, float)) for r in train), key
    assert all(math.isfinite(r["query_before"]) and math.isfinite(r["query_after"]) for r in val)
    # the resolved config round-trips through the CLI's config system
    from deltameta.commands.meta_train import resolve_config

    again = resolve_config(None, [], str(run))
    assert again.controller == "task" and again.outer_steps == 4


@pytest.mark.parametrize(("algorithm", "batched"), [("fomaml", True), ("metasgd", False)])
def test_resume_reproduces_uninterrupted_run(tmp_path, algorithm, batched):
    straight = run_meta_train(tiny_config(tmp_path / "a", algorithm=algorithm, task_batched=batched))

    config = tiny_config(tmp_path / "b", algorithm=algorithm, task_batched=batched)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    original = trainer.save_checkpoint

    def crash_after_first_checkpoint():
        original()
        raise KeyboardInterrupt  # simulated kill right after the step-2 checkpoint

    trainer.save_checkpoint = crash_after_first_checkpoint
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [s for s, _ in ckpt.list_checkpoints(config.output_dir)] == [2]
    # garbage in the Python/torch RNGs must not matter: the checkpoint restores them
    torch.manual_seed(12345)
    resumed = run_meta_train(config, resume=True)

    a = load_file(str(straight.run_dir / "final" / "deltas.safetensors"))
    b = load_file(str(resumed.run_dir / "final" / "deltas.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ca = load_file(str(straight.run_dir / "final" / "controller.safetensors"))
    cb = load_file(str(resumed.run_dir / "final" / "controller.safetensors"))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert _rows(straight.run_dir) == _rows(resumed.run_dir)


def _poison(trainer, steps):
    """Make the given outer steps (1-based) produce a NaN loss."""
    for method in ("task_step", "tasks_step_batched"):
        original = getattr(trainer.algorithm, method)

        def poisoned(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            if trainer.step + 1 in steps:
                result.query_after = float("nan")
                result.finite = False
            return result

        setattr(trainer.algorithm, method, poisoned)


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    config = tiny_config(tmp_path)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    _poison(trainer, {2})
    result = trainer.train()
    assert result.steps == 4 and result.skipped == 1
    rows = [r for r in _rows(result.run_dir) if r["kind"] == "train"]
    assert [r["skipped"] for r in rows] == [False, True, False, False]


def test_nonfinite_in_a_row_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path, max_nonfinite=2, outer_steps=6)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    _poison(trainer, {3, 4, 5, 6})
    with pytest.raises(TrainingError, match="2 non-finite meta-steps in a row.*step-000002"):
        trainer.train()
    assert [s for s, _ in ckpt.list_checkpoints(config.output_dir)] == [2]
    state = ckpt.load_checkpoint(ckpt.checkpoint_dir(config.output_dir, 2))
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["params"].values())
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_output_dir_holding_a_run_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run.*--overwrite.*--resume"):
        prepare_run_dir(run)
    # --overwrite checks only: the old run stays until the new one has been set up (see test_robustness_*)
    assert prepare_run_dir(run, overwrite=True) == run and (run / "run.json").read_text() == "{}"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no deltameta run"):
        prepare_run_dir(other, overwrite=True)
    with pytest.raises(ConfigError, match="no deltameta run"):
        prepare_run_dir(tmp_path / "missing", resume=True)


def test_bad_config_values(tmp_path):
    from deltameta.config import build_config
    from deltameta.meta.config import MetaTrainConfig

    with pytest.raises(ConfigError, match="Did you mean 'inner_lr'"):
        build_config(MetaTrainConfig, overrides=["inner_lrr=0.1"])
    with pytest.raises(ConfigError, match="inner_steps='two'.*expected int"):
        build_config(MetaTrainConfig, overrides=["inner_steps=two"])
    with pytest.raises(ConfigError, match="algorithm='mamll'.*did you mean 'maml'"):
        build_config(MetaTrainConfig, overrides=["algorithm=mamll"])
    with pytest.raises(ConfigError, match="meta_batch_size=0"):
        build_config(MetaTrainConfig, overrides=["meta_batch_size=0"])
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        build_config(MetaTrainConfig, overrides=["gradient_checkpointing=true", "algorithm=maml"])
    with pytest.raises(ConfigError, match="unknown op 'lora-x'"):
        build_config(MetaTrainConfig, overrides=["ops=[skip, lora-x]"])


@pytest.mark.parametrize("unit", ["family", "task"])
def test_val_holdout_validates_on_unseen_families_or_on_new_tasks_of_seen_families(tmp_path, unit):
    from deltameta.meta.data import load_splits

    config = tiny_config(tmp_path, val_holdout=0.34, val_holdout_unit=unit)
    splits = load_splits(config)
    assert not set(splits.train.names) & set(splits.validation.names)
    assert len(splits.train) + len(splits.validation) == 6  # two train families of 3 tasks; validation split unused
    assert splits.names["train"] == len(splits.train) and splits.names["train-holdout"] == len(splits.validation)
    if unit == "family":
        assert not set(splits.train.families) & set(splits.validation.families)
    else:
        assert splits.train.families == splits.validation.families and len(splits.validation) == 2


def test_val_holdout_by_task_refuses_families_of_one_task(tmp_path):
    from deltameta.meta.data import load_splits

    config = tiny_config(tmp_path, val_holdout=0.2, val_holdout_unit="task", builtin_tasks_per_family=1)
    with pytest.raises(ConfigError, match="val_holdout_unit=task: .*single task.*val_holdout_unit=family"):
        load_splits(config)
    with pytest.raises(ConfigError, match="val_holdout_unit=task needs val_holdout > 0"):
        tiny_config(tmp_path, val_holdout_unit="task")


def test_shots_larger_than_tasks_allow(tmp_path):
    config = tiny_config(tmp_path, shots=7, query_size=4)
    with pytest.raises(ConfigError, match=r"shots=7 \+ query_size=4 = 11 .*largest: 8 examples"):
        run_meta_train(config)


def test_resume_refuses_changed_trajectory(tmp_path):
    from deltameta.commands.meta_train import resolve_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: tiny-random-llama\n")
    with pytest.raises(ConfigError, match="cannot change inner_lr"):
        resolve_config(None, ["inner_lr=0.5"], str(run))
    with pytest.raises(DeltametaError, match="no complete checkpoint"):
        run_meta_train(tiny_config(tmp_path, output_dir=str(run)), resume=True)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from deltameta.cli import main

    assert main(["meta-train", "inner_lrr=0.1"]) == 2
    assert "Did you mean 'inner_lr'" in capsys.readouterr().err


def test_gradient_checkpointing_inplace_matches_functional(tmp_path):
    """The in-place first-order inner loop (used with gradient checkpointing) equals the functional one."""
    results = {}
    for checkpointing in (False, True):
        config = tiny_config(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, controller="none", task_batched=False,
                             outer_steps=2, eval_every=0, checkpoint_every=0)
        result = run_meta_train(config)
        results[checkpointing] = load_file(str(result.run_dir / "final" / "deltas.safetensors"))
    for name, value in results[False].items():
        torch.testing.assert_close(results[True][name], value, rtol=1e-5, atol=1e-6)


def test_fold_statistics_draw_no_global_random_numbers(tmp_path):
    """best/ saves them mid-run: the run after a best/ save must be the run without it."""
    import random

    for name, overrides in (("tarp", dict(delta="tarp", controller="none")), ("task", dict(controller="task"))):
        config = tiny_config(tmp_path / name, **overrides)
        trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
        assert trainer._export_reads_statistics()
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        stats = trainer._fold_statistics()
        assert stats["task_embedding_mean"] is not None and (stats["fold_stats"] or name == "task")
        assert stats["fold_heldout"] is not None or name == "task"
        assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state, name
    plain = tiny_config(tmp_path / "lora", delta="lora", controller="none")
    assert not MetaTrainer(plain, prepare_run_dir(plain.output_dir))._export_reads_statistics()


def test_best_state_of_a_tarp_run_exports_at_its_stored_fold(tmp_path):
    """A TARP run's best/ keeps the fold statistics, so its export folds where final/'s does, not at a default text."""
    from deltameta.deltas import load_meta_state
    from deltameta.deltas.export import export_peft

    run = run_meta_train(tiny_config(tmp_path, delta="tarp", controller="none")).run_dir
    best = load_meta_state(run / "best")
    assert best.fold_stats and best.fold_heldout is not None
    export_peft(best, tmp_path / "best-peft")
    meta = json.loads((tmp_path / "best-peft" / "deltameta.json").read_text())
    assert "fold statistics stored during meta-training" in json.dumps(meta)
