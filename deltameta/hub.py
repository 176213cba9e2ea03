"""The Hugging Face Hub: adapters named by Hub id, and uploading an export.

``adapter=org/name`` (and ``multitask_adapter=``) that is not a local path is downloaded with
``huggingface_hub.snapshot_download`` (only JSON, safetensors and text files: nothing pickled).
With ``HF_HUB_OFFLINE=1`` only the local Hugging Face cache is used. Every failure is one line
naming the id and, offline, ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from deltameta.errors import ConfigError, DeltametaError

logger = logging.getLogger(__name__)

#: ``org/name``: what a Hub model id looks like.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Files of an adapter repo that are downloaded (never pickled weights).
ADAPTER_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.png"]


def is_offline() -> bool:
    """Return whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read now."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_hub_id(text: str) -> bool:
    """Return whether ``text`` has the form of a Hub id (``org/name``) and is not an explicit path."""
    text = str(text).strip()
    return bool(HUB_ID.match(text)) and not text.startswith(("adapters/", "runs/", "./", "../"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def download_adapter(repo_id: str, what: str = "adapter", revision: str | None = None) -> Path:
    """Return a local folder with the adapter files of Hub repo ``repo_id`` (downloaded once, then cached).

    Args:
        repo_id: ``org/name``.
        what: The config key it came from (for messages).
        revision: Branch, tag or commit.

    Raises:
        ConfigError: offline and not cached, no such repo, or the Hub cannot be reached (one line).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = is_offline()
    if not offline:
        logger.info("%s: downloading %s from the Hugging Face Hub (once; then from the local cache)", what, repo_id)
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=ADAPTER_PATTERNS, local_files_only=offline)
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ConfigError(
            f"{what}='{repo_id}' is not a local path, and the Hub has no such model repo"
            f"{'' if revision is None else f' at revision {revision}'} (or it is private or gated: log in with "
            f"`hf auth login` or set HF_TOKEN) ({_first_line(error)})."
        ) from None
    except LocalEntryNotFoundError:
        if offline:
            raise ConfigError(
                f"{what}='{repo_id}' is not a local path and, as a Hub id, is not in the local Hugging Face cache; "
                "HF_HUB_OFFLINE is set, so it cannot be downloaded (unset HF_HUB_OFFLINE, or pass a local directory)."
            ) from None
        raise ConfigError(
            f"{what}='{repo_id}' is not a local path, and the Hugging Face Hub cannot be reached to download it "
            "(and it is not in the local cache); check the network, or pass a local directory."
        ) from None
    except Exception as error:  # noqa: BLE001 - network stacks raise many types; report one line
        raise ConfigError(f"{what}='{repo_id}': downloading it from the Hub failed ({_first_line(error)}).") from None
    return Path(folder)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Upload an exported adapter folder to the Hub model repo ``repo_id`` (created if needed).

    Args:
        folder: The export (``adapter_config.json``, ``adapter_model.safetensors``, card, sidecar).
        repo_id: ``org/name``.
        private: Create the repo private.
        commit_message: The commit message.

    Returns:
        The URL of the commit.

    Raises:
        ConfigError: a malformed id, or ``HF_HUB_OFFLINE`` is set.
        DeltametaError: the upload failed (not logged in, no network); one line.
    """
    check_can_push(repo_id)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message or "Upload deltameta adapter")
    except Exception as error:  # noqa: BLE001 - auth, network and HTTP errors: one line
        raise DeltametaError(
            f"--push-to-hub {repo_id}: the upload failed ({_first_line(error)}); log in with `hf auth login` "
            "(or set HF_TOKEN) and check the network. The export itself is complete on disk."
        ) from None
    return str(getattr(info, "commit_url", info))


def check_can_push(repo_id: str) -> None:
    """Fail early (before any work) when ``repo_id`` cannot be pushed to.

    Raises:
        ConfigError: ``repo_id`` is not of the form ``org/name``, or ``HF_HUB_OFFLINE`` is set.
    """
    if not HUB_ID.match(str(repo_id)):
        raise ConfigError(f"--push-to-hub {repo_id}: expected a Hub model id of the form 'org/name'.")
    if is_offline():
        raise ConfigError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push.")
