"""Meta-gradient correctness of the functional inner loop and the algorithms (tiny-random-llama)."""

from __future__ import annotations

import copy

import pytest
import torch

from deltameta.meta import functional as F
from deltameta.meta.algorithms import InnerLoop, evaluate_task, make_algorithm
from meta_helpers import make_batch, rmsnorm_in_input_dtype as _rmsnorm_in_input_dtype


def _delta_config(**kwargs):
    from deltameta.deltas.config import DeltaConfig

    base = dict(delta="lora", rank=2, alpha=4.0, target_modules=["q_proj", "v_proj", "down_proj"])
    base.update(kwargs)
    return DeltaConfig(**base)


@pytest.fixture(scope="module")
def tiny64(tiny_fp32):
    """tiny-random-llama in float64 with LoRA deltas whose B is random (so gradients are generic)."""
    model = copy.deepcopy(tiny_fp32[0])
    F.inject(model, _delta_config())
    model.double()
    _rmsnorm_in_input_dtype(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in F.get_deltas(model).items():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def _params(model):
    return F.get_deltas(model)


def _zero(params):
    for p in params.values():
        p.grad = None


def test_get_deltas_only_delta_tensors(tiny64):
    names = list(_params(tiny64))
    assert names and all(("lora_A" in n or "lora_B" in n) for n in names)
    assert all(p.requires_grad for p in _params(tiny64).values())


def test_second_order_matches_finite_difference(tiny64):
    params = _params(tiny64)
    support, query = make_batch(1), make_batch(2)
    loss_fn = F.lm_loss_fn(tiny64)
    lr, steps = 0.5, 2

    def objective(values):
        with F.math_attention():
            fast = F.adapt(values, support, loss_fn, steps=steps, lr=lr, first_order=False)
            return loss_fn(fast, query)

    _zero(params)
    with F.math_attention():
        objective(params).backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    first_order = {}
    _zero(params)
    fast = F.adapt(params, support, loss_fn, steps=steps, lr=lr, first_order=True)
    loss_fn(fast, query).backward()
    first_order = {k: p.grad.clone() for k, p in params.items()}
    _zero(params)

    gen = torch.Generator().manual_seed(3)
    eps = 1e-6
    for _ in range(3):
        direction = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
        with torch.no_grad():
            plus = {k: (p + eps * direction[k]).detach() for k, p in params.items()}
            minus = {k: (p - eps * direction[k]).detach() for k, p in params.items()}
        fd = (float(objective(plus).detach()) - float(objective(minus).detach())) / (2 * eps)
        analytic = float(sum((grads[k] * direction[k]).sum() for k in params))
        approx = float(sum((first_order[k] * direction[k]).sum() for k in params))
        assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-8)
        # the second-order terms matter here, so the test would catch a first-order gradient
        assert abs(approx - fd) > 1e-4 * max(1.0, abs(fd))


def test_first_order_equals_query_gradient_at_adapted_weights(tiny64):
    params = _params(tiny64)
    support, query = make_batch(4), make_batch(5)
    loss_fn = F.lm_loss_fn(tiny64)
    _zero(params)
    algo = make_algorithm("fomaml", tiny64, params, InnerLoop(steps=2, lr=0.3, clip=1.0))
    result = algo.task_step(support, query, scale=1.0)
    assert result.finite and result.support_after < result.support_before
    got = {k: p.grad.clone() for k, p in params.items()}
    _zero(params)
    fast = F.adapt(params, support, loss_fn, steps=2, lr=0.3, first_order=True, clip=1.0)
    at = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    expected = torch.autograd.grad(loss_fn(at, query), list(at.values()))
    for (name, g), e in zip(got.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)
    _zero(params)


def test_inner_clipping_bounds_the_step(tiny64):
    params = _params(tiny64)
    support = make_batch(6)
    loss_fn = F.lm_loss_fn(tiny64)
    fast = F.adapt(params, support, loss_fn, steps=1, lr=1.0, first_order=True, clip=1e-3)
    step = torch.sqrt(sum(((fast[k] - params[k]) ** 2).sum() for k in params))
    assert float(step.detach()) == pytest.approx(1e-3, rel=1e-3)


def test_reptile_moves_toward_adapted_weights(tiny64):
    params = _params(tiny64)
    original = {k: p.detach().clone() for k, p in params.items()}
    support, query = make_batch(7), make_batch(8)
    algo = make_algorithm("reptile", tiny64, params, InnerLoop(steps=3, lr=0.2))
    fast = F.adapt(params, support, algo.loss_fn(), steps=3, lr=0.2, first_order=True)
    fast = {k: v.detach() for k, v in fast.items()}
    _zero(params)
    algo.task_step(support, query, scale=1.0)
    optimizer = torch.optim.SGD(list(params.values()), lr=0.25)
    optimizer.step()
    try:
        for k, p in params.items():
            expected = original[k] + 0.25 * (fast[k] - original[k])
            torch.testing.assert_close(p.detach(), expected)
        before = sum(((original[k] - fast[k]) ** 2).sum() for k in params)
        after = sum(((params[k].detach() - fast[k]) ** 2).sum() for k in params)
        assert after < before
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(original[k])
        _zero(params)


def test_metasgd_learning_rates_receive_gradients(tiny64):
    params = _params(tiny64)
    _zero(params)
    for first_order in (True, False):
        algo = make_algorithm("metasgd", tiny64, params, InnerLoop(steps=1, lr=0.1, first_order=first_order))
        lrs = algo.extra_parameters()
        assert len(lrs) == len(params)
        algo.task_step(make_batch(9), make_batch(10), scale=1.0)
        for name, lr in lrs.items():
            assert lr.grad is not None and torch.isfinite(lr.grad) and lr.grad != 0, name
        _zero(params)


def test_multitask_uses_same_passes_without_adaptation(tiny64):
    params = _params(tiny64)
    _zero(params)
    support, query = make_batch(11), make_batch(12)
    algo = make_algorithm("multitask", tiny64, params, InnerLoop(steps=2, lr=0.1))
    result = algo.task_step(support, query, scale=1.0)
    loss_fn = F.lm_loss_fn(tiny64)
    expected = torch.autograd.grad((2 * loss_fn(params, support) + loss_fn(params, query)) / 3, list(params.values()))
    for g, e in zip((p.grad for p in params.values()), expected):
        torch.testing.assert_close(g, e)
    assert result.support_before == pytest.approx(result.support_after)
    _zero(params)


def test_evaluate_task_improves_support_fit(tiny64):
    params = _params(tiny64)
    algo = make_algorithm("fomaml", tiny64, params, InnerLoop(steps=3, lr=0.3))
    batch = make_batch(13)
    before, after = evaluate_task(algo, batch, batch)
    assert after < before
    assert all(p.grad is None for p in params.values())
