"""Task-batched inner loop: the T tasks of a meta-batch in one forward/backward.

Instead of a Python loop over tasks, each delta tensor is given a leading task dimension ``T``
(one slice per task, all starting from the same meta-parameters) and the encoded support (and
query) batches of the T tasks are concatenated into one batch of T equal contiguous groups. The
delta layers then use a batched matmul, giving every example its own task's weights, as
multi-LoRA servers do. Because the loss is the *sum* of per-task mean losses, the gradient of
each slice is exactly that task's gradient, so one batched step equals T looped steps (see
``tests/test_meta_batched.py``; the loop in :mod:`deltameta.meta.algorithms` is the reference).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from deltameta.errors import ConfigError


def stack_params(params: Mapping[str, Tensor], tasks: int) -> dict[str, Tensor]:
    """Give every tensor a leading task dimension by broadcasting (no copy, differentiable).

    Args:
        params: Meta-parameters ``name -> tensor``.
        tasks: Number of tasks ``T``.

    Returns:
        ``name -> tensor`` of shape ``[T, *shape]``; gradients flow back to ``params`` summed
        over tasks.
    """
    return {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}


def unstack_params(params: Mapping[str, Tensor], index: int) -> dict[str, Tensor]:
    """Return task ``index``'s slice of task-batched params."""
    return {k: v[index] for k, v in params.items()}


def concat_batches(batches: Sequence[Mapping[str, Tensor]], pad_token_id: int = 0) -> dict[str, Tensor]:
    """Concatenate encoded batches of equal size into one batch of contiguous groups.

    Sequences are right-padded to the longest length (``input_ids`` with ``pad_token_id``,
    ``attention_mask`` with 0, ``labels`` with -100), which changes no loss: padded positions are
    masked out and, with causal attention, never influence earlier positions.

    Args:
        batches: One encoded batch per task, each with the same number of examples.
        pad_token_id: Padding id for ``input_ids``.

    Returns:
        The concatenated batch.

    Raises:
        ConfigError: the batches hold different numbers of examples.
    """
    sizes = {int(b["input_ids"].shape[0]) for b in batches}
    if len(sizes) != 1:
        raise ConfigError(
            f"task-batched inner loop needs the same number of examples per task, got sizes {sorted(sizes)}; "
            "set task_batched=false or use equal shots/query_size for every task."
        )
    length = max(int(b["input_ids"].shape[1]) for b in batches)
    padded = [_pad_to(b, length, pad_token_id) for b in batches]
    return {key: torch.cat([p[key] for p in padded], dim=0) for key in batches[0]}


def pad_batch(batch: Mapping[str, Tensor], length: int, pad_token_id: int = 0) -> dict[str, Tensor]:
    """Right-pad every sequence of ``batch`` to ``length`` (see :func:`concat_batches`)."""
    return concat_batches([batch], pad_token_id) if int(batch["input_ids"].shape[1]) >= length else _pad_to(batch, length, pad_token_id)


def _pad_to(batch: Mapping[str, Tensor], length: int, pad_token_id: int) -> dict[str, Tensor]:
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    out = {}
    for key, t in batch.items():
        if t.dim() >= 2 and t.shape[1] < length:
            pad = torch.full((t.shape[0], length - t.shape[1], *t.shape[2:]), fill.get(key, 0), dtype=t.dtype, device=t.device)
            t = torch.cat([t, pad], dim=1)
        out[key] = t
    return out
