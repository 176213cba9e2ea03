"""The ``none`` baseline (a fresh adapter): a complete run dir without any meta-training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltameta.errors import ConfigError
from deltameta.meta import checkpoint as ckpt
from deltameta.meta.run_dir import prepare_run_dir
from deltameta.meta.trainer import MetaTrainer, run_meta_train
from meta_helpers import tiny_config


def test_none_baseline_writes_a_complete_run_dir_of_the_fresh_adapter(tmp_path):
    config = tiny_config(tmp_path, algorithm="none", export=True, controller="global")
    result = run_meta_train(config)
    run = result.run_dir
    assert result.steps == 0 and result.skipped == 0 and result.export_error is None
    assert result.initial_validation is not None and result.final_validation == result.initial_validation
    for name in ("config.yaml", "run.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "final" / "deltas.safetensors").is_file() and (run / "final" / "controller.json").is_file()
    assert (run / "peft" / "adapter_config.json").is_file() and (run / "peft" / "adapter_model.safetensors").is_file()
    assert ckpt.list_checkpoints(run) == []
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [(r["kind"], r["step"]) for r in rows] == [("validation", 0)]

    # the exported deltas are exactly the fresh (seeded) initialisation of a meta-training run
    fresh = MetaTrainer(tiny_config(tmp_path / "fresh", controller="global"), prepare_run_dir(tmp_path / "fresh" / "run"))
    saved = load_file(str(run / "final" / "deltas.safetensors"))
    assert saved.keys() == fresh.params.keys()
    for name, value in fresh.params.items():
        assert torch.equal(saved[name], value.detach().float()), name
    assert any("lora_B" in name for name in saved)
    assert all(float(saved[name].abs().sum()) == 0 for name in saved if "lora_B" in name)

    # evaluate reads it as an adapter prepared with no forward/backward pass at all
    from deltameta.finetune.adapters import read_preparation

    preparation = read_preparation(run, run / "final")
    assert preparation["algorithm"] == "none" and preparation["forward_backward_passes"] == 0


def test_none_baseline_has_no_meta_gradient(tmp_path):
    config = tiny_config(tmp_path, algorithm="none", controller="none")
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    with pytest.raises(ConfigError, match="algorithm=none does no meta-training"):
        trainer.train_step()


@pytest.mark.parametrize("controller", ["global", "task"])
def test_multitask_baseline_trains_with_a_controller_looped_and_batched(tmp_path, controller):
    """Regression: the controller's op weights are shared by every pass of a multitask step."""
    finals = {}
    for batched in (False, True):
        config = tiny_config(tmp_path / str(batched), algorithm="multitask", controller=controller, task_batched=batched,
                             outer_steps=2, eval_every=0, checkpoint_every=0)
        result = run_meta_train(config)
        assert result.steps == 2 and result.skipped == 0
        finals[batched] = load_file(str(result.run_dir / "final" / "deltas.safetensors"))
    for name, value in finals[False].items():
        torch.testing.assert_close(finals[True][name], value, rtol=1e-4, atol=1e-6, msg=name)
