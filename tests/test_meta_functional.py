"""Meta-gradient correctness of the functional inner loop and the algorithms (tiny-random-llama)."""

from __future__ import annotations

import pytest
import torch

from deltameta.meta import functional as F
from deltameta.meta.algorithms import InnerLoop, evaluate_task, make_algorithm
from meta_helpers import assert_matches_finite_difference, delta_config, make_batch, random_float64_model, zero_grads


@pytest.fixture(scope="module")
def tiny64(tiny_fp32):
    """tiny-random-llama in float64 with LoRA deltas whose B is random (so gradients are generic)."""
    return random_float64_model(tiny_fp32[0], delta_config())


def _params(model):
    return F.get_deltas(model)


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

    zero_grads(params)
    with F.math_attention():
        objective(params).backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    first_order = {}
    zero_grads(params)
    fast = F.adapt(params, support, loss_fn, steps=steps, lr=lr, first_order=True)
    loss_fn(fast, query).backward()
    first_order = {k: p.grad.clone() for k, p in params.items()}
    zero_grads(params)

    assert_matches_finite_difference(params, objective, grads, first_order)


def test_first_order_equals_query_gradient_at_adapted_weights(tiny64):
    params = _params(tiny64)
    support, query = make_batch(4), make_batch(5)
    loss_fn = F.lm_loss_fn(tiny64)
    zero_grads(params)
    algo = make_algorithm("fomaml", tiny64, params, InnerLoop(steps=2, lr=0.3, clip=1.0))
    result = algo.task_step(support, query, scale=1.0)
    assert result.finite and result.support_after < result.support_before
    got = {k: p.grad.clone() for k, p in params.items()}
    zero_grads(params)
    fast = F.adapt(params, support, loss_fn, steps=2, lr=0.3, first_order=True, clip=1.0)
    at = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    expected = torch.autograd.grad(loss_fn(at, query), list(at.values()))
    for (name, g), e in zip(got.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)
    zero_grads(params)


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
    zero_grads(params)
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
        zero_grads(params)


def test_metasgd_learning_rates_receive_gradients(tiny64):
    params = _params(tiny64)
    zero_grads(params)
    for first_order in (True, False):
        algo = make_algorithm("metasgd", tiny64, params, InnerLoop(steps=1, lr=0.1, first_order=first_order))
        lrs = algo.extra_parameters()
        assert len(lrs) == len(params)
        algo.task_step(make_batch(9), make_batch(10), scale=1.0)
        for name, lr in lrs.items():
            assert lr.grad is not None and torch.isfinite(lr.grad) and lr.grad != 0, name
        zero_grads(params)


def test_multitask_uses_same_passes_without_adaptation(tiny64):
    params = _params(tiny64)
    zero_grads(params)
    support, query = make_batch(11), make_batch(12)
    algo = make_algorithm("multitask", tiny64, params, InnerLoop(steps=2, lr=0.1))
    result = algo.task_step(support, query, scale=1.0)
    loss_fn = F.lm_loss_fn(tiny64)
    expected = torch.autograd.grad((2 * loss_fn(params, support) + loss_fn(params, query)) / 3, list(params.values()))
    for g, e in zip((p.grad for p in params.values()), expected):
        torch.testing.assert_close(g, e)
    assert result.support_before == pytest.approx(result.support_after)
    zero_grads(params)


def test_evaluate_task_improves_support_fit(tiny64):
    params = _params(tiny64)
    algo = make_algorithm("fomaml", tiny64, params, InnerLoop(steps=3, lr=0.3))
    batch = make_batch(13)
    before, after = evaluate_task(algo, batch, batch)
    assert after < before
    assert all(p.grad is None for p in params.values())


def test_loss_on_target_positions_only_equals_the_full_logits_loss(tiny_fp32):
    """``lm_loss_fn`` projects only the positions that predict answer tokens; same loss."""
    import copy

    from deltameta.deltas.config import DeltaConfig

    model = copy.deepcopy(tiny_fp32[0])
    F.inject(model, DeltaConfig(delta="lora", rank=2, target_modules=["q_proj"]))
    params = F.get_deltas(model)
    batch = make_batch(5, n=3, length=16)
    batch["labels"][1, 8:12] = -100  # ragged targets
    assert 0 < F.target_positions(batch["labels"]).numel() < 15
    full = F.grouped_target_loss(F.forward_with(model, params, batch).logits, batch["labels"], 1)[0]
    sparse = F.lm_loss_fn(model)(params, batch)
    torch.testing.assert_close(sparse, full, rtol=1e-6, atol=1e-6)
    grouped = F.lm_loss_fn(model, groups=3)(params, batch)
    per_group = F.grouped_target_loss(F.forward_with(model, params, batch).logits, batch["labels"], 3)
    torch.testing.assert_close(grouped, per_group.sum(), rtol=1e-6, atol=1e-6)


def test_skip_nonfinite_keeps_the_last_finite_tensors(tiny64):
    """Evaluation's adaptation skips a diverging step instead of turning the adapter into NaN."""
    params = _params(tiny64)
    support = make_batch(1)
    loss_fn = F.lm_loss_fn(tiny64)
    diverged = F.adapt(params, support, loss_fn, steps=1, lr=float("inf"), clip=None)
    assert not all(bool(torch.isfinite(v).all()) for v in diverged.values())
    kept = F.adapt(params, support, loss_fn, steps=2, lr=float("inf"), clip=None, skip_nonfinite=True)
    for name, value in kept.items():
        assert torch.equal(value.detach(), params[name].detach()), name
    finite = F.adapt(params, support, loss_fn, steps=1, lr=0.1, skip_nonfinite=True)
    assert any(not torch.equal(finite[n].detach(), params[n].detach()) for n in params)


def test_a_peft_wrapped_model_also_projects_only_target_positions(tiny_fp32):
    """``PeftModel.forward`` takes ``**kwargs``; the sparse head must still be used (evaluate, finetune)."""
    import copy

    from deltameta.base import forward_accepts
    from deltameta.finetune import common

    model = common.attach_adapter(copy.deepcopy(tiny_fp32[0]), "fresh",
                                  lora_config=common.fresh_lora_config(2, 4, ["q_proj", "v_proj"]))
    assert forward_accepts(model, "logits_to_keep") and not forward_accepts(model, "no_such_keyword")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for n, p in params.items():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a non-identity adapter
    batch = make_batch(6, n=3, length=16)
    inner = model.get_base_model()

    def keep_arguments(compute):
        """Run ``compute()``; return its value and the ``logits_to_keep`` of each forward of the wrapped model."""
        seen: list[object] = []
        hook = inner.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("logits_to_keep")), with_kwargs=True)
        try:
            return compute(), seen
        finally:
            hook.remove()

    sparse, seen = keep_arguments(lambda: F.lm_loss_fn(model)(params, batch))
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
    assert seen[0].numel() == F.target_positions(batch["labels"]).numel() < 15
    full = F.grouped_target_loss(F.forward_with(model, params, batch).logits, batch["labels"], 1)[0]
    torch.testing.assert_close(sparse, full, rtol=1e-6, atol=1e-6)
    finetune_loss, seen = keep_arguments(lambda: common.batch_loss(model, batch, "cpu"))  # the finetune recipe's loss
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
    torch.testing.assert_close(finetune_loss, full, rtol=1e-6, atol=1e-6)
