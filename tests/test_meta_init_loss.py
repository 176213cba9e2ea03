"""``init_loss_weight``: the outer objective ``L_query(φ_K) + λ L_support(φ_0)`` of every meta-learner.

The term's gradient is ``λ ∇L_support(φ_0)`` on the deltas (taken from the first inner step, before
clipping): checked against a direct autograd computation for each algorithm, looped and
task-batched, in place (gradient checkpointing) and functional, and through the trainer.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from deltameta.config import build_config
from deltameta.errors import ConfigError
from deltameta.meta import functional as F
from deltameta.meta.algorithms import InnerLoop, make_algorithm
from deltameta.meta.config import MetaTrainConfig
from deltameta.meta.trainer import run_meta_train
from meta_helpers import assert_batched_equals_looped, delta_config, make_batch, random_float64_model, tiny_config, zero_grads

LAMBDA = 0.7
SCALE = 0.5


@pytest.fixture(scope="module")
def tiny64(tiny_fp32):
    """tiny-random-llama in float64 with random LoRA deltas."""
    return random_float64_model(tiny_fp32[0], delta_config())


def _meta_grads(model, algorithm: str, weight: float, inner: InnerLoop, inplace: bool = False) -> dict[str, torch.Tensor]:
    params = F.get_deltas(model)
    algo = make_algorithm(algorithm, model, params, inner, init_loss_weight=weight)
    algo.inplace = inplace
    meta = algo.meta_parameters()
    zero_grads(meta)
    result = algo.task_step(make_batch(1), make_batch(2), scale=SCALE)
    assert result.finite
    grads = {k: p.grad.clone() for k, p in meta.items()}
    zero_grads(meta)
    return grads


CASES = [
    ("fomaml", {}),
    ("maml", {}),
    ("reptile", {}),
    ("metasgd", {"metasgd_rate_grad": "exact"}),
    ("metasgd", {"metasgd_rate_grad": "first_order"}),
    ("metasgd", {"first_order": False}),
]


@pytest.mark.parametrize(("algorithm", "extra"), CASES, ids=[f"{a}-{'-'.join(map(str, e.values()))}" for a, e in CASES])
def test_the_term_adds_the_support_gradient_at_the_meta_parameters(tiny64, algorithm, extra):
    inner = InnerLoop(steps=2, lr=0.3, clip=0.5, **extra)  # clip < the gradient norm: the term must not be clipped
    with_term = _meta_grads(tiny64, algorithm, LAMBDA, inner)
    without = _meta_grads(tiny64, algorithm, 0.0, inner)
    params = F.get_deltas(tiny64)
    at = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    support_grads = torch.autograd.grad(F.lm_loss_fn(tiny64)(at, make_batch(1)), list(at.values()))
    assert float(torch.sqrt(sum(g.pow(2).sum() for g in support_grads))) > 0.5
    for (name, _), g in zip(at.items(), support_grads):
        torch.testing.assert_close(with_term[name] - without[name], LAMBDA * SCALE * g, rtol=1e-9, atol=1e-12, msg=name)
    for name in with_term.keys() - at.keys():  # Meta-SGD's rates: L_support(φ_0) does not depend on them
        torch.testing.assert_close(with_term[name], without[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("algorithm", ["fomaml", "metasgd", "reptile"])
def test_task_batched_equals_looped_with_the_term(tiny64, algorithm):
    params = F.get_deltas(tiny64)
    algo = make_algorithm(algorithm, tiny64, params, InnerLoop(steps=2, lr=0.3, clip=1.0), init_loss_weight=LAMBDA)
    assert_batched_equals_looped(algo)


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_in_place_inner_loop_adds_the_same_term(tiny64, algorithm):
    inner = InnerLoop(steps=2, lr=0.3, clip=0.5)
    functional = _meta_grads(tiny64, algorithm, LAMBDA, inner)
    inplace = _meta_grads(tiny64, algorithm, LAMBDA, inner, inplace=True)
    for name, g in functional.items():
        torch.testing.assert_close(inplace[name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_baselines_and_negative_weights_are_refused(tiny64):
    params = F.get_deltas(tiny64)
    for name in ("multitask", "none"):
        with pytest.raises(ConfigError, match=f"init_loss_weight=1.0 applies to meta-learners; algorithm={name}"):
            make_algorithm(name, tiny64, params, InnerLoop(), init_loss_weight=1.0)
    with pytest.raises(ConfigError, match=r"init_loss_weight=-1.0: expected a number >= 0"):
        make_algorithm("fomaml", tiny64, params, InnerLoop(), init_loss_weight=-1.0)
    with pytest.raises(ConfigError, match="init_loss_weight=0.5 applies to meta-learners; algorithm=multitask"):
        build_config(MetaTrainConfig, overrides=["algorithm=multitask", "init_loss_weight=0.5"])
    with pytest.raises(ConfigError, match="init_loss_weight=-0.5: expected a number >= 0"):
        build_config(MetaTrainConfig, overrides=["init_loss_weight=-0.5"])


def test_meta_train_with_the_term_moves_the_deltas_differently(tmp_path):
    """Through the trainer: the key reaches the algorithm (the deltas differ from a λ = 0 run's)."""
    finals = {}
    for weight in (0.0, 1.0):
        config = tiny_config(tmp_path / str(weight), algorithm="metasgd", controller="none", delta="lora",
                             init_loss_weight=weight, outer_steps=2, eval_every=0, checkpoint_every=0)
        finals[weight] = load_file(str(run_meta_train(config).run_dir / "final" / "deltas.safetensors"))
    assert finals[0.0].keys() == finals[1.0].keys()
    assert any(not torch.equal(finals[0.0][k], finals[1.0][k]) for k in finals[0.0])


def test_the_logged_meta_loss_includes_the_term(tmp_path):
    import json

    config = tiny_config(tmp_path, algorithm="fomaml", controller="none", delta="lora", init_loss_weight=0.5,
                         outer_steps=2, eval_every=0, checkpoint_every=0)
    rows = [json.loads(line) for line in (run_meta_train(config).run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    assert train
    for row in train:
        assert row["meta_loss"] == pytest.approx(row["query_after"] + 0.5 * row["support_before"], rel=1e-12)
