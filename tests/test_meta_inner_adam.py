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
from meta_helpers import make_batch, rmsnorm_in_input_dtype, tiny_config

ADAM = dict(optimizer="adam", betas=(0.9, 0.99), eps=1e-8)


def _delta_config(delta="lora"):
    from deltameta.deltas.config import DeltaConfig

    return DeltaConfig(delta=delta, rank=2, alpha=4.0, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def tiny64(tiny_fp32):
    """tiny-random-llama in float64 with random LoRA deltas (B != 0, so every gradient is generic)."""
    model = copy.deepcopy(tiny_fp32[0])
    F.inject(model, _delta_config())
    model.double()
    rmsnorm_in_input_dtype(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in F.get_deltas(model).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model


def _zero(params):
    for p in params.values():
        p.grad = None


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
    _zero(params)
    algo = make_algorithm("fomaml", tiny64, params, InnerLoop(steps=2, lr=0.01, clip=1.0, **ADAM))
    result = algo.task_step(support, query, scale=1.0)
    assert result.finite and result.support_after < result.support_before
    got = {k: p.grad.clone() for k, p in params.items()}
    _zero(params)
    fast = F.adapt(params, support, loss_fn, steps=2, lr=0.01, first_order=True, clip=1.0, **ADAM)
    sgd = F.adapt(params, support, loss_fn, steps=2, lr=0.01, first_order=True, clip=1.0)
    assert any(not torch.allclose(fast[k], sgd[k]) for k in params)  # Adam really ran
    at = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    expected = torch.autograd.grad(loss_fn(at, query), list(at.values()))
    for (name, g), e in zip(got.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)
    _zero(params)


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

    _zero(params)
    objective(params).backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    _zero(params)
    objective(params, first_order=True).backward()
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
        # the second-order terms (through the gradients and Adam's moments) matter here
        assert abs(approx - fd) > 1e-4 * max(1.0, abs(fd))


def test_adam_second_order_is_finite_with_fresh_lora(tiny_fp32):
    """A fresh LoRA (B = 0) has exactly-zero gradients for A: sqrt(v) at v = 0 must not give NaN."""
    model = copy.deepcopy(tiny_fp32[0])
    F.inject(model, _delta_config())
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
    model = copy.deepcopy(tiny_fp32[0])
    F.inject(model, _delta_config("tarp"))
    model.double()
    rmsnorm_in_input_dtype(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in F.get_deltas(model).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    params = F.get_deltas(model)
    tasks = 3
    supports = [make_batch(10 + t, n=2, length=9 + t) for t in range(tasks)]
    queries = [make_batch(20 + t, n=2, length=10 - t) for t in range(tasks)]
    algo = make_algorithm(name, model, params, InnerLoop(steps=2, lr=0.01, clip=5.0, **ADAM))
    meta = algo.meta_parameters()
    looped = [algo.task_step(s, q, scale=1.0 / tasks) for s, q in zip(supports, queries)]
    reference = {k: p.grad.clone() for k, p in meta.items()}
    for p in meta.values():
        p.grad = None
    result = algo.tasks_step_batched(supports, queries, scale=1.0 / tasks)
    for k, p in meta.items():
        torch.testing.assert_close(p.grad, reference[k], rtol=1e-9, atol=1e-11, msg=k)
    assert result.query_after == pytest.approx(sum(r.query_after for r in looped) / tasks, rel=1e-9)


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
