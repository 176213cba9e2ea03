"""Frozen base loading: aliases, quantization, the CPU repacking guard, and clear errors."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from deltameta import base
from deltameta.base import load_base
from deltameta.errors import ModelLoadError, QuantizationUnavailableError


@pytest.mark.parametrize("quantization", ["none", "nf4", "fp4"])
def test_tiny_model_is_frozen_and_runs(quantization):
    model, tokenizer = load_base("tiny-random-llama", quantization=quantization, device="cpu")
    assert all(not p.requires_grad for p in model.parameters())
    assert model.deltameta_base.quantization == quantization
    assert model.name_or_path == "deltameta/tiny-random-llama"
    batch = tokenizer(["hello world"], return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    if quantization != "none":
        import bitsandbytes as bnb

        linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(linears) == 14  # 7 projections x 2 layers
        assert all(m.support_avx512bf16_for_cpu is False for m in linears)


def test_tiny_model_is_deterministic_from_seed():
    first, _ = load_base("tiny-random-llama", quantization="none", seed=3)
    second, _ = load_base("tiny-random-llama", quantization="none", seed=3)
    other, _ = load_base("tiny-random-llama", quantization="none", seed=4)
    for (name, a), (_, b), (_, c) in zip(first.named_parameters(), second.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))


def test_tiny_tokenizer_round_trips_text_and_has_chat_template(tiny_tokenizer):
    text = "Caesar shift 3: abc -> def, ünïcode ✓"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def _dequantized_fp32_copy(model: torch.nn.Module) -> torch.nn.Module:
    """Return an fp32 copy of a 4-bit model whose linears hold the dequantized weights."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    reference, _ = load_base("tiny-random-llama", quantization="none", seed=model.deltameta_base.seed)
    quantized = dict(model.named_modules())
    for name, module in reference.named_modules():
        source = quantized.get(name)
        if isinstance(source, bnb.nn.Linear4bit):
            weight = bnbf.dequantize_4bit(source.weight.data, source.weight.quant_state).float()
            module.weight.data.copy_(weight.reshape(module.weight.shape))
    return reference


def _gradient_of_input_delta(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Gradient w.r.t. a trainable delta added to the input embeddings (an adapter stand-in)."""
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out + delta)
    try:
        model.train()
        logits = model(**batch).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch["input_ids"][0, 1:])
        (grad,) = torch.autograd.grad(loss, delta)
    finally:
        handle.remove()
        model.eval()
    return grad


def _eval_forward_without_grad(model, batch) -> None:
    model.eval()
    with torch.no_grad():
        model(**batch)


def test_gradients_survive_an_eval_no_grad_forward_on_4bit_cpu(tiny_tokenizer):
    """Regression: bitsandbytes' AVX512-BF16 CPU repacking silently drops gradients."""
    model, _ = load_base("tiny-random-llama", quantization="nf4", device="cpu", seed=1)
    batch = tiny_tokenizer(["the quick brown fox jumps over the lazy dog"], return_tensors="pt")
    _eval_forward_without_grad(model, batch)  # the forward that triggers repacking when unguarded
    reference = _dequantized_fp32_copy(model)
    expected = _gradient_of_input_delta(reference, batch)
    actual = _gradient_of_input_delta(model, batch)
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_the_regression_test_detects_an_unguarded_model(tiny_tokenizer):
    """Without the guard the same comparison fails on CPUs that have AVX512-BF16."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes never repacks")
    import bitsandbytes as bnb

    model, _ = load_base("tiny-random-llama", quantization="nf4", device="cpu", seed=1)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True  # remove the guard
    batch = tiny_tokenizer(["the quick brown fox jumps over the lazy dog"], return_tensors="pt")
    reference = _dequantized_fp32_copy(model)
    _eval_forward_without_grad(model, batch)
    expected = _gradient_of_input_delta(reference, batch)
    actual = _gradient_of_input_delta(model, batch)
    assert not torch.allclose(actual, expected, rtol=1e-4, atol=1e-6)
    # a model that was already repacked is refused rather than half-repaired
    with pytest.raises(ModelLoadError, match="already repacked.*Reload"):
        base.disable_cpu_inference_repacking(model)


# ------------------------------------------------------------------------------------------ errors


def test_unknown_alias_names_the_aliases():
    with pytest.raises(ModelLoadError, match="unknown model 'smollm3'.*smollm2-135m"):
        load_base("smollm3", quantization="none")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base(str(tmp_path / "nope"), quantization="none")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        load_base(str(tmp_path), quantization="none")


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*safetensors"):
        load_base(str(tmp_path), quantization="none")


def test_unknown_quantization():
    with pytest.raises(ModelLoadError, match="unknown quantization 'int3'.*nf4, fp4, none"):
        load_base("tiny-random-llama", quantization="int3")


def test_missing_bitsandbytes_is_a_clear_error_not_a_fallback(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(QuantizationUnavailableError, match="pip install.*quantization='none'"):
        load_base("tiny-random-llama", quantization="nf4")


def test_bitsandbytes_that_cannot_run_is_a_clear_error(monkeypatch):
    import bitsandbytes.functional as bnbf

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnbf, "quantize_4bit", broken)
    with pytest.raises(QuantizationUnavailableError, match="cannot run 4-bit.*no kernel for this device"):
        load_base("tiny-random-llama", quantization="nf4")


def test_local_directory_loads(tmp_path, tiny_fp32):
    model, tokenizer = tiny_fp32
    copy.deepcopy(model).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_base(str(tmp_path), quantization="none")
    assert loaded.deltameta_base.base_model_name_or_path == str(tmp_path.resolve())
    from deltameta.weights import sha256_file

    files = loaded.deltameta_base.weights["files"]
    assert files == [{"name": p.name, "sha256": sha256_file(p)} for p in sorted(tmp_path.glob("*.safetensors"))] != []
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_smollm2_nf4_answers_paris_and_prepare_is_cached(tmp_path, monkeypatch):
    from deltameta.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the embedded default needs no hub at all

    assert main(["models", "prepare", "smollm2-135m"]) == 0
    nf4_dir = base.prepared_dir("smollm2-135m", "nf4")
    stamp = (nf4_dir / "model.safetensors").stat().st_mtime_ns
    assert main(["models", "prepare", "smollm2-135m"]) == 0  # second call: a no-op
    assert (nf4_dir / "model.safetensors").stat().st_mtime_ns == stamp

    model, tokenizer = load_base("smollm2-135m", quantization="nf4", device="cpu")
    assert model.deltameta_base.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    alias = base.ALIASES["smollm2-135m"]
    assert model.deltameta_base.weights["files"] == [{"name": alias.gguf_file, "sha256": alias.gguf_sha256}]
    assert sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit") == 30 * 7
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :])
    assert "Paris" in answer


@pytest.mark.slow
def test_cached_4bit_checkpoint_honours_the_compute_dtype():
    """The cached NF4 checkpoint stores fp32 compute; the caller's compute_dtype must win."""
    import bitsandbytes as bnb

    model, _ = load_base("smollm2-135m", quantization="nf4", device="cpu", compute_dtype="bfloat16")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == torch.bfloat16 for m in layers)
    assert model.deltameta_base.compute_dtype == "bfloat16"
