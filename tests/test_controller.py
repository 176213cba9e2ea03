"""The TAMS-style architecture controller: Gumbel straight-through, budget, schedule, reports."""

from __future__ import annotations

import pytest
import torch

from deltameta.base import load_base
from deltameta.deltas import ArchController, DeltaConfig, delta_layers, inject_deltas, op_cost, task_embedding, temperature
from deltameta.errors import DeltametaError

OPS = ["skip", "lora-2", "lora-8", "tarp-4"]


def _model(quant: str = "none", mode: str = "global"):
    model, tokenizer = load_base("tiny-random-llama", quantization=quant, device="cpu")
    inject_deltas(model, DeltaConfig(controller=mode, ops=OPS))
    return model, tokenizer, ArchController.for_model(model)


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("mode", ["global", "task"])
def test_gumbel_straight_through_one_hot_forward_and_gradients(quant, mode):
    model, tokenizer, controller = _model(quant, mode)
    emb = None
    if mode == "task":
        batch = tokenizer(["translate: cat", "translate: dog"], return_tensors="pt", padding=True)
        emb = task_embedding(model, batch["input_ids"], batch["attention_mask"])
    weights = controller(emb, tau=0.7, hard=True, generator=torch.Generator().manual_seed(0))
    assert weights.shape == (14, len(OPS))
    assert torch.equal(weights.detach(), torch.nn.functional.one_hot(weights.argmax(-1), len(OPS)).float())
    target = torch.randn(weights.shape, generator=torch.Generator().manual_seed(1))
    (weights * target).sum().backward()
    grads = [controller.logits.grad] if mode == "global" else [p.grad for p in controller.mlp.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # same generator seed, same sample
    again = controller(emb, tau=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weights.detach(), again.detach())
    soft = controller(emb, tau=0.7, hard=False)
    assert torch.allclose(soft.sum(-1), torch.ones(14))


def test_budget_term_moves_expected_params_toward_target():
    _, _, controller = _model()
    target = 0.2 * controller.max_params()
    start = controller.expected_params().item()
    optimizer = torch.optim.Adam(controller.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        controller.budget_loss(target).backward()
        optimizer.step()
    end = controller.expected_params().item()
    assert abs(end - target) < 0.5 * abs(start - target)
    # and upward towards a large budget
    target = 0.95 * controller.max_params()
    start = controller.expected_params().item()
    for _ in range(20):
        optimizer.zero_grad()
        controller.budget_loss(target).backward()
        optimizer.step()
    assert abs(controller.expected_params().item() - target) < abs(start - target)


def test_costs_entropy_and_schedule():
    model, _, controller = _model()
    q = delta_layers(model)["model.layers.0.self_attn.q_proj"]
    assert op_cost("lora-8", 64, 64) == 8 * 128
    assert op_cost("tarp-4", 64, 32) == 4 * 96 + 16 * 4
    assert op_cost("tarp-4", 64, 32, sigma_input="token", multiplicative=True) == 4 * 96 + 16 * 64 + 32
    assert controller.costs[0].tolist() == [op_cost(op, q.in_features, q.out_features) for op in OPS]
    assert controller.entropy().item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-5)
    assert temperature(0, 100, 5.0, 0.5) == pytest.approx(5.0)
    assert temperature(99, 100, 5.0, 0.5) == pytest.approx(0.5)
    assert temperature(50, 101, 4.0, 1.0) == pytest.approx(2.0)
    assert temperature(50, 101, 4.0, 1.0, "linear") == pytest.approx(2.5)


def test_apply_sets_and_restores_op_weights_and_batches(tmp_path):
    model, _, controller = _model()
    weights = controller(tau=1.0, generator=torch.Generator().manual_seed(0))
    layers = delta_layers(model)
    with controller.apply(model, weights):
        assert torch.equal(layers["model.layers.1.mlp.up_proj"].op_weights, weights[controller.candidates.index("model.layers.1.mlp.up_proj")])
        model(input_ids=torch.randint(0, 256, (2, 5)))
    assert all(layer.op_weights is None for layer in layers.values())
    with pytest.raises(DeltametaError, match="do not fit"):
        with controller.apply(model, weights[:, :2]):
            pass


def test_decisions_table_and_heatmap(tmp_path):
    _, _, controller = _model()
    with torch.no_grad():
        controller.logits[:, 2] = 3.0
        controller.logits[0, 0] = 5.0
    decisions = controller.decide()
    assert decisions[0] == "skip" and set(decisions[1:]) == {"lora-8"}
    table = controller.decision_table(decisions, controller.probs())
    assert "q_proj" in table and "lora-8" in table and "layer" in table.splitlines()[0]
    png = controller.decision_heatmap(tmp_path / "decisions.png", decisions, controller.probs())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.equal(controller.decision_weights(decisions).argmax(-1), controller.get_logits().argmax(-1))
