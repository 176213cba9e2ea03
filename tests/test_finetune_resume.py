"""``deltameta finetune --resume``: a stopped run continues from its checkpoint to the uninterrupted result."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltameta.config import build_config
from deltameta.errors import ConfigError
from deltameta.finetune import FinetuneConfig, run_finetune
from deltameta.finetune import trainer as ft
from test_finetune_helpers import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = dict(TINY, tasks="builtin:linear", builtin_examples_per_task=24, steps=7, lr=0.01, eval_every=3, batch_size=2,
           warmup_steps=2, checkpoint_every=2, lora_dropout=0.1, early_stopping_patience=5)


def _config(path, **overrides):
    return build_config(FinetuneConfig, overrides=dict(RUN, output_dir=str(path), **overrides))


def _rows(out):
    drop = ("seconds", "tokens_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


class Stop(Exception):
    pass


def test_resume_matches_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    whole = run_finetune(_config(tmp_path / "whole"))

    original = ft._Trainer._next_rows

    def stop_in_step_5(self):
        if self.step == 4:
            raise Stop("killed")
        return original(self)

    monkeypatch.setattr(ft._Trainer, "_next_rows", stop_in_step_5)
    out = tmp_path / "stopped"
    with pytest.raises(Stop):
        run_finetune(_config(out))
    monkeypatch.setattr(ft._Trainer, "_next_rows", original)
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["counters"]["step"] == 4 and (out / "checkpoint" / "trainer_state.safetensors").is_file()
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))

    from deltameta.cli import main

    assert main(["finetune", "--resume", str(out), "report_to=none"]) == 0
    assert "finetune finished: 7 steps" in capsys.readouterr().out
    for name in ("last", "best"):
        a = load_file(str(whole.output_dir / name / "adapter_model.safetensors"))
        b = load_file(str(out / name / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _rows(out) == _rows(whole.output_dir)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["steps"] == 7
    assert run["train_loss_before"] == json.loads((whole.output_dir / "run.json").read_text())["train_loss_before"]


def test_resume_errors(tmp_path, capsys):
    from deltameta.cli import main

    assert main(["finetune", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml there" in capsys.readouterr().err
    done = run_finetune(_config(tmp_path / "done", steps=2, eval_every=0))
    assert main(["finetune", "--resume", str(done.output_dir)]) == 2
    assert "the run has finished" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(done.output_dir), "lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot change lr" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="--resume .*done to continue it"):
        run_finetune(_config(tmp_path / "done", steps=2))
