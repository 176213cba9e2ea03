"""Meta-state and PEFT export: round trip through plain PEFT (without deltameta), exact reload, errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltameta.base import build_tiny_random_llama, load_base
from deltameta.deltas import (
    ArchController,
    DeltaConfig,
    MetaStateError,
    build_from_meta_state,
    collect_sigma_means,
    delta_parameters,
    export_peft,
    inject_deltas,
    load_meta_adapter,
    load_meta_state,
    parse_op,
    save_meta_state,
    static_export,
)
from deltameta.errors import DataError, ModelLoadError

CASES = {
    # name: (quantization, delta config)
    "none-global": ("none", DeltaConfig(controller="global", ops=["skip", "lora-2", "lora-6", "tarp-4"])),
    "nf4-task-token-mult": (
        "nf4",
        DeltaConfig(controller="task", ops=["skip", "lora-4", "tarp-3"], tarp_sigma_input="token", multiplicative=True, controller_hidden=16),
    ),
    "none-tarp-stored-fold": ("none", DeltaConfig(delta="tarp", rank=4, target_modules=["q_proj", "v_proj", "down_proj"])),
}
TEXTS = ["Once upon a time", "2 + 2 = 4, and 3 + 3 = 6."]


def _make_run(run_dir, quant, config, seed=0):
    """Write RUN_DIR/final with randomised deltas (and controller) and return the model."""
    model, tokenizer = load_base("tiny-random-llama", quantization=quant, device="cpu")
    inject_deltas(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.15)
    controller = None
    fold_stats = None
    if config.controller != "none":
        controller = ArchController.for_model(model)
        with torch.no_grad():
            for p in controller.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
    else:
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
        sums = collect_sigma_means(model, batch["input_ids"], batch["attention_mask"])
        fold_stats = {layer: {op: total / count for op, (total, count) in ops.items()} for layer, ops in sums.items()}
    extra = {"recipe": {"inner_lr": 0.01}, "metrics": {"meta_test_accuracy": 0.42}, "task_distribution": "toy tasks"}
    save_meta_state(run_dir / "final", model, controller=controller, extra=extra, fold_stats=fold_stats)
    return model


def _examples_file(path):
    path.write_text("\n".join(json.dumps({"input": f"q{i}: what is {i}+1?", "output": str(i + 1)}) for i in range(3)) + "\n")
    return path


def _input_ids(tokenizer):
    return tokenizer(["The cat sat on the mat.", "Hello, world! 123"], return_tensors="pt", padding=True)


# A script that runs with `python -I` in a temporary cwd: it must not be able to import deltameta.
PEFT_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("deltameta") is None, "deltameta must not be importable here"
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import PeftModel
    jobs = json.load(open(sys.argv[1]))
    for job in jobs:
        kwargs = {"dtype": torch.float32}
        if job["quant"] != "none":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=job["quant"], bnb_4bit_compute_dtype=torch.float32)
            kwargs["device_map"] = {"": "cpu"}
        base = AutoModelForCausalLM.from_pretrained(job["base"], **kwargs)
        # deltameta's bases keep bitsandbytes from repacking 4-bit weights for its no-grad CPU
        # kernel (a slightly different kernel); do the same so both compute the same base.
        for module in base.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        model = PeftModel.from_pretrained(base, job["adapter"])
        model.eval()
        inputs = load_file(job["inputs"])
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        save_file({"logits": logits.contiguous()}, job["out"])
        ranks = {name.removeprefix("base_model.model."): module.r["default"]
                 for name, module in model.named_modules() if hasattr(module, "lora_A") and "default" in getattr(module, "r", {})}
        json.dump(ranks, open(job["out"] + ".ranks.json", "w"))
    print("ok", "deltameta" in sys.modules)
    """
)


