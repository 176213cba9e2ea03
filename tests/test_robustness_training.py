"""Issue 13, cases 3, 4, 5, 7 and 9 (and SIGINT): no NaN adapters, strict JSON, crash-proof resume."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from deltameta.cli import main
from deltameta.errors import ConfigError
from deltameta.meta import checkpoint as ckpt
from deltameta.meta.run_dir import prepare_run_dir
from deltameta.meta.trainer import MetaTrainer, TrainingError, run_meta_train
from meta_helpers import TINY_RUN, tiny_config

TIMING_KEYS = {"tokens_per_s", "seconds", "memory_mb"}
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\(\)` has been overridden", "ignore:Detected pickle protocol")


def _strict(text):
    """Parse JSON refusing NaN / Infinity (what strict readers do)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in _strict(line).items() if k not in TIMING_KEYS} for line in lines if line.strip()]


def _same_final(a, b):
    ta, tb = load_file(str(a / "final" / "deltas.safetensors")), load_file(str(b / "final" / "deltas.safetensors"))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---------------------------------------------------------------------------------------------- case 3


@pytest.mark.parametrize("setting", ["outer_lr=inf", "inner_lr=nan", "controller_lr=-inf", "alpha=nan",
                                     "meta_clip=inf", "budget_target=nan"])
def test_non_finite_settings_are_config_errors(tmp_path, setting, capsys):
    code = main(["meta-train", "model=tiny-random-llama", "quantization=none", f"output_dir={tmp_path / 'r'}", setting])
    err = capsys.readouterr().err
    assert code == 2 and "expected a finite number" in err and setting.split("=")[0] in err
    assert not (tmp_path / "r").exists()


