"""Adapter deltas on tiny-random-llama: injection, init, gradients, task batching, dtypes."""

from __future__ import annotations

import pytest
import torch

from deltameta.base import load_base
from deltameta.deltas import (
    ArchController,
    DeltaConfig,
    DeltaLinear,
    count_delta_parameters,
    delta_layers,
    delta_parameters,
    expand_for_tasks,
    inject_deltas,
    task_embedding,
)
from deltameta.errors import ConfigError, DeltametaError

QUANTS = ["none", "nf4"]


def _base(quant: str, **kwargs):
    return load_base("tiny-random-llama", quantization=quant, device="cpu", **kwargs)


def _ids(batch: int = 4, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _randomize(model, std: float = 0.1, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize(
    "targets, expected",
    [
        (["q_proj", "v_proj"], 4),
        (None, 14),
        (r"model\.layers\.1\.mlp\.(up|down)_proj", 2),
    ],
)
def test_injection_wraps_targets_and_freezes_base(quant, targets, expected):
    model, _ = _base(quant)
    originals = {name: module for name, module in model.named_modules()}
    config = DeltaConfig(rank=4) if targets is None else DeltaConfig(rank=4, target_modules=targets)
    names = inject_deltas(model, config)
    assert len(names) == expected
    layers = delta_layers(model)
    assert list(layers) == names
    for name, layer in layers.items():
        assert isinstance(layer, DeltaLinear)
        assert layer.base_layer is originals[name]  # never copied
        expected_type = "Linear4bit" if quant == "nf4" else "Linear"
        assert type(layer.base_layer).__name__ == expected_type
    params = delta_parameters(model)
    named = dict(model.named_parameters())
    assert set(params) <= set(named)
    assert {n for n, p in named.items() if p.requires_grad} == set(params)
    assert all("lora_A" in n or "lora_B" in n for n in params)
    r = 4
    assert count_delta_parameters(model) == sum(r * (l.in_features + l.out_features) for l in layers.values())


def test_injection_errors_list_candidates(tiny_fp32):
    model, _ = _base("none")
    with pytest.raises(ConfigError, match="q_proj") as info:
        inject_deltas(model, DeltaConfig(target_modules=["qproj"]))
    assert "matches no linear layer" in str(info.value)
    inject_deltas(model, DeltaConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="already holds deltas"):
        inject_deltas(model, DeltaConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="unknown op"):
        DeltaConfig(controller="global", ops=["skip", "lora4"])


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize(
    "config",
    [
        DeltaConfig(delta="lora", rank=4),
        DeltaConfig(delta="tarp", rank=4),
        DeltaConfig(delta="tarp", rank=4, tarp_sigma_input="token", multiplicative=True),
    ],
    ids=["lora", "tarp-projected", "tarp-token-mult"],
)
def test_init_leaves_logits_unchanged(quant, config):
    model, _ = _base(quant)
    ids = _ids()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        inject_deltas(model, config)
        after = model(input_ids=ids).logits
    assert torch.equal(reference, after)


@pytest.mark.parametrize("quant", QUANTS)
def test_tarp_at_init_equals_lora_with_same_factors(quant):
    lora, _ = _base(quant)
    tarp, _ = _base(quant)
    inject_deltas(lora, DeltaConfig(delta="lora", rank=4))
    inject_deltas(tarp, DeltaConfig(delta="tarp", rank=4))
    _randomize(lora)
    with torch.no_grad():
        for name, p in delta_parameters(tarp).items():
            if "tarp_sigma" not in name:
                p.copy_(dict(lora.named_parameters())[name.replace(".tarp-4", ".lora-4")])
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(lora(input_ids=ids).logits, tarp(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("quant", QUANTS)
def test_gradients_flow_only_to_deltas_and_controller(quant):
    model, _ = _base(quant)
    config = DeltaConfig(controller="global", ops=["skip", "lora-2", "tarp-2"], multiplicative=True)
    inject_deltas(model, config)
    _randomize(model)
    controller = ArchController.for_model(model)
    weights = controller(tau=1.0, hard=True, generator=torch.Generator().manual_seed(0))
    ids = _ids()
    with controller.apply(model, weights):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    deltas = delta_parameters(model)
    for name, p in model.named_parameters():
        if name in deltas:
            continue
        assert p.grad is None, name
    chosen = {name: controller.ops[i] for name, i in zip(controller.candidates, weights.argmax(-1).tolist())}
    for name, p in deltas.items():
        layer, group, op = name.rsplit(".", 2)
        if group in ("lora_B", "mult"):  # B and m get gradients whenever the op is on
            assert p.grad is not None and p.grad.abs().sum() > 0 or chosen[layer] != op, name
    assert controller.logits.grad is not None and controller.logits.grad.abs().sum() > 0


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("controller", [False, True])
def test_task_batched_equals_looped(quant, controller):
    model, _ = _base(quant)
    if controller:
        config = DeltaConfig(controller="global", ops=["skip", "lora-2", "tarp-3"], tarp_sigma_input="token", multiplicative=True)
    else:
        config = DeltaConfig(delta="tarp", rank=3)
    inject_deltas(model, config)
    tasks, per_task = 3, 2
    params = delta_parameters(model)
    generator = torch.Generator().manual_seed(3)
    batched = {n: torch.randn((tasks, *p.shape), generator=generator) * 0.1 for n, p in params.items()}
    ids = _ids(tasks * per_task, 7)
    op_weights = None
    if controller:
        ctrl = ArchController.for_model(model)
        with torch.no_grad():
            ctrl.logits.normal_(generator=generator)
        op_weights = torch.stack([ctrl(tau=1.0, generator=generator) for _ in range(tasks)])  # [T, n_sub, n_ops]

    def forward(p, x, w):
        if w is None:
            return torch.func.functional_call(model, p, (x,)).logits
        with ctrl.apply(model, w):
            return torch.func.functional_call(model, p, (x,)).logits

    with torch.no_grad():
        together = forward(batched, ids, op_weights)
        looped = torch.cat(
            [
                forward({n: v[t] for n, v in batched.items()}, ids[t * per_task : (t + 1) * per_task], None if op_weights is None else op_weights[t])
                for t in range(tasks)
            ]
        )
    assert torch.allclose(together, looped, atol=1e-5), (together - looped).abs().max()
    # expand_for_tasks gives the same result as the shared parameters.
    with torch.no_grad():
        shared = forward(expand_for_tasks(params, tasks), ids, op_weights)
        plain = forward(dict(params), ids, None if op_weights is None else op_weights.repeat_interleave(per_task, 0))
    assert torch.allclose(shared, plain, atol=1e-5)


def test_delta_computed_in_input_dtype():
    model, _ = _base("none", compute_dtype="bfloat16")
    inject_deltas(model, DeltaConfig(delta="tarp", rank=4, target_modules=["q_proj", "down_proj"]))
    _randomize(model)
    assert all(p.dtype == torch.float32 for p in delta_parameters(model).values())
    out = model(input_ids=_ids()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_missing_op_weights_error_and_task_embedding():
    model, tokenizer = _base("none")
    inject_deltas(model, DeltaConfig(controller="global", ops=["skip", "lora-2"], target_modules=["q_proj"]))
    with pytest.raises(DeltametaError, match="no op weights"):
        model(input_ids=_ids())
    batch = tokenizer(["ab", "abcd"], return_tensors="pt", padding=True)
    emb = task_embedding(model, batch["input_ids"], batch["attention_mask"])
    table = model.get_input_embeddings().weight
    expected = table[tokenizer(["ab", "abcd"])["input_ids"][0] + tokenizer(["ab", "abcd"])["input_ids"][1]].mean(0)
    assert emb.shape == (64,) and torch.allclose(emb, expected, atol=1e-6)
