"""The Adam inner optimizer with differentiable state (``inner_optimizer=adam``)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from deltameta.errors import ConfigError
from deltameta.meta import functional as F
from deltameta.meta.algorithms import InnerLoop, make_algorithm
from deltameta.meta.trainer import run_meta_train
from meta_helpers import (
    assert_batched_equals_looped,
    assert_matches_finite_difference,
    delta_config,
    make_batch,
    random_float64_model,
    tiny_config,
    zero_grads,
)

ADAM = dict(optimizer="adam", betas=(0.9, 0.99), eps=1e-8)


@pytest.fixture(scope="module")
def tiny64(tiny_fp32):
    """tiny-random-llama in float64 with random LoRA deltas (B != 0, so every gradient is generic)."""
    return random_float64_model(tiny_fp32[0], delta_config())


def test_adam_matches_torch_optim_adam(tiny64):
    """The functional inner Adam takes the same steps as ``torch.optim.Adam`` on the same losses."""
    params = F.get_deltas(tiny64)
    support = make_batch(1)
    loss_fn = F.lm_loss_fn(tiny64)
    fast = F.adapt(params, support, loss_fn, steps=3, lr=0.01, first_order=True, **ADAM)
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    optimizer = torch.optim.Adam(list(leaves.values()), lr=0.01, betas=ADAM["betas"], eps=ADAM["eps"])
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(leaves, support).backward()
        optimizer.step()
    for name in params:
        torch.testing.assert_close(fast[name].detach(), leaves[name].detach(), rtol=1e-10, atol=1e-12, msg=name)


def test_adam_first_order_equals_query_gradient_at_adapted_weights(tiny64):
    params = F.get_deltas(tiny64)
    support, query = make_batch(4), make_batch(5)
    loss_fn = F.lm_loss_fn(tiny64)
    zero_grads(params)
    algo = make_algorithm("fomaml", tiny64, params, InnerLoop(steps=2, lr=0.01, clip=1.0, **ADAM))
    result = algo.task_step(support, query, scale=1.0)
    assert result.finite and result.support_after < result.support_before
    got = {k: p.grad.clone() for k, p in params.items()}
    zero_grads(params)
    fast = F.adapt(params, support, loss_fn, steps=2, lr=0.01, first_order=True, clip=1.0, **ADAM)
    sgd = F.adapt(params, support, loss_fn, steps=2, lr=0.01, first_order=True, clip=1.0)
    assert any(not torch.allclose(fast[k], sgd[k]) for k in params)  # Adam really ran
    at = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    expected = torch.autograd.grad(loss_fn(at, query), list(at.values()))
    for (name, g), e in zip(got.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)
    zero_grads(params)


def test_adam_second_order_matches_finite_difference(tiny64):
    params = F.get_deltas(tiny64)
    support, query = make_batch(1), make_batch(2)
    loss_fn = F.lm_loss_fn(tiny64)
    lr, steps = 0.02, 2
    # Adam's m / (sqrt(v) + eps) is close to sign(g) with the default eps, whose kinks near
    # g = 0 make a finite difference unreliable; a larger eps makes the objective smooth.
    smooth = dict(ADAM, eps=1e-3)

    def objective(values, first_order=False):
        with F.math_attention():
            fast = F.adapt(values, support, loss_fn, steps=steps, lr=lr, first_order=first_order, **smooth)
            return loss_fn(fast, query)

    zero_grads(params)
    objective(params).backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    zero_grads(params)
    objective(params, first_order=True).backward()
    first_order = {k: p.grad.clone() for k, p in params.items()}
    zero_grads(params)

    # the second-order terms (through the gradients and Adam's moments) matter here
    assert_matches_finite_difference(params, objective, grads, first_order)


def test_adam_second_order_is_finite_with_fresh_lora(tiny_fp32):
    """A fresh LoRA (B = 0) has exactly-zero gradients for A: sqrt(v) at v = 0 must not give NaN."""
    model = copy.deepcopy(tiny_fp32[0])
    F.inject(model, delta_config())
    params = F.get_deltas(model)
    assert all(float(p.detach().abs().sum()) == 0 for k, p in params.items() if "lora_B" in k)
    algo = make_algorithm("maml", model, params, InnerLoop(steps=2, lr=0.01, **ADAM))
    result = algo.task_step(make_batch(3), make_batch(4), scale=1.0)
    assert result.finite
    for name, p in params.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert any(float(p.grad.abs().sum()) > 0 for p in params.values())


@pytest.mark.parametrize("name", ["fomaml", "maml", "metasgd"])
def test_adam_task_batched_equals_looped(tiny_fp32, name):
    model = random_float64_model(tiny_fp32[0], delta_config("tarp"), seed=1, scale=0.2)
    params = F.get_deltas(model)
    assert_batched_equals_looped(make_algorithm(name, model, params, InnerLoop(steps=2, lr=0.01, clip=5.0, **ADAM)))


def test_unknown_inner_optimizer_is_refused(tiny64):
    with pytest.raises(ConfigError, match="inner optimizer 'rmsprop'"):
        make_algorithm("fomaml", tiny64, F.get_deltas(tiny64), InnerLoop(optimizer="rmsprop"))
    with pytest.raises(ConfigError, match="inner optimizer 'rmsprop'"):
        F.adapt(F.get_deltas(tiny64), make_batch(1), F.lm_loss_fn(tiny64), optimizer="rmsprop")
    from deltameta.config import build_config
    from deltameta.meta.config import MetaTrainConfig

    with pytest.raises(ConfigError, match="inner_optimizer"):
        build_config(MetaTrainConfig, overrides=["inner_optimizer=rmsprop"])


def test_adam_inplace_inner_loop_matches_functional(tmp_path):
    """inner_optimizer=adam through the trainer, with the in-place (gradient checkpointing) and functional loops."""
    results = {}
    for checkpointing in (False, True):
        config = tiny_config(tmp_path / str(checkpointing), inner_optimizer="adam", inner_lr=0.01,
                             gradient_checkpointing=checkpointing, controller="none", task_batched=False,
                             outer_steps=2, eval_every=0, checkpoint_every=0)
        result = run_meta_train(config)
        assert result.skipped == 0 and result.final_validation is not None
        results[checkpointing] = load_file(str(result.run_dir / "final" / "deltas.safetensors"))
    for name, value in results[False].items():
        torch.testing.assert_close(results[True][name], value, rtol=1e-5, atol=1e-6)