def test_non_finite_in_a_recipe_and_other_commands(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("outer_lr: .inf\n")
    assert main(["meta-train", "--config", str(recipe), f"output_dir={tmp_path / 'r'}"]) == 2
    assert "expected a finite number" in capsys.readouterr().err
    assert main(["finetune", "lr=nan", f"output_dir={tmp_path / 'f'}"]) == 2
    assert "expected a finite number" in capsys.readouterr().err


def _poison_update(trainer, steps):
    """Make the optimizer update of the given outer steps (1-based) write inf into a delta."""
    original = trainer.optimizer.step

    def step(*args, **kwargs):
        out = original(*args, **kwargs)
        if trainer.step + 1 in steps:
            with torch.no_grad():
                next(iter(trainer.params.values())).view(-1)[0] = float("inf")
        return out

    trainer.optimizer.step = step


def test_an_update_that_makes_parameters_non_finite_is_rolled_back(tmp_path, caplog):
    config = tiny_config(tmp_path, controller="none", ops=["lora-2"], export=True)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    _poison_update(trainer, {2})
    with caplog.at_level(logging.WARNING):
        result = trainer.train()
    assert "step rolled back" in caplog.text
    assert result.steps == 4 and result.skipped == 1 and result.export_error is None
    train = [r for r in _rows(result.run_dir) if r["kind"] == "train"]
    assert [r["rolled_back"] for r in train] == [False, True, False, False]
    assert trainer.meta_parameters_finite()
    for name, tensor in load_file(str(result.run_dir / "peft" / "adapter_model.safetensors")).items():
        assert torch.isfinite(tensor).all(), name
    status = _strict((result.run_dir / "run.json").read_text())
    assert status["status"] == "finished" and status["rolled_back"] == 1


def test_a_run_in_which_no_step_succeeded_fails_and_exports_nothing(tmp_path, capsys, monkeypatch):
    config = tiny_config(tmp_path, controller="none", ops=["lora-2"], export=True, max_nonfinite=100)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    _poison_update(trainer, {1, 2, 3, 4})
    with pytest.raises(TrainingError, match="none of the 4 outer steps succeeded.*nothing was exported"):
        trainer.train()
    run = tmp_path / "run"
    assert not (run / "final").exists() and not (run / "peft").exists()
    assert _strict((run / "run.json").read_text())["status"] == "failed"


def test_a_run_whose_final_validation_is_not_finite_fails_and_exports_nothing(tmp_path):
    """outer_lr=1e9: the first update is finite but so large that every later loss is NaN."""
    config = tiny_config(tmp_path, controller="none", ops=["lora-2"], export=True, outer_lr=1e9, max_nonfinite=100)
    with pytest.raises(TrainingError, match="final held-out loss is not finite.*nothing was exported"):
        run_meta_train(config)
    run = tmp_path / "run"
    assert not (run / "final").exists() and not (run / "peft").exists()
    assert _strict((run / "run.json").read_text())["status"] == "failed"


def test_too_many_rolled_back_steps_stop_the_run(tmp_path):
    config = tiny_config(tmp_path, controller="none", ops=["lora-2"], max_nonfinite=2, outer_steps=6)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    _poison_update(trainer, {3, 4, 5, 6})
    with pytest.raises(TrainingError, match="2 non-finite meta-steps in a row"):
        trainer.train()
    state = ckpt.load_checkpoint(ckpt.checkpoint_dir(config.output_dir, 2))
    assert all(torch.isfinite(v).all() for v in state["params"].values())


# ---------------------------------------------------------------------------------------------- case 4


def test_a_nan_validation_never_freezes_best_and_json_stays_strict(tmp_path):
    config = tiny_config(tmp_path, outer_steps=6)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    original = trainer.validate
    values = iter([(5.0, 5.0), (float("nan"), float("nan")), (4.0, 4.0), (3.0, 3.0)])

    def validate():
        original()  # keeps the evaluation (and its randomness) of a normal run
        before, after = next(values)
        return before, after

    trainer.validate = validate
    result = trainer.train()
    assert result.best_validation == 3.0
    meta = _strict((result.run_dir / "best" / "meta_state.json").read_text())
    assert meta["step"] == 6
    for name in ("run.json", "config.yaml"):
        assert (result.run_dir / name).is_file()
    _strict((result.run_dir / "run.json").read_text())
    _strict((result.run_dir / "final" / "meta_state.json").read_text())


# ---------------------------------------------------------------------------------------------- cases 5, 7, 9


def _interrupted(tmp_path, name, stop_after, **overrides):
    """A run stopped (as if killed) right after its checkpoint of step ``stop_after``."""
    config = tiny_config(tmp_path / name, **overrides)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    original = trainer.save_checkpoint

    def save():
        path = original()
        if trainer.step == stop_after:
            raise KeyboardInterrupt
        return path

    trainer.save_checkpoint = save
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run (the reference of the resume tests)."""
    return run_meta_train(tiny_config(tmp_path_factory.mktemp("straight"), outer_steps=6)).run_dir


def test_sigint_marks_the_run_interrupted(tmp_path):
    config = _interrupted(tmp_path, "a", 2, outer_steps=6)
    assert _strict((tmp_path / "a" / "run" / "run.json").read_text())["status"] == "interrupted"
    assert config.outer_steps == 6


def test_resume_drops_a_truncated_last_metrics_line(tmp_path, straight, caplog):
    config = _interrupted(tmp_path, "a", 4, outer_steps=6)
    run = tmp_path / "a" / "run"
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 5, "lr": 0.00')  # the kill cut this append short
    with caplog.at_level(logging.WARNING):
        resumed = run_meta_train(config, resume=True)
    assert "cut short by an interrupted write" in caplog.text
    assert _same_final(straight, resumed.run_dir) and _rows(straight) == _rows(run)


def test_damaged_metrics_in_the_middle_is_one_clear_error(tmp_path, capsys):
    config = _interrupted(tmp_path, "a", 2, outer_steps=6)
    run = tmp_path / "a" / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{garbage"] + lines) + "\n")
    assert main(["meta-train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "line 1 is not a JSON object" in err and "Traceback" not in err
    assert config.outer_steps == 6


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, straight, damage, caplog):
    config = _interrupted(tmp_path, "a", 4, outer_steps=6)
    run = tmp_path / "a" / "run"
    newest = ckpt.checkpoint_dir(run, 4) / ckpt.STATE_FILE
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x80\x04not a checkpoint" * 10)
    with caplog.at_level(logging.WARNING):
        resumed = run_meta_train(config, resume=True)
    assert "resuming from the previous intact checkpoint step-000002" in caplog.text
    assert "weights_only=False" not in caplog.text and "weights_only" not in caplog.text
    assert _same_final(straight, resumed.run_dir) and _rows(straight) == _rows(run)


def test_unreadable_checkpoint_message_never_suggests_unsafe_loading(tmp_path):
    path = tmp_path / "trainer_state.pt"
    path.write_bytes(b"\x80\x02c__builtin__\neval\n" * 5)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(path)
    message = str(info.value)
    assert "weights_only" not in message and len(message.splitlines()) == 1


EXPORTED = dict(outer_steps=6, export=True, controller="none", ops=["lora-2"])


def test_resume_after_a_kill_during_the_final_export_keeps_the_final_validation(tmp_path, monkeypatch):
    import deltameta.deltas as deltas

    straight = run_meta_train(tiny_config(tmp_path / "straight", **EXPORTED)).run_dir
    config = tiny_config(tmp_path / "a", **EXPORTED)
    original = deltas.export_peft

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while writing peft/

    monkeypatch.setattr(deltas, "export_peft", killed)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(deltas, "export_peft", original)
    run = tmp_path / "a" / "run"
    assert _strict((run / "run.json").read_text())["status"] == "interrupted"
    resumed = run_meta_train(config, resume=True)
    reference = _strict((straight / "run.json").read_text())
    status = _strict((run / "run.json").read_text())
    assert status["status"] == "finished" and status["final_validation"] is not None
    assert status["final_validation"] == reference["final_validation"]
    assert resumed.final_validation == tuple(reference["final_validation"])
    assert (run / "peft" / "adapter_config.json").is_file() and _same_final(straight, run)


def test_resuming_a_finished_run_changes_nothing_unless_it_extends_outer_steps(tmp_path, capsys):
    config = tiny_config(tmp_path, outer_steps=2)
    run_meta_train(config)
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert main(["meta-train", "--resume", str(run)]) == 0
    assert "already finished at step 2; nothing changed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    assert main(["meta-train", "--resume", str(run), "shots=3"]) == 2
    assert "cannot change shots (only outer_steps=N" in capsys.readouterr().err
    assert main(["meta-train", "--resume", str(run), f"shots={TINY_RUN['shots']}", "model=tiny-random-llama"]) == 0
    assert "nothing changed" in capsys.readouterr().out, "repeating the saved values is not a change"
    assert main(["meta-train", "--resume", str(run), "outer_steps=3"]) == 0
    status = _strict((run / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 3
    assert [r["step"] for r in _rows(run) if r["kind"] == "train"] == [1, 2, 3]


def test_resume_with_outer_steps_below_the_checkpoint_is_refused(tmp_path):
    config = _interrupted(tmp_path, "a", 4, outer_steps=6)
    from deltameta.commands.meta_train import resolve_config

    smaller = resolve_config(None, ["outer_steps=3"], str(tmp_path / "a" / "run"))
    with pytest.raises(ConfigError, match="outer_steps=3 is below step 4"):
        run_meta_train(smaller, resume=True)
    assert config.outer_steps == 6 and TINY_RUN["outer_steps"] == 4
