"""Shared helpers of the meta-learning tests (tiny configs, synthetic batches)."""

from __future__ import annotations

import copy
import types

import pytest
import torch

#: A run small enough for tiny-random-llama on 2 CPU cores (a few seconds).
TINY_RUN = dict(
    model="tiny-random-llama",
    quantization="none",
    tasks="builtin:caesar,string_op,kv_lookup,linear",
    splits="train=0.5,validation=0.5",
    builtin_tasks_per_family=3,
    builtin_examples_per_task=8,
    shots=2,
    query_size=2,
    max_length=96,
    rank=2,
    ops=["tarp-2", "lora-2", "skip"],
    target_modules=["q_proj", "v_proj"],
    outer_steps=4,
    meta_batch_size=2,
    eval_every=2,
    eval_tasks=2,
    checkpoint_every=2,
    progress=False,
    plots=False,
    export=False,
)

#: The held-out split of :data:`TINY_RUN` as ``deltameta evaluate`` keys (the tasks a tiny meta-adapter never saw).
TINY_EVAL_TASKS = dict(tasks=TINY_RUN["tasks"], splits=TINY_RUN["splits"], split="validation",
                       builtin_tasks_per_family=TINY_RUN["builtin_tasks_per_family"],
                       builtin_examples_per_task=TINY_RUN["builtin_examples_per_task"])


def tiny_config(tmp_path, **overrides):
    """Return a validated MetaTrainConfig for a tiny run in ``tmp_path / 'run'``."""
    from deltameta.config import build_config
    from deltameta.meta.config import MetaTrainConfig

    values = dict(TINY_RUN, output_dir=str(tmp_path / "run"))
    values.update(overrides)
    return build_config(MetaTrainConfig, overrides=values)


def make_batch(seed: int, n: int = 2, length: int = 12, vocab: int = 250) -> dict[str, torch.Tensor]:
    """Random tokens; the loss is on the second half of each sequence."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def rmsnorm_in_input_dtype(model) -> None:
    """Llama's RMSNorm computes in float32 even for a float64 model; keep it in float64 here."""

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)


def delta_config(delta: str = "lora", **overrides):
    """A small DeltaConfig (rank 2, alpha 4) on ``q_proj``, ``v_proj`` and ``down_proj``."""
    from deltameta.deltas.config import DeltaConfig

    values = dict(delta=delta, rank=2, alpha=4.0, target_modules=["q_proj", "v_proj", "down_proj"])
    values.update(overrides)
    return DeltaConfig(**values)


def random_float64_model(base, config, seed: int = 0, scale: float = 0.3):
    """A float64 copy of ``base`` with the deltas of ``config`` drawn at random (B != 0, so every gradient is generic)."""
    from deltameta.meta import functional as F

    model = copy.deepcopy(base)
    F.inject(model, config)
    model.double()
    rmsnorm_in_input_dtype(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in F.get_deltas(model).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model


def zero_grads(params) -> None:
    """Drop the ``.grad`` of every tensor of ``params``."""
    for p in params.values():
        p.grad = None


def assert_matches_finite_difference(params, objective, grads, first_order, trials: int = 3, eps: float = 1e-6) -> None:
    """Check a second-order meta-gradient against central finite differences of ``objective``.

    Along ``trials`` random directions, ``grads`` must match the finite difference, and the
    first-order gradient ``first_order`` must not (so the second-order terms matter here and a
    first-order gradient would be caught).
    """
    gen = torch.Generator().manual_seed(3)
    for _ in range(trials):
        direction = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
        with torch.no_grad():
            plus = {k: (p + eps * direction[k]).detach() for k, p in params.items()}
            minus = {k: (p - eps * direction[k]).detach() for k, p in params.items()}
        fd = (float(objective(plus).detach()) - float(objective(minus).detach())) / (2 * eps)
        analytic = float(sum((grads[k] * direction[k]).sum() for k in params))
        approx = float(sum((first_order[k] * direction[k]).sum() for k in params))
        assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-8)
        assert abs(approx - fd) > 1e-4 * max(1.0, abs(fd))


def assert_batched_equals_looped(algo, tasks: int = 3) -> None:
    """``algo.tasks_step_batched`` gives the meta-gradients and mean losses of looping ``task_step``.

    The tasks have different sequence lengths, so the batched step also pads.
    """
    supports = [make_batch(10 + t, n=2, length=9 + t) for t in range(tasks)]
    queries = [make_batch(20 + t, n=2, length=10 - t) for t in range(tasks)]
    meta = algo.meta_parameters()
    zero_grads(meta)
    looped = [algo.task_step(s, q, scale=1.0 / tasks) for s, q in zip(supports, queries)]
    reference = {k: p.grad.clone() for k, p in meta.items()}
    zero_grads(meta)
    result = algo.tasks_step_batched(supports, queries, scale=1.0 / tasks)
    for k, p in meta.items():
        torch.testing.assert_close(p.grad, reference[k], rtol=1e-9, atol=1e-11, msg=k)
    zero_grads(meta)
    assert result.query_after == pytest.approx(sum(r.query_after for r in looped) / tasks, rel=1e-9)
    assert result.support_before == pytest.approx(sum(r.support_before for r in looped) / tasks, rel=1e-9)
