"""Every published meta-adapter under adapters/ has a card and loads with plain PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ADAPTERS = sorted(p for p in (Path(__file__).resolve().parent.parent / "adapters").iterdir() if p.is_dir())
CARD_SECTIONS = ("## Base model", "## Task distribution", "## Reproduce", "## Metrics")


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda p: p.name)
def test_adapter_has_card_and_peft_files(adapter):
    card = (adapter / "README.md").read_text()
    for section in CARD_SECTIONS:
        assert section in card, f"{adapter.name}/README.md lacks '{section}'"
    assert "deltameta meta-train" in card
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"]
    assert (adapter / "adapter_model.safetensors").is_file()
    baseline = adapter / "baseline-multitask"  # published beside its compute-matched baseline (adapters/README.md)
    assert (baseline / "adapter_config.json").is_file() and (baseline / "README.md").is_file()
    assert "deltameta evaluate" in card


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [a for a in ADAPTERS if "smollm2-135m" in a.name], ids=lambda p: p.name)
def test_smollm2_adapter_loads_with_plain_peft_and_deltameta(adapter):
    from peft import PeftModel

    from deltameta import load_base, load_meta_adapter

    base, tokenizer = load_base("smollm2-135m", quantization="none", device="cpu")
    batch = tokenizer(["Q: Is the sky blue?\nA:"], return_tensors="pt")
    with torch.no_grad():
        reference = base(**batch).logits
        static = PeftModel.from_pretrained(base, str(adapter))
        static_logits = static(**batch).logits
    assert torch.isfinite(static_logits).all()
    assert (static_logits - reference).abs().max() > 1e-3, "the adapter changes nothing"
    ranks = json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]
    loaded = {name: module.r["default"] for name, module in static.named_modules() if hasattr(module, "r") and "default" in getattr(module, "r", {})}
    for name, rank in ranks.items():
        assert any(key.endswith(name) and value == rank for key, value in loaded.items()), name

    fresh, _ = load_base("smollm2-135m", quantization="none", device="cpu")
    dynamic = load_meta_adapter(fresh, adapter)
    with torch.no_grad():
        dynamic_logits = dynamic(**batch).logits
    assert torch.isfinite(dynamic_logits).all()


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda p: p.name)
def test_learned_rates_cover_every_lora_tensor(adapter):
    """A Meta-SGD adapter is only itself with its learned rates: each PEFT LoRA tensor must get one."""
    from safetensors.torch import load_file

    from deltameta.deltas.inner_loop import load_rates, peft_rate_name, read_export_record

    record = read_export_record(adapter)
    if record is None or not record["inner_loop"].get("learned_rates"):
        pytest.skip(f"{adapter.name} has no learned inner rates")
    rates = load_rates(adapter / record["files"]["inner_lrs"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    covered = set()
    for name, rate in rates.items():
        layer, role = peft_rate_name(name, "default")
        key = f"base_model.model.{layer}.{role}.weight"
        assert key in weights, f"rate {name} matches no tensor of adapter_model.safetensors"
        assert torch.broadcast_shapes(rate.shape, weights[key].shape) == weights[key].shape
        assert bool((rate > 0).all()), f"rate {name} is not positive"
        covered.add(key)
    assert covered == set(weights), f"LoRA tensors without a learned rate: {sorted(set(weights) - covered)[:3]}"
