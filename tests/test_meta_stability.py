"""Meta-gradient spikes: the monitor's rule, and the trainer's flag, warning, count and resume."""

from __future__ import annotations

import json
import logging

import pytest

from deltameta.cli import main
from deltameta.meta.run_dir import prepare_run_dir
from deltameta.meta.stability import GradSpikeMonitor
from deltameta.meta.trainer import MetaTrainer, TrainResult
from meta_helpers import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


@pytest.mark.parametrize(
    "norms, flagged",
    [
        ([1.0] * 8, []),
        ([1.0] * 5 + [10.0], []),  # exactly factor x median: not above it
        ([1.0] * 5 + [10.5], [5]),
        ([100.0] + [1.0] * 3, []),  # too little history to call anything a spike
        ([1.0] * 4 + [50.0], []),  # the fifth norm is the first that can be judged
        ([1.0] * 5 + [50.0, 1.0, 60.0], [5, 7]),  # a spike enters the history; the median shrugs it off
        ([1.0, 1.0, 1.0, 1.0, 100.0, 11.0], [5]),  # the median (1), not the mean (20.8), is the yardstick
        ([0.0] * 6 + [5.0], []),  # a zero median never divides
    ],
)
def test_spikes_are_norms_above_ten_times_the_recent_median(norms, flagged):
    monitor = GradSpikeMonitor()
    ratios = [monitor.update(n) for n in norms]
    assert [i for i, r in enumerate(ratios) if r is not None] == flagged
    assert monitor.spikes == len(flagged)
    for i in flagged:
        assert ratios[i] > 10


def test_the_window_forgets_old_norms_and_the_state_round_trips():
    monitor = GradSpikeMonitor(window=5)
    for norm in [100.0] * 5 + [1.0] * 5:
        monitor.update(norm)
    assert monitor.update(11.0) is not None, "the five 100s have left the window"
    copy = GradSpikeMonitor(window=5)
    copy.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert (list(copy.recent), copy.spikes) == (list(monitor.recent), monitor.spikes) == ([1.0] * 4 + [11.0], 1)
    assert copy.update(5.0) is None and monitor.update(5.0) is None
    assert copy.update(30.0) == monitor.update(30.0) == 30.0  # recent [1, 1, 1, 11, 5]: median 1
    copy.load_state_dict(None)  # a checkpoint from before spikes were tracked
    assert (list(copy.recent), copy.spikes) == ([], 0)


@pytest.mark.parametrize("kwargs", [dict(factor=1.0), dict(window=0), dict(min_history=0), dict(min_history=21)])
def test_nonsense_monitor_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="need factor > 1"):
        GradSpikeMonitor(**kwargs)


def _amplify(trainer, steps, factor=1e4):
    """Multiply the meta-gradient of the given outer steps (1-based) before it is measured and clipped."""
    original = trainer._meta_parameters

    def params():
        out = original()
        if trainer.step + 1 in steps:
            for p in out:
                if p.grad is not None:
                    p.grad.mul_(factor)
        return out

    trainer._meta_parameters = params


def _spike_flags(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["meta_grad_spike"] for row in rows if row["kind"] == "train"]


def test_a_spike_is_flagged_warned_counted_and_survives_a_resume(tmp_path, caplog):
    config = tiny_config(tmp_path / "straight", controller="none", ops=["lora-2"], outer_steps=8)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    _amplify(trainer, {7})
    with caplog.at_level(logging.WARNING):
        result = trainer.train()
    assert _spike_flags(result.run_dir) == [False] * 6 + [True, False]
    assert "step 7: meta-gradient norm" in caplog.text and "1 such spike(s) so far" in caplog.text
    assert result.grad_spikes == 1 and result.skipped == 0
    assert json.loads((result.run_dir / "run.json").read_text())["grad_spikes"] == 1

    # interrupted after the checkpoint of step 4, resumed: the history of steps 1-4 travels with the
    # checkpoint, so step 7 is judged against 6 norms, not 2 (too few to call anything a spike)
    config = tiny_config(tmp_path / "resumed", controller="none", ops=["lora-2"], outer_steps=8)
    first = MetaTrainer(config, prepare_run_dir(config.output_dir))
    original = first.save_checkpoint

    def save():
        path = original()
        if first.step == 4:
            raise KeyboardInterrupt
        return path

    first.save_checkpoint = save
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = MetaTrainer(config, prepare_run_dir(config.output_dir, resume=True), resume=True)
    _amplify(resumed, {7})
    assert resumed.train().grad_spikes == 1
    assert _spike_flags(resumed.run_dir) == _spike_flags(result.run_dir)


def test_a_spike_is_flagged_with_meta_clip_off_and_its_norm_is_the_unclipped_one(tmp_path, caplog):
    config = tiny_config(tmp_path, controller="none", ops=["lora-2"], outer_steps=8, meta_clip=0.0)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    _amplify(trainer, {7}, factor=100.0)
    with caplog.at_level(logging.WARNING):
        result = trainer.train()
    assert _spike_flags(result.run_dir) == [False] * 6 + [True, False]
    assert "not clipped: meta_clip=0" in caplog.text and "meta_clip > 0," in caplog.text
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    norms = [row["meta_grad_norm"] for row in rows if row["kind"] == "train"]
    assert len(norms) == 8 and all(n > 0 for n in norms)
    others = sorted(norms[:6])
    assert norms[6] > 10 * others[len(others) // 2]  # measured whole, not scaled down to a clip norm
    assert result.grad_spikes == 1


def test_the_summary_of_meta_train_says_how_many_spikes(tmp_path, capsys, monkeypatch):
    def fake_run(spikes):
        return lambda config, overwrite=False, resume=False: TrainResult(
            tmp_path / "run", 8, 0, None, None, None, 1.0, grad_spikes=spikes)

    monkeypatch.setattr("deltameta.meta.trainer.run_meta_train", fake_run(3))
    assert main(["meta-train", "model=tiny-random-llama", "quantization=none", f"output_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "warning: 3 outer step(s) had a meta-gradient norm over 10x the recent median" in out
    monkeypatch.setattr("deltameta.meta.trainer.run_meta_train", fake_run(0))
    assert main(["meta-train", "model=tiny-random-llama", "quantization=none", f"output_dir={tmp_path / 'run'}"]) == 0
    assert "meta-gradient norm" not in capsys.readouterr().out
