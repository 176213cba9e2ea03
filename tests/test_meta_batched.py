"""The task-batched inner loop equals the looped reference."""

from __future__ import annotations

import copy

import pytest
import torch

from deltameta.meta import batched as B
from deltameta.meta import functional as F
from deltameta.meta.algorithms import InnerLoop, make_algorithm
from meta_helpers import make_batch, rmsnorm_in_input_dtype as _rmsnorm_in_input_dtype


@pytest.fixture(scope="module")
def tiny_tarp64(tiny_fp32):
    from deltameta.deltas.config import DeltaConfig

    model = copy.deepcopy(tiny_fp32[0])
    F.inject(model, DeltaConfig(delta="tarp", rank=2, alpha=4.0, target_modules=["q_proj", "v_proj", "up_proj"]))
    model.double()
    _rmsnorm_in_input_dtype(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in F.get_deltas(model).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model


def test_concat_batches_pads_and_masks():
    a, b = make_batch(1, n=2, length=5), make_batch(2, n=2, length=8)
    out = B.concat_batches([a, b], pad_token_id=7)
    assert out["input_ids"].shape == (4, 8)
    assert (out["input_ids"][:2, 5:] == 7).all() and (out["attention_mask"][:2, 5:] == 0).all()
    assert (out["labels"][:2, 5:] == -100).all()
    with pytest.raises(Exception, match="same number of examples"):
        B.concat_batches([a, make_batch(3, n=3)])


@pytest.mark.parametrize("name", ["fomaml", "maml", "metasgd", "reptile", "multitask"])
def test_task_batched_equals_looped(tiny_tarp64, name):
    params = F.get_deltas(tiny_tarp64)
    tasks = 3
    supports = [make_batch(10 + t, n=2, length=9 + t) for t in range(tasks)]
    queries = [make_batch(20 + t, n=2, length=10 - t) for t in range(tasks)]
    algo = make_algorithm(name, tiny_tarp64, params, InnerLoop(steps=2, lr=0.3, clip=5.0))
    meta = algo.meta_parameters()

    for p in meta.values():
        p.grad = None
    looped = [algo.task_step(s, q, scale=1.0 / tasks) for s, q in zip(supports, queries)]
    reference = {k: p.grad.clone() for k, p in meta.items()}
    for p in meta.values():
        p.grad = None
    result = algo.tasks_step_batched(supports, queries, scale=1.0 / tasks)
    for k, p in meta.items():
        torch.testing.assert_close(p.grad, reference[k], rtol=1e-9, atol=1e-11, msg=k)
        p.grad = None
    assert result.query_after == pytest.approx(sum(r.query_after for r in looped) / tasks, rel=1e-9)
    assert result.support_before == pytest.approx(sum(r.support_before for r in looped) / tasks, rel=1e-9)
