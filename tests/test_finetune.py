"""``deltameta finetune``: a loadable PEFT adapter that lowers the training loss; clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from deltameta.config import build_config
from deltameta.errors import ConfigError, DataError, MetaStateError, ModelLoadError
from deltameta.finetune import FinetuneConfig, resolve_adapter, run_finetune
from test_finetune_helpers import TINY, copy_adapter_for_other_base


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path, **overrides):
    values = dict(TINY, tasks="builtin:linear", builtin_examples_per_task=32, steps=12, lr=0.01, eval_every=4,
                  batch_size=4, warmup_steps=2, output_dir=str(tmp_path / "ft"))
    values.update(overrides)
    return build_config(FinetuneConfig, overrides=values)


def _plain_peft_logits(adapter_dir, ids):
    """Load the adapter with nothing but transformers + PEFT on a fresh base."""
    from peft import PeftModel

    from deltameta.base import build_tiny_random_llama

    base, _ = build_tiny_random_llama(0)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fresh_lora_finetune_writes_loadable_adapters_and_lowers_loss(tmp_path):
    result = run_finetune(_config(tmp_path, plots=True))
    out = tmp_path / "ft"
    assert result.steps == 12
    assert result.train_loss_after < result.train_loss_before - 0.05
    assert result.adapter_dir == out / "best" and result.best_val_loss is not None
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["adapter"] == str(out / "best")
    assert run["base"]["name"] == "tiny-random-llama" and "origin" in run["base"]["weights"]
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "best" / "README.md").data
    assert card.library_name == "peft" and "base_model:adapter:deltameta/tiny-random-llama" in card.tags
    losses = {r.metric_name: r.metric_value for r in card.eval_results}
    assert losses["validation loss"] == pytest.approx(result.best_val_loss)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in rows if r["kind"] == "validation"] == [0, 4, 8, 12]
    assert all("val_accuracy" in r for r in rows if r["kind"] == "validation")
    assert (out / "plots" / "loss.png").is_file() and (out / "config.yaml").is_file()
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    from deltameta.base import build_tiny_random_llama

    base, _ = build_tiny_random_llama(0)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    for name in ("last", "best"):
        assert (out / name / "adapter_model.safetensors").is_file()
        tuned = _plain_peft_logits(out / name, ids)
        assert not torch.allclose(tuned, plain), f"{name}: the adapter changes nothing"


def test_finetune_from_meta_adapter_on_nf4_base_with_jsonl_task(tmp_path, meta_adapter_runs):
    data = tmp_path / "my_task.jsonl"
    lines = [json.dumps({"input": f"{i} + {i}", "output": str(2 * i)}) for i in range(24)]
    data.write_text("\n".join(lines) + "\n")
    result = run_finetune(_config(tmp_path, quantization="nf4", adapter=str(meta_adapter_runs["meta"]), dynamic=True,
                                  tasks=str(data), steps=8, eval_accuracy=False, gradient_checkpointing=True))
    assert result.train_loss_after < result.train_loss_before
    last = tmp_path / "ft" / "last"
    assert (last / "deltameta_tarp.safetensors").is_file(), "dynamic=true keeps the TARP sidecar"
    config = json.loads((last / "adapter_config.json").read_text())
    start = json.loads((meta_adapter_runs["meta"] / "peft" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(start["target_modules"])
    assert config["rank_pattern"] == start["rank_pattern"]
    _plain_peft_logits(last, torch.tensor([[5, 6, 7]]))
    run = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert run["adapter_source"]["preparation"]["forward_backward_passes"] == 12


def test_early_stopping_and_output_dir_protection(tmp_path):
    result = run_finetune(_config(tmp_path, lr=1e-6, steps=20, eval_every=2, early_stopping_patience=2,
                                  early_stopping_min_delta=10.0, eval_accuracy=False, plots=False))
    assert result.stopped_early and result.steps == 4
    with pytest.raises(ConfigError, match="already holds a finetune run; pass --overwrite"):
        run_finetune(_config(tmp_path, steps=1))
    assert run_finetune(_config(tmp_path, steps=1, val_fraction=0.0, plots=False), overwrite=True).steps == 1
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no finetune run"):
        run_finetune(_config(tmp_path, output_dir=str(other)), overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_bad_input_errors(tmp_path, meta_adapter_runs):
    with pytest.raises(ConfigError, match="does not exist"):
        run_finetune(_config(tmp_path, adapter=str(tmp_path / "nope")))
    assert not (tmp_path / "ft").exists(), "a failed setup leaves no half-made run"
    other = copy_adapter_for_other_base(meta_adapter_runs["meta"] / "peft", tmp_path / "other")
    with pytest.raises(ModelLoadError, match="SmolLM2-135M-Instruct.*deltameta/tiny-random-llama"):
        run_finetune(_config(tmp_path, adapter=str(other)))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("model: tiny-random-llama\n")
    with pytest.raises(MetaStateError, match="no finished state"):
        resolve_adapter(str(unfinished))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "a", "output": "b"}\n{"input": "a",\n')
    with pytest.raises(DataError, match="line 2"):
        run_finetune(_config(tmp_path, tasks=str(broken)))
    with pytest.raises(ConfigError, match="shots=500"):
        run_finetune(_config(tmp_path, shots=500))
    with pytest.raises(ConfigError, match="Did you mean 'lr'"):
        _config(tmp_path, lrr=0.1)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from deltameta.cli import main

    code = main(["finetune", "model=tiny-random-llama", "quantization=none", f"adapter={tmp_path / 'missing'}",
                 f"output_dir={tmp_path / 'ft'}"])
    err = capsys.readouterr().err
    assert code == 2 and "deltameta finetune: error:" in err and "does not exist" in err and "Traceback" not in err
    code = main(["finetune", "--overwrite", *[f"{k}={v}" for k, v in TINY.items()], "steps=2", "eval_every=0",
                 "builtin_examples_per_task=16", f"output_dir={tmp_path / 'ft'}"])
    out = capsys.readouterr().out
    assert code == 0 and "PEFT adapter:" in out