def test_round_trip_through_plain_peft_and_load_meta_adapter(tmp_path):
    base_dir = tmp_path / "tiny-base"
    build_tiny_random_llama(seed=0)[0].save_pretrained(base_dir, safe_serialization=True)
    jobs, expected = [], {}
    for name, (quant, config) in CASES.items():
        run = tmp_path / name / "run"
        _make_run(run, quant, config)
        kwargs = {}
        if config.controller == "task":
            kwargs["task_examples"] = _examples_file(tmp_path / name / "task.jsonl")
        elif config.controller == "global":
            kwargs["fold_inputs"] = TEXTS
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = export_peft(run, tmp_path / name / "adapter", **kwargs)
        assert any("multiplicative" in str(w.message) for w in caught) == config.multiplicative
        assert bool(result.b_offsets) == config.multiplicative  # the least-squares fold projects the term on lora_B
        out = tmp_path / name / "adapter"
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
        adapter_cfg = json.loads((out / "adapter_config.json").read_text())
        assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["base_model_name_or_path"] == "deltameta/tiny-random-llama"
        kept = {n: op for n, op in result.decisions.items() if op != "skip"}
        assert set(adapter_cfg["target_modules"]) == set(kept)
        assert adapter_cfg["rank_pattern"] == {n: parse_op(op).rank for n, op in kept.items()}
        card = (out / "README.md").read_text()
        assert "deltameta/tiny-random-llama" in card and "0.42" in card and "toy tasks" in card and quant in card
        from huggingface_hub import ModelCard

        data = ModelCard(card).data
        assert data.library_name == "peft" and data.license == "apache-2.0"
        assert "base_model:adapter:deltameta/tiny-random-llama" in data.tags
        if config.controller == "none":
            assert result.fold_source.startswith("fold statistics stored")
            stored = load_meta_state(run).fold_stats
            for layer, ops in result.sigma_bars.items():
                assert torch.allclose(ops["tarp-4"], stored[layer]["tarp-4"])
        else:
            assert (out / "controller_decisions.png").is_file()
            assert "layer" in (out / "controller_decisions.txt").read_text()

        # deltameta's own static-export forward and dynamic forward
        model, tokenizer, controller = build_from_meta_state(load_meta_state(run))
        batch = _input_ids(tokenizer)
        with torch.no_grad():
            if controller is not None:
                weights = controller.decision_weights(list(result.decisions.values()))
                with controller.apply(model, weights):
                    dynamic = model(**batch).logits
                    with static_export(model, result.sigma_bars, result.b_offsets):
                        static = model(**batch).logits
            else:
                dynamic = model(**batch).logits
                with static_export(model, result.sigma_bars, result.b_offsets):
                    static = model(**batch).logits
        assert (dynamic - static).abs().max() > 1e-4  # the dynamic part is not trivial

        # exact reload with deltameta
        base, _ = load_base("tiny-random-llama", quantization=quant, device="cpu")
        reloaded = load_meta_adapter(base, out)
        with torch.no_grad():
            again = reloaded(**batch).logits
        assert (again - dynamic).abs().max() < 1e-5, name

        save_file({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, str(tmp_path / name / "inputs.safetensors"))
        jobs.append({"quant": quant, "base": str(base_dir), "adapter": str(out), "inputs": str(tmp_path / name / "inputs.safetensors"),
                     "out": str(tmp_path / name / "peft_logits.safetensors")})
        expected[name] = (static, {n: parse_op(op).rank for n, op in kept.items()})

    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([sys.executable, "-I", "-c", PEFT_SCRIPT, str(tmp_path / "jobs.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok False" in proc.stdout
    for name, (static, ranks) in expected.items():
        peft_logits = load_file(str(tmp_path / name / "peft_logits.safetensors"))["logits"]
        assert (peft_logits - static).abs().max() < 1e-5, (name, (peft_logits - static).abs().max())
        assert json.loads((tmp_path / name / "peft_logits.safetensors.ranks.json").read_text()) == ranks


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    _make_run(run, "none", DeltaConfig(controller="global", ops=["skip", "lora-2"], target_modules=["q_proj", "v_proj"]))
    return run


def test_task_controller_chooses_structure_from_examples(tmp_path):
    run = tmp_path / "run"
    _make_run(run, "none", DeltaConfig(controller="task", ops=["skip", "lora-2", "lora-4", "tarp-2"], controller_hidden=8), seed=3)
    a = export_peft(run, tmp_path / "a", task_examples=["aaaa aaaa aaaa", "aaa"])
    b = export_peft(run, tmp_path / "b", task_examples=["{}[]<>!?#~" * 3, "|||"])
    assert a.decisions != b.decisions
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {n for n, op in a.decisions.items() if op != "skip"}


def test_unfinished_run_dir_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(MetaStateError, match=r"has no finished state \(final/ missing\); is it still training\?"):
        export_peft(run, tmp_path / "out")
    with pytest.raises(MetaStateError, match="does not exist"):
        export_peft(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "lines, where, what",
    [
        (['{"input": "a", "output": "b"}', "not json"], ":2", "not valid JSON"),
        (['{"input": "a", "output": "b"}', "", '{"input": "a"}'], ":3", '"output"'),
        (['["input", "output"]'], ":1", "expected an object"),
    ],
)
def test_bad_task_examples_name_file_and_line(small_run, tmp_path, lines, where, what):
    path = tmp_path / "examples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        export_peft(small_run, tmp_path / "out", task_examples=path)
    assert f"{path}{where}" in str(info.value) and what in str(info.value)


def test_base_mismatch_names_both(small_run, tmp_path):
    export_peft(small_run, tmp_path / "adapter")
    base, _ = load_base("tiny-random-llama", quantization="none", device="cpu")
    base.deltameta_base = dataclasses.replace(base.deltameta_base, base_model_name_or_path="someorg/other-model")
    with pytest.raises(ModelLoadError, match="deltameta/tiny-random-llama.*someorg/other-model"):
        load_meta_adapter(base, tmp_path / "adapter")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    other.name_or_path = "someorg/small-llama"
    with pytest.raises(ModelLoadError, match="deltameta/tiny-random-llama.*someorg/small-llama.*expects 64"):
        load_meta_adapter(other, tmp_path / "adapter")


def test_cli_export(small_run, tmp_path, capsys):
    from deltameta.commands import export as export_command

    parser = argparse.ArgumentParser(prog="deltameta")
    export_command.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["export", "--help"])
    assert info.value.code == 0
    assert "--task-examples" in capsys.readouterr().out
    examples = _examples_file(tmp_path / "task.jsonl")
    args = parser.parse_args(["export", str(small_run), "--out", str(tmp_path / "adapter"), "--task-examples", str(examples)])
    assert args.func(args) == 0
    assert "exported" in capsys.readouterr().out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
