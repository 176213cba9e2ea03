"""Issue 13, cases 6, 8 and 10: damaged files and rough edges get one clear line; durable writes."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from deltameta import atomic
from deltameta.cli import main
from deltameta.errors import ModelLoadError
from meta_helpers import tiny_config

TINY = ["model=tiny-random-llama", "quantization=none", "progress=false", "plots=false"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from deltameta.meta.trainer import run_meta_train

    config = tiny_config(tmp_path_factory.mktemp("files"), controller="none", ops=["lora-2"], outer_steps=2, export=True)
    return run_meta_train(config).run_dir


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


# ---------------------------------------------------------------------------------------------- case 6


@pytest.mark.parametrize("damage", ["truncate", "missing"])
def test_damaged_final_deltas_fail_export_in_one_line(finished_run, tmp_path, damage, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    file = run / "final" / "deltas.safetensors"
    file.unlink() if damage == "missing" else file.write_bytes(file.read_bytes()[:100])
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "deltas.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
@pytest.mark.parametrize("damage", ["truncate", "missing", "header"])
def test_damaged_adapter_weights_fail_in_one_line(finished_run, tmp_path, command, damage, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run / "peft", adapter)
    file = adapter / "adapter_model.safetensors"
    data = file.read_bytes()
    if damage == "missing":
        file.unlink()
    elif damage == "truncate":
        file.write_bytes(data[: len(data) - 50])
    else:
        file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    extra = ["tasks=builtin:linear", "steps=1"] if command == "finetune" else \
        ["tasks=builtin:linear", "splits=", "split=", "episodes=1"]
    assert main([command, *TINY, *extra, f"adapter={adapter}", f"output_dir={tmp_path / 'out'}"]) == 2
    _one_line_error(capsys, "adapter_model.safetensors", "adapter=")


def test_check_safetensors_accepts_a_complete_file(finished_run):
    from deltameta.integrity import check_safetensors

    assert check_safetensors(finished_run / "peft" / "adapter_model.safetensors")


# ---------------------------------------------------------------------------------------------- case 8


def test_checkpoints_and_states_are_synced_file_and_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    from deltameta.meta import checkpoint as ckpt

    target = ckpt.save_checkpoint(tmp_path, 3, {"x": torch.ones(2)}, keep=2)
    names = [os.path.basename(p) for p in synced]
    assert ckpt.STATE_FILE in names, synced
    assert any(p.endswith(".tmp") and "step-000003" in p for p in synced), "the new folder before the rename"
    assert str(target.parent) in synced, "the parent folder after the rename"


def test_replacing_a_directory_keeps_the_path_existing(tmp_path, monkeypatch):
    target = tmp_path / "peft"
    with atomic.atomic_directory(target) as tmp:
        (tmp / "a").write_text("old")
    seen = []
    real_replace = os.replace

    def watch(src, dst, *args, **kwargs):
        seen.append(target.exists())
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "replace", watch)
    with atomic.atomic_directory(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new"
    assert seen == [], "one atomic exchange, not two renames with a gap"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_stale_temporary_folders_are_cleaned_when_a_run_resumes(tmp_path):
    from deltameta.meta.run_dir import prepare_run_dir

    run = tmp_path / "run"
    (run / "checkpoints" / ".step-000004.k2j3.tmp").mkdir(parents=True)
    (run / ".peft.x8a.tmp").mkdir()
    (run / ".run.json.abc.tmp").write_text("{")
    (run / ".best.old.123").mkdir()  # a kill between the fallback's two renames: best/ is missing
    (run / ".best.old.123" / "deltas.safetensors").write_text("x")
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "keep.tmp").write_text("not ours")
    prepare_run_dir(run, resume=True)
    assert sorted(p.name for p in run.iterdir()) == ["best", "checkpoints", "config.yaml", "keep.tmp"]
    assert list((run / "checkpoints").iterdir()) == []
    assert (run / "best" / "deltas.safetensors").read_text() == "x"


def test_metrics_rows_are_synced_as_they_are_appended(tmp_path, monkeypatch):
    from deltameta.meta.run_dir import MetricsLog

    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    log = MetricsLog(tmp_path)
    log.log({"kind": "train", "step": 1, "loss": float("nan"), "lr": float("inf")})
    assert calls
    assert (tmp_path / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1, "loss": null, "lr": "inf"}\n'


# ---------------------------------------------------------------------------------------------- case 10


def test_a_very_long_task_source_is_one_clear_line(tmp_path, capsys):
    assert main(["meta-train", *TINY, "tasks=" + "x" * 5000, f"output_dir={tmp_path / 'r'}"]) == 2
    err = _one_line_error(capsys, "cannot be read as a path", "5000 characters")
    assert len(err) < 400
    assert not (tmp_path / "r").exists()


TRANSFORMERS_OFFLINE = (
    "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.\n"
    "Check your internet connection or see how to run the library in offline mode at "
    "'https://huggingface.co/docs/transformers/installation#offline-mode'."
)


def test_an_unreachable_hub_model_is_one_line_with_what_to_do(monkeypatch):
    import transformers

    from deltameta.base import load_base

    def offline(*args, **kwargs):
        raise OSError(TRANSFORMERS_OFFLINE)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError) as info:
        load_base("someorg/somemodel", quantization="none", device="cpu")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "someorg/somemodel" in message and "hf download" in message


def test_a_failed_quantization_child_is_one_line(monkeypatch, tmp_path):
    import deltameta.base as base

    stderr = "\n".join(["Traceback (most recent call last):"] + [f'  File "x.py", line {i}, in f' for i in range(38)]
                       + ["OSError: " + TRANSFORMERS_OFFLINE.replace("\n", " ")])
    monkeypatch.setattr(base, "check_4bit_available", lambda device: None)
    monkeypatch.setattr(base.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, stdout="", stderr=stderr))
    with pytest.raises(ModelLoadError) as info:
        base._quantize_in_child("someorg/somemodel", "someorg/somemodel", tmp_path / "q", "nf4", False, None, "x")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "Traceback" not in message and "couldn't connect" in message
    assert "hf download" in message


def test_an_adapter_with_wrong_shapes_does_not_blame_the_base_name(finished_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from deltameta.base import load_base
    from deltameta.deltas.export import check_adapter_fits

    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run / "peft", adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights = {k: torch.zeros(v.shape[0] + 3, v.shape[1]) if "lora_B" in k else v for k, v in weights.items()}
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    base, _ = load_base("tiny-random-llama", quantization="none", device="cpu")
    with pytest.raises(ModelLoadError) as info:
        check_adapter_fits(base, adapter)
    message = str(info.value)
    assert "does not match deltameta/tiny-random-llama" not in message
    assert "although both name it" in message and "re-export" in message


def test_controller_noise_is_drawn_on_the_generator_device(monkeypatch):
    """A CPU generator with logits elsewhere (CUDA in practice; 'meta' here) must not mix devices."""
    from deltameta.deltas import controller as ctl

    real_rand = torch.rand

    def strict_rand(*args, generator=None, device=None, **kwargs):
        if generator is not None and torch.device(device or "cpu").type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return real_rand(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(ctl.torch, "rand", strict_rand)
    logits = torch.zeros(3, 4, device="meta")
    sample = ctl.gumbel_softmax(logits, generator=torch.Generator().manual_seed(0))
    assert sample.device.type == "meta" and sample.shape == (3, 4)
    # on CPU the seeded noise is unchanged (bit-identical to drawing it directly)
    cpu = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    a = ctl.gumbel_softmax(cpu, tau=0.7, hard=False, generator=torch.Generator().manual_seed(5))
    uniform = real_rand(cpu.shape, generator=torch.Generator().manual_seed(5), dtype=cpu.dtype)
    gumbels = -torch.log((-torch.log(uniform.clamp_min(1e-10))).clamp_min(1e-10))
    assert torch.equal(a, torch.softmax((cpu + gumbels) / 0.7, dim=-1))
