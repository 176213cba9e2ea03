"""``deltameta.schedule``: the transformers schedulers give the documented warmup + decay values."""

from __future__ import annotations

import math

import pytest
import torch

from deltameta.errors import ConfigError
from deltameta.schedule import make_scheduler


def _expected(schedule, step, warmup, total, ratio):
    """The documented formula: warmup from 0, then decay to ``ratio`` at ``total``."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return ratio + (1.0 - ratio) * shape


def _lrs(schedule, warmup, total, ratio, peak=0.5, groups=2):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    optimizer = torch.optim.AdamW([{"params": [p]} for p in params], lr=peak)
    scheduler = make_scheduler(optimizer, schedule, warmup, total, ratio)
    values = []
    for _ in range(total + 1):
        assert len({g["lr"] for g in optimizer.param_groups}) == 1
        values.append(optimizer.param_groups[0]["lr"] / peak)
        optimizer.step()
        scheduler.step()
    return values, optimizer, scheduler


@pytest.mark.parametrize("schedule, warmup, total, ratio", [
    ("cosine", 4, 36, 0.1), ("cosine", 0, 10, 0.0), ("cosine", 3, 3, 0.2),
    ("linear", 5, 60, 0.0), ("linear", 2, 12, 0.25), ("constant", 5, 20, 0.0), ("constant", 0, 5, 0.3),
])
def test_schedule_matches_formula(schedule, warmup, total, ratio):
    values, _, _ = _lrs(schedule, warmup, total, ratio)
    expected = [_expected(schedule, s, warmup, total, ratio) for s in range(total + 1)]
    assert values == pytest.approx(expected, abs=1e-12)
    if schedule != "constant" and total > warmup:
        assert values[total] == pytest.approx(ratio)  # the final lr is min_lr_ratio * peak
        assert max(values) == pytest.approx(1.0)


def test_state_round_trip_continues_on_the_same_values():
    import json

    values, optimizer, scheduler = _lrs("cosine", 3, 20, 0.1)
    reference = values
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    partial_opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=0.5)
    partial = make_scheduler(partial_opt, "cosine", 3, 20, 0.1)
    for _ in range(7):
        partial_opt.step()
        partial.step()
    state = json.loads(json.dumps(partial.state_dict()))  # checkpoints keep it as JSON
    fresh_opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=0.5)
    fresh = make_scheduler(fresh_opt, "cosine", 3, 20, 0.1)
    fresh.load_state_dict(state)
    fresh_opt.load_state_dict(partial_opt.state_dict())
    resumed = []
    for _ in range(7, 21):
        resumed.append(fresh_opt.param_groups[0]["lr"] / 0.5)
        fresh_opt.step()
        fresh.step()
    assert resumed == reference[7:]


def test_bad_schedule_arguments():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match=r"min_lr_ratio=1.5: expected a fraction in \[0, 1\]"):
        make_scheduler(optimizer, "cosine", 0, 10, 1.5)
    with pytest.raises(ConfigError, match="expected constant, linear or cosine"):
        make_scheduler(optimizer, "step", 0, 10, 0.0)
