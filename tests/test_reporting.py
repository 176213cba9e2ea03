"""``report_to``: TensorBoard and wandb trackers in meta-train, finetune and evaluate; missing ones fail early."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from deltameta.config import build_config
from deltameta.errors import ConfigError
from deltameta.evaluate import EvaluateConfig, run_evaluate
from deltameta.finetune import FinetuneConfig, run_finetune
from deltameta.meta.config import MetaTrainConfig
from deltameta.meta.trainer import run_meta_train
from deltameta.reporting import Reporter, resolve_report_to
from meta_helpers import tiny_config
from test_finetune_helpers import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scalars(directory):
    """Tag -> [(step, value)] of the TensorBoard events under ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.fixture()
def no_wandb(monkeypatch):
    """Make ``wandb`` look uninstalled, whatever this machine has."""
    real = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))


@pytest.fixture()
def fake_wandb(monkeypatch):
    """An installed ``wandb`` that records its calls."""
    calls = []
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, data, step):
            calls.append(("log", dict(data), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_report_to_values(no_wandb):
    assert resolve_report_to("none") == [] and resolve_report_to(["none"]) == [] and resolve_report_to(None) == []
    assert resolve_report_to("tensorboard") == ["tensorboard"]
    assert resolve_report_to("all") == ["tensorboard"]  # wandb is missing: 'all' means the installed ones
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'. Did you mean 'tensorboard'"):
        resolve_report_to("tensorbord")
    with pytest.raises(ConfigError, match="'none' and 'all' stand alone"):
        resolve_report_to(["none", "tensorboard"])
    for cls in (MetaTrainConfig, FinetuneConfig, EvaluateConfig):  # at config time, before any work
        with pytest.raises(ConfigError, match=r"report_to asks for wandb, which is not installed: pip install wandb"):
            build_config(cls, overrides=["report_to=[tensorboard, wandb]"])
    assert build_config(FinetuneConfig).report_to == ["none"]  # the default, as in transformers 5


def test_wandb_receives_the_rows(tmp_path, fake_wandb):
    assert resolve_report_to("all") == ["tensorboard", "wandb"]
    reporter = Reporter(["wandb"], tmp_path, {"lr": 0.1}, "finetune")
    reporter.log({"kind": "train", "step": 3, "loss": 1.5, "lr": 0.1, "note": "text", "flag": True})
    reporter.close()
    init = fake_wandb[0]
    assert init[0] == "init" and init[1]["config"] == {"lr": 0.1} and init[1]["job_type"] == "finetune"
    assert init[1]["project"] == "deltameta" and init[1]["dir"] == str(tmp_path)
    assert fake_wandb[1:] == [("log", {"train/loss": 1.5, "train/lr": 0.1}, 3), ("finish",)]


def test_every_command_writes_tensorboard_when_asked(tmp_path):
    meta = run_meta_train(tiny_config(tmp_path, outer_steps=2, eval_every=1, checkpoint_every=0, report_to="tensorboard"))
    scalars = _scalars(meta.run_dir / "tensorboard")
    assert [s for s, _ in scalars["train/query_after"]] == [1, 2]
    assert [s for s, _ in scalars["validation/query_after"]] == [0, 1, 2]
    rows = [r for r in (meta.run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in r]
    assert len(rows) == 2

    quiet = run_meta_train(tiny_config(tmp_path / "quiet", outer_steps=1, eval_every=0, checkpoint_every=0))
    assert not (quiet.run_dir / "tensorboard").exists()  # report_to=none: metrics.jsonl only

    ft = run_finetune(build_config(FinetuneConfig, overrides=dict(
        TINY, tasks="builtin:linear", builtin_examples_per_task=16, steps=3, eval_every=2, batch_size=2,
        output_dir=str(tmp_path / "ft"), report_to=["tensorboard"])))
    scalars = _scalars(ft.output_dir / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [s for s, _ in scalars["validation/val_loss"]] == [0, 2, 3]

    run_evaluate(build_config(EvaluateConfig, overrides=dict(
        TINY, tasks="builtin:linear,kv_lookup", splits="", split="", builtin_tasks_per_family=1,
        builtin_examples_per_task=8, methods=["zero-shot", "fresh-lora"], episodes=1, shots=2, query_size=2,
        steps=[0, 1], max_length=48, output_dir=str(tmp_path / "eval"), report_to="tensorboard")))
    scalars = _scalars(tmp_path / "eval" / "tensorboard")
    assert [s for s, _ in scalars["fresh-lora/accuracy"]] == [0, 1]
    assert [s for s, _ in scalars["zero-shot/accuracy"]] == [0, 1]
