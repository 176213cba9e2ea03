"""Meta-learning over adapter deltas: the functional inner loop, algorithms and the trainer.

The small researcher API lives in :mod:`deltameta.meta.functional` and is re-exported here::

    from deltameta import meta
    meta.inject(model, delta_config)
    deltas = meta.get_deltas(model)
    fast = meta.adapt(deltas, support, meta.lm_loss_fn(model), steps=1, lr=0.1)  # optimizer="adam" too
    meta.lm_loss_fn(model)(fast, query).backward()
"""

from deltameta.meta.functional import (
    adam_step,
    adapt,
    detached,
    forward_with,
    get_deltas,
    inject,
    lm_loss_fn,
    sgd_step,
)

__all__ = ["adam_step", "adapt", "detached", "forward_with", "get_deltas", "inject", "lm_loss_fn", "sgd_step"]
