"""Meta-SGD: per-tensor and per-element rates, exact rate gradients (finite differences), batching, resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from deltameta.errors import ConfigError
from deltameta.meta import functional as F
from deltameta.meta.algorithms import InnerLoop, make_algorithm
from meta_helpers import (
    assert_batched_equals_looped,
    delta_config,
    make_batch,
    random_float64_model,
    tiny_config,
    zero_grads,
)


@pytest.fixture(scope="module")
def tarp64(tiny_fp32):
    return random_float64_model(tiny_fp32[0], delta_config("tarp", target_modules=["q_proj", "v_proj"]), seed=2, scale=0.2)


def _rate_objective(model, params, support, query, inner: InnerLoop):
    """Query loss after the inner loop as a function of the rates (the deltas fixed)."""
    loss_fn = F.lm_loss_fn(model)
    start = {k: v.detach() for k, v in params.items()}

    def objective(rates):
        fast = F.adapt(start, support, loss_fn, steps=inner.steps, lr=rates, first_order=True, clip=inner.clip,
                       **inner.optimizer_kwargs())
        return loss_fn({k: v.detach() for k, v in fast.items()}, query)

    return objective


CASES = [
    # rates, steps, clip, optimizer
    ("tensor", 1, None, "sgd"),
    ("tensor", 3, 1.0, "sgd"),
    ("element", 2, None, "sgd"),
    ("element", 4, 1.0, "sgd"),
    ("element", 3, None, "adam"),
]


@pytest.mark.parametrize(("rates", "steps", "clip", "optimizer"), CASES)
def test_exact_rate_gradient_matches_finite_differences(tarp64, rates, steps, clip, optimizer):
    params = F.get_deltas(tarp64)
    support, query = make_batch(31), make_batch(32)
    lr = 0.02 if optimizer == "adam" else 0.3
    inner = InnerLoop(steps=steps, lr=lr, clip=clip, optimizer=optimizer, metasgd_rates=rates)
    algo = make_algorithm("metasgd", tarp64, params, inner)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # distinct rates, so that a wrong pairing of rates and tensors shows
        for rate in algo.lrs.values():
            rate.mul_(1 + 0.5 * torch.rand(rate.shape, generator=gen, dtype=rate.dtype))
    assert all(r.shape == (() if rates == "tensor" else params[k].shape) for k, r in algo.lrs.items())
    meta = algo.meta_parameters()
    zero_grads(meta)
    algo.task_step(support, query, scale=1.0)
    exact = {k: r.grad.clone() for k, r in algo.lrs.items()}
    deltas = {k: p.grad.clone() for k, p in params.items()}
    zero_grads(meta)
    old = make_algorithm("metasgd", tarp64, params, InnerLoop(steps=steps, lr=lr, clip=clip, optimizer=optimizer,
                                                              metasgd_rates=rates, metasgd_rate_grad="first_order"))
    with torch.no_grad():
        for k, r in old.lrs.items():
            r.copy_(algo.lrs[k])
    old.task_step(support, query, scale=1.0)
    biased = {k: r.grad.clone() for k, r in old.lrs.items()}
    old_deltas = {k: p.grad.clone() for k, p in params.items()}
    zero_grads(old.meta_parameters())

    # the deltas' gradient is the first-order one either way
    for k in params:
        torch.testing.assert_close(deltas[k], old_deltas[k], rtol=1e-10, atol=1e-12, msg=k)
    objective = _rate_objective(tarp64, params, support, query, inner)
    rates0 = {k: r.detach() for k, r in algo.lrs.items()}
    eps = 1e-6
    for trial in range(2):
        direction = {k: torch.randn(r.shape, generator=gen, dtype=r.dtype) for k, r in rates0.items()}
        plus = objective({k: r + eps * direction[k] for k, r in rates0.items()})
        minus = objective({k: r - eps * direction[k] for k, r in rates0.items()})
        fd = float(plus - minus) / (2 * eps)
        analytic = float(sum((exact[k] * direction[k]).sum() for k in rates0))
        approx = float(sum((biased[k] * direction[k]).sum() for k in rates0))
        assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9), (trial, analytic, fd)
        if steps == 1:  # one step: the first-order rate gradient is exact too
            assert approx == pytest.approx(fd, rel=1e-6, abs=1e-9)
        else:  # from two steps on it is biased (so this test would catch a first-order rate gradient)
            assert abs(approx - fd) > 1e-5 * max(1.0, abs(fd))


@pytest.mark.parametrize("rates", ["tensor", "element"])
@pytest.mark.parametrize("rate_grad", ["exact", "first_order"])
def test_task_batched_equals_looped(tarp64, rates, rate_grad):
    params = F.get_deltas(tarp64)
    inner = InnerLoop(steps=3, lr=0.3, clip=5.0, metasgd_rates=rates, metasgd_rate_grad=rate_grad)
    assert_batched_equals_looped(make_algorithm("metasgd", tarp64, params, inner))


def test_second_order_metasgd_rates_match_finite_differences(tarp64):
    """first_order=false: the full second-order graph; its rate gradient equals the exact one."""
    params = F.get_deltas(tarp64)
    support, query = make_batch(41), make_batch(42)
    grads = {}
    for first_order in (True, False):
        algo = make_algorithm("metasgd", tarp64, params, InnerLoop(steps=3, lr=0.3, first_order=first_order,
                                                                   metasgd_rates="element"))
        zero_grads(algo.meta_parameters())
        with F.math_attention():
            algo.task_step(support, query, scale=1.0)
        grads[first_order] = {k: r.grad.clone() for k, r in algo.lrs.items()}
        zero_grads(algo.meta_parameters())
    for k in grads[True]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-7, atol=1e-10, msg=k)


def test_extra_parameters_are_the_rates_by_delta_name(tarp64):
    params = F.get_deltas(tarp64)
    algo = make_algorithm("metasgd", tarp64, params, InnerLoop(lr=0.07, metasgd_rates="element"))
    extra = algo.extra_parameters()
    assert list(extra) == [f"metasgd_lr.{name}" for name in params]
    for name, p in params.items():
        rate = extra[f"metasgd_lr.{name}"]
        assert isinstance(rate, torch.nn.Parameter) and rate is algo.inner_lr()[name]
        assert rate.shape == p.shape and bool((rate == 0.07).all())
    with pytest.raises(ConfigError, match="metasgd_rates='row'"):
        make_algorithm("metasgd", tarp64, params, InnerLoop(metasgd_rates="row"))
    with pytest.raises(ConfigError, match="metasgd_rate_grad='fo'"):
        make_algorithm("metasgd", tarp64, params, InnerLoop(metasgd_rate_grad="fo"))
    from deltameta.config import build_config
    from deltameta.meta.config import MetaTrainConfig

    with pytest.raises(ConfigError, match="metasgd_rates"):
        build_config(MetaTrainConfig, overrides=["metasgd_rates=row"])


def test_learned_rates_stay_non_negative(tmp_path):
    from deltameta.meta.run_dir import prepare_run_dir
    from deltameta.meta.trainer import MetaTrainer

    config = tiny_config(tmp_path, algorithm="metasgd", metasgd_rates="element", controller="none", outer_lr=0.2,
                         warmup_steps=0, outer_steps=3, eval_every=0, checkpoint_every=0, meta_clip=0)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    trainer.train()
    rates = torch.cat([r.detach().flatten() for r in trainer.algorithm.lrs.values()])
    assert bool((rates >= 0).all())
    assert bool((rates == 0).any()) and bool((rates > config.inner_lr).any())  # the projection was active; rates move


def test_resume_is_bit_exact_with_element_rates(tmp_path):
    from deltameta.meta import checkpoint as ckpt
    from deltameta.meta.run_dir import prepare_run_dir
    from deltameta.meta.trainer import MetaTrainer, run_meta_train

    overrides = dict(algorithm="metasgd", metasgd_rates="element", task_batched=True, inner_steps=2)
    straight = MetaTrainer(tiny_config(tmp_path / "a", **overrides), prepare_run_dir(str(tmp_path / "a" / "run")))
    straight.train()
    config = tiny_config(tmp_path / "b", **overrides)
    trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
    original = trainer.save_checkpoint

    def crash():
        original()
        raise KeyboardInterrupt

    trainer.save_checkpoint = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [s for s, _ in ckpt.list_checkpoints(config.output_dir)] == [2]
    torch.manual_seed(999)
    run_meta_train(config, resume=True)
    a = load_file(str(straight.run_dir / "final" / "deltas.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "final" / "deltas.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rates_a = straight.state_dict()["extra_params"]
    rates_b = ckpt.load_checkpoint(ckpt.latest_checkpoint(config.output_dir))["extra_params"]
    assert rates_a.keys() == rates_b.keys() and all(torch.equal(rates_a[k], rates_b[k]) for k in rates_a)
