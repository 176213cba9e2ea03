"""Learning-rate schedules of ``meta-train`` and ``finetune``, built with ``transformers.get_scheduler``.

Both commands describe a schedule with the same keys: ``warmup_steps`` (linear warmup from 0 to the
peak lr, the ``transformers`` convention: the lr of step ``s < warmup_steps`` is ``peak * s /
warmup_steps``), then a decay over the remaining steps down to ``min_lr_ratio * peak``:

* ``cosine``: ``transformers``' ``cosine_with_min_lr`` (``min_lr_rate=min_lr_ratio``);
* ``linear``: ``polynomial`` with ``power=1`` and ``lr_end=min_lr_ratio * peak`` (``linear``
  itself decays to 0);
* ``constant``: ``constant_with_warmup``.

The schedulers are ``torch.optim.lr_scheduler.LambdaLR`` objects whose state (the step) is a
plain dict, so checkpoints store it as JSON and a resumed run continues on the same values.
"""

from __future__ import annotations

from typing import Literal

import torch

from deltameta.errors import ConfigError

Schedule = Literal["constant", "linear", "cosine"]


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Return the ``transformers`` scheduler of a warmup + decay schedule.

    Args:
        optimizer: The optimizer (its ``lr`` is the peak; every group is scaled alike).
        schedule: ``constant``, ``linear`` or ``cosine`` decay after the warmup.
        warmup_steps: Steps of linear warmup from 0.
        total_steps: Steps of the whole run (warmup included); the decay ends there.
        min_lr_ratio: Final lr as a fraction of the peak (``linear`` and ``cosine``).

    Returns:
        The scheduler (call ``step()`` once per optimizer step).

    Raises:
        ConfigError: an unknown schedule or a ``min_lr_ratio`` outside ``[0, 1]``.
    """
    from transformers import get_scheduler

    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"min_lr_ratio={min_lr_ratio}: expected a fraction in [0, 1].")
    total_steps = max(int(total_steps), 1)
    if schedule == "constant" or min_lr_ratio == 1.0:
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
    if schedule == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                             scheduler_specific_kwargs={"min_lr_rate": min_lr_ratio})
    if schedule == "linear":
        peak = optimizer.defaults["lr"]
        return get_scheduler("polynomial", optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                             scheduler_specific_kwargs={"lr_end": min_lr_ratio * peak, "power": 1.0})
    raise ConfigError(f"lr schedule '{schedule}': expected constant, linear or cosine.")
