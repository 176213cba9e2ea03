"""The evaluation-time dequantize cache gives bitwise-identical results to the plain 4-bit layers."""

import pytest
import torch

from deltameta.base import load_base
from deltameta.dequantize_cache import cache_bytes, cache_enabled, dequantized_weights


@pytest.fixture(scope="module", params=["nf4", "fp4"])
def quantized(request):
    model, _ = load_base("tiny-random-llama", quantization=request.param, device="cpu", seed=1)
    return model


def _logits_and_grad(model):
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 9))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), embeds.grad


def test_bitwise_identical_logits_and_input_gradients(quantized):
    plain_logits, plain_grad = _logits_and_grad(quantized)
    with dequantized_weights(quantized) as held:
        assert held == cache_bytes(quantized) > 0
        cached_logits, cached_grad = _logits_and_grad(quantized)
    assert torch.equal(plain_logits, cached_logits)
    assert torch.equal(plain_grad, cached_grad)
    again, _ = _logits_and_grad(quantized)  # restored: the class's forward again
    assert torch.equal(plain_logits, again)
    assert not any("forward" in m.__dict__ for m in quantized.modules())


def test_cache_changes_what_runs(quantized):
    """Tampering with the cached weight changes the logits: the cache really is used (this test can fail)."""
    plain, _ = _logits_and_grad(quantized)
    with dequantized_weights(quantized):
        layer = next(m for m in quantized.modules() if "forward" in m.__dict__)
        cells = {type(c.cell_contents).__name__: c.cell_contents for c in layer.forward.__closure__}
        cells["Tensor"].mul_(2)
        tampered, _ = _logits_and_grad(quantized)
        cells["Tensor"].div_(2)
    assert not torch.equal(plain, tampered)


def test_disabled_and_unquantized_are_no_ops(quantized, tiny_fp32):
    with dequantized_weights(quantized, enabled=False) as held:
        assert held == 0
    with dequantized_weights(tiny_fp32[0]) as held:
        assert held == 0


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", True), ("auto", "cuda", False), ("true", "cuda", True), (True, "cpu", True),
    ("false", "cpu", False), (False, "cpu", False),
])
def test_cache_enabled(setting, device, expected):
    assert cache_enabled(setting, device) is expected


def test_evaluate_results_equal_with_and_without_cache(tmp_path):
    """fresh-lora on a tiny NF4 base: the same accuracies and bitwise the same losses, cache on vs off."""
    from deltameta.config import build_config
    from deltameta.evaluate import EvaluateConfig, run_evaluate

    results = {}
    for setting in ("true", "false"):
        config = build_config(EvaluateConfig, overrides=dict(
            model="tiny-random-llama", quantization="nf4", device="cpu", tasks="builtin", max_tasks=1, episodes=1,
            shots=3, query_size=3, steps=[0, 2], max_length=64, methods=["fresh-lora"], plots=False, progress=False,
            output_dir=str(tmp_path / setting), dequantize_cache=setting))
        results[setting] = run_evaluate(config)
    on, off = results["true"], results["false"]
    assert on["budget"]["dequantize_cache"]["enabled"] and on["budget"]["dequantize_cache"]["bytes"] > 0
    assert not off["budget"]["dequantize_cache"]["enabled"]
    for task, entry in on["tasks"].items():
        for key in ("accuracy", "accuracy_norm", "support_loss", "query_loss"):
            assert entry["methods"]["fresh-lora"][key] == off["tasks"][task]["methods"]["fresh-lora"][key]
