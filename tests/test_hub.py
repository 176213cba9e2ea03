"""Adapters by Hub id (offline: the local cache or one clear line) and export --push-to-hub."""

from __future__ import annotations

import pytest

from deltameta import hub
from deltameta.cli import main
from deltameta.errors import ConfigError, DeltametaError
from deltameta.finetune.adapters import resolve_adapter

REPO = "someorg/tiny-adapter"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test (nothing of the user's cache is read)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


def _cache_adapter(cache, tiny_fp32):
    """Put a real PEFT LoRA of tiny-random-llama into the cache as Hub repo REPO would be."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_fp32[0]), LoraConfig(r=2, target_modules=["q_proj"]))
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_offline_and_not_cached_is_one_line_naming_the_id(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as error:
        resolve_adapter(REPO, "multitask_adapter")
    message = str(error.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and f"multitask_adapter='{REPO}'" in message


def test_offline_uses_the_local_cache(hf_cache, monkeypatch, tiny_fp32):
    snapshot = _cache_adapter(hf_cache, tiny_fp32)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_adapter(REPO, "adapter")
    assert source.peft_dir == snapshot and source.base_model_name_or_path == "deltameta/tiny-random-llama"
    assert source.run_dir is None and not source.has_sidecar


def test_a_local_directory_wins_over_a_hub_id(hf_cache, monkeypatch, tiny_fp32):
    import shutil

    snapshot = _cache_adapter(hf_cache, tiny_fp32)
    shutil.copytree(snapshot, hf_cache.parent / REPO)  # ./someorg/tiny-adapter exists
    monkeypatch.setattr(hub, "download_adapter", lambda *a, **k: pytest.fail("must not go to the Hub"))
    assert resolve_adapter(REPO).peft_dir.resolve() == (hf_cache.parent / REPO).resolve()


def test_unreachable_hub_online_is_one_line(hf_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):
        assert kwargs["local_files_only"] is False and "*.safetensors" in kwargs["allow_patterns"]
        assert not any(p.endswith((".bin", ".pt", ".pkl")) for p in kwargs["allow_patterns"])
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ConfigError, match=r"adapter='someorg/tiny-adapter' is not a local path, and the Hugging Face Hub cannot be reached"):
        resolve_adapter(REPO, "adapter")


def test_cli_finetune_with_an_uncached_hub_id_offline_exits_2_before_loading(hf_cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["finetune", "model=tiny-random-llama", f"adapter={REPO}", f"output_dir={hf_cache.parent / 'ft'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "HF_HUB_OFFLINE" in err and REPO in err
    assert not (hf_cache.parent / "ft").exists()


@pytest.mark.parametrize("repo, message", [("me/adapter", "HF_HUB_OFFLINE is set"), ("not a repo", "org/name")])
def test_export_push_to_hub_fails_before_any_work(tmp_path, monkeypatch, capsys, repo, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "no-run"), "--out", str(out), "--push-to-hub", repo]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and not out.exists()


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["private"], kwargs["exist_ok"]))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"], kwargs["folder_path"]))
            return type("Info", (), {"commit_url": "https://huggingface.co/me/a/commit/1"})()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert hub.push_to_hub(tmp_path, "me/a", private=True) == "https://huggingface.co/me/a/commit/1"
    assert calls == [("create", "me/a", True, True), ("upload", "me/a", str(tmp_path))]

    class Failing(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("401 Unauthorized\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", Failing)
    with pytest.raises(DeltametaError, match=r"upload failed \(OSError: 401 Unauthorized\); log in") as error:
        hub.push_to_hub(tmp_path, "me/a")
    assert "\n" not in str(error.value)
