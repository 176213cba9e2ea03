"""Finding adapters: deltameta run dirs, meta-states, exported PEFT dirs and ``adapters/<name>``.

:func:`resolve_adapter` turns what a user typed into an :class:`AdapterSource`: the PEFT directory
to load, whether it carries TARP's dynamic sidecar, which base model it was made for, and the
compute spent preparing it (read from the producing run's config and ``metrics.jsonl``), so
evaluations can report budget parity.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from deltameta.errors import ConfigError, MetaStateError, ModelLoadError
from deltameta.hub import download_adapter, looks_like_hub_id
from deltameta.integrity import check_safetensors
from deltameta.meta.config import MetaTrainConfig

logger = logging.getLogger(__name__)

#: Files of the TARP sidecar written by :func:`deltameta.deltas.export_peft`.
SIDECAR_FILES = ("deltameta_tarp.safetensors", "deltameta_tarp.json")


@dataclasses.dataclass
class AdapterSource:
    """A resolved adapter.

    Attributes:
        given: What the user passed.
        peft_dir: Directory with ``adapter_config.json`` + ``adapter_model.safetensors`` (``None``
            until a meta-state without export is exported; see :func:`ensure_peft_dir`).
        run_dir: The meta-training run it came from, if known.
        meta_state: Its meta-state directory (``RUN_DIR/final``, or the ``best/`` or checkpoint state
            given), if known.
        base_model_name_or_path: The base the adapter was made for.
        has_sidecar: Whether the export carries TARP's dynamic part.
        algorithm: The meta-train algorithm (``fomaml``, ``multitask``, ...), if known.
        preparation: Compute spent preparing it (see :func:`read_preparation`).
    """

    given: str
    peft_dir: Path | None
    run_dir: Path | None
    meta_state: Path | None
    base_model_name_or_path: str | None
    has_sidecar: bool
    algorithm: str | None
    preparation: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        data = dataclasses.asdict(self)
        for key in ("peft_dir", "run_dir", "meta_state"):
            data[key] = str(data[key]) if data[key] is not None else None
        return data


def _repo_adapters_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "adapters"


def _candidates(given: str) -> list[Path]:
    path = Path(given).expanduser()
    out = [path]
    if len(path.parts) == 1:
        out += [Path("adapters") / given, _repo_adapters_dir() / given]
    elif path.parts[0] == "adapters" and len(path.parts) == 2:
        out.append(_repo_adapters_dir() / path.parts[1])
    return out


def _is_peft_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _read_config_file(run_dir: Path) -> dict[str, Any]:
    file = run_dir / "config.yaml"
    if file.is_file():
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except yaml.YAMLError:
            return {}
    return {}


def read_preparation(run_dir: Path | None, meta_state: Path | None) -> dict[str, Any]:
    """Return the compute a meta-training run spent on its adapter.

    Every algorithm (the ``multitask`` baseline included) runs ``inner_steps + 1`` forward/backward
    passes per task (the support passes plus one query pass), ``meta_batch_size`` tasks per outer
    step, except ``reptile`` without a controller: its query pass is a forward only (the loss is
    logged, nothing is back-propagated), counted in ``forward_passes``. Tokens are summed from the
    run's ``metrics.jsonl`` when present, up to the meta-state's step (a ``best/`` state of a longer
    run counts the steps it saw).

    Args:
        run_dir: The run directory (``config.yaml``, ``metrics.jsonl``), or ``None``.
        meta_state: The meta-state directory (``meta_state.json`` holds the config too), or ``None``.

    Returns:
        ``algorithm``, ``outer_steps``, ``meta_batch_size``, ``inner_steps``, ``shots``,
        ``query_size``, ``forward_backward_passes``, ``forward_passes`` (forward-only passes),
        ``tokens`` (any may be ``None`` when unknown) and ``source``.
    """
    config: dict[str, Any] = {}
    steps_done = None
    if meta_state is not None and (meta_state / "meta_state.json").is_file():
        try:
            extra = json.loads((meta_state / "meta_state.json").read_text(encoding="utf-8"))
            config = extra.get("config") or extra.get("recipe") or {}
            steps_done = extra.get("step")
        except (json.JSONDecodeError, AttributeError):
            config = {}
    if not config and run_dir is not None:
        config = _read_config_file(run_dir)
    info: dict[str, Any] = {key: config.get(key) for key in
                            ("algorithm", "outer_steps", "meta_batch_size", "inner_steps", "shots", "query_size")}
    outer = steps_done if isinstance(steps_done, int) else info["outer_steps"]
    info["outer_steps"] = outer
    passes = forwards = None
    if all(isinstance(info[k], int) for k in ("outer_steps", "meta_batch_size", "inner_steps")):
        tasks = info["outer_steps"] * info["meta_batch_size"]
        # a config without the key ran the meta-train default controller
        controller = config.get("controller", MetaTrainConfig.controller)
        query_forward_only = info["algorithm"] == "reptile" and controller == "none"
        passes = tasks * (info["inner_steps"] + (0 if query_forward_only else 1))
        forwards = tasks if query_forward_only else 0
    info["forward_backward_passes"] = passes
    info["forward_passes"] = forwards
    tokens = None
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        total = 0
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("kind") != "train" or not isinstance(row.get("tokens"), (int, float)):
                continue
            if isinstance(steps_done, int) and isinstance(row.get("step"), int) and row["step"] > steps_done:
                continue  # a best/ state of a longer run: its own steps only
            total += int(row["tokens"])
        tokens = total or None
    info["tokens"] = tokens
    info["source"] = str(run_dir or meta_state) if (run_dir or meta_state) else None
    return info


def _base_of_peft(peft_dir: Path) -> str | None:
    try:
        data = json.loads((peft_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{peft_dir / 'adapter_config.json'} is not valid JSON: {error}") from error
    return data.get("base_model_name_or_path")


def _available_adapters() -> list[str]:
    names: set[str] = set()
    for root in (Path("adapters"), _repo_adapters_dir()):
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if p.is_dir())
    return sorted(names)


def resolve_adapter(given: str, what: str = "adapter") -> AdapterSource:
    """Find the adapter a user named.

    Accepted forms: a meta-training run directory (its ``peft/`` export, else its ``final/``
    meta-state), a meta-state directory, an exported PEFT adapter directory (of a deltameta run or
    any PEFT LoRA), a published adapter name (``adapters/<name>`` or just ``<name>``), or a Hugging
    Face Hub id (``org/name`` that is no local path: downloaded once with ``huggingface_hub``; with
    ``HF_HUB_OFFLINE=1`` only the local cache is used).

    Args:
        given: The path or name.
        what: The config key it came from (for messages).

    Returns:
        The :class:`AdapterSource`. A run or meta-state without export has ``peft_dir=None``.

    Raises:
        ConfigError: nothing exists there (the published adapters are listed, closest first), or a
            Hub id cannot be downloaded (offline: the message names HF_HUB_OFFLINE).
        MetaStateError: a run directory without a finished meta-state (still training?).
        ModelLoadError: a directory that is none of the accepted forms.
    """
    if not given or not str(given).strip():
        raise ConfigError(f"{what} is empty; give a run directory, a PEFT adapter directory or adapters/<name>.")
    path = next((p for p in _candidates(str(given)) if p.exists()), None)
    if path is None and looks_like_hub_id(str(given)):
        path = download_adapter(str(given).strip(), what)
    if path is None:
        names = _available_adapters()
        close = difflib.get_close_matches(Path(str(given)).name, names, n=3)
        hint = f" Did you mean {', '.join('adapters/' + c for c in close)}?" if close else ""
        listing = f" Published adapters: {', '.join(names)}." if names else ""
        raise ConfigError(
            f"{what}='{given}' does not exist: expected a meta-train run directory, an exported PEFT adapter "
            f"directory, or adapters/<name>.{hint}{listing}"
        )
    if not path.is_dir():
        raise ModelLoadError(f"{what}='{given}' is a file; pass the adapter's directory (holding adapter_config.json).")
    run_dir = meta_state = None
    if _is_peft_dir(path):
        peft_dir = path
        parent = path.parent
        if (parent / "final" / "delta_config.json").is_file() or (parent / "config.yaml").is_file():
            run_dir = parent
            meta_state = parent / "final" if (parent / "final" / "delta_config.json").is_file() else None
    elif (path / "delta_config.json").is_file():
        peft_dir, meta_state = None, path
        if (path.parent / "config.yaml").is_file():
            run_dir = path.parent
    else:
        from deltameta.deltas.state import resolve_meta_state_dir

        if not any((path / marker).exists() for marker in ("config.yaml", "run.json", "final", "peft", "checkpoints")):
            raise ModelLoadError(
                f"{what}='{given}' holds neither adapter_config.json (a PEFT adapter), delta_config.json (a "
                "meta-state), nor a meta-train run (config.yaml, final/)."
            )
        run_dir = path
        peft_dir = path / "peft" if _is_peft_dir(path / "peft") else None
        try:
            meta_state = resolve_meta_state_dir(path)
        except MetaStateError:
            if peft_dir is None:
                raise
            meta_state = None
    if peft_dir is not None:  # a truncated or missing weight file is one clear line, not a loader traceback
        check_safetensors(peft_dir / "adapter_model.safetensors", ModelLoadError, f"{what}='{given}'")
        if (peft_dir / SIDECAR_FILES[0]).exists():
            for file in SIDECAR_FILES:
                if file.endswith(".safetensors"):
                    check_safetensors(peft_dir / file, ModelLoadError, f"{what}='{given}'")
    preparation = read_preparation(run_dir, meta_state)
    base = None
    if peft_dir is not None:
        base = _base_of_peft(peft_dir)
    elif meta_state is not None and (meta_state / "base.json").is_file():
        base = json.loads((meta_state / "base.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    return AdapterSource(
        given=str(given),
        peft_dir=peft_dir,
        run_dir=run_dir,
        meta_state=meta_state,
        base_model_name_or_path=base,
        has_sidecar=peft_dir is not None and all((peft_dir / f).is_file() for f in SIDECAR_FILES),
        algorithm=preparation.get("algorithm"),
        preparation=preparation,
    )


def ensure_peft_dir(source: AdapterSource, out_dir: Path, device: str | None = "cpu", max_length: int = 256) -> AdapterSource:
    """Export a meta-state that has no PEFT export yet into ``out_dir`` (once).

    Args:
        source: A resolved adapter.
        out_dir: Where to write the export (e.g. ``OUTPUT/adapters/meta``).
        device: Device to build the export on.
        max_length: Token limit of fold inputs.

    Returns:
        ``source`` with ``peft_dir`` (and ``has_sidecar``) set.
    """
    if source.peft_dir is not None:
        return source
    from deltameta.deltas.export import export_peft

    logger.info("exporting the meta-state %s to %s", source.meta_state, out_dir)
    export_peft(source.meta_state, out_dir, device=device, max_length=max_length, overwrite=True)
    return dataclasses.replace(
        source,
        peft_dir=out_dir,
        has_sidecar=all((out_dir / f).is_file() for f in SIDECAR_FILES),
        base_model_name_or_path=_base_of_peft(out_dir),
    )


def check_base_matches(source: AdapterSource, base_model: Any, what: str = "adapter") -> None:
    """Raise unless ``source`` was made for ``base_model`` (name and module shapes).

    Raises:
        ModelLoadError: naming the adapter, the base it expects and the base given.
    """
    from deltameta.deltas.export import check_adapter_fits

    info = getattr(base_model, "deltameta_base", None)
    actual = info.base_model_name_or_path if info is not None else getattr(base_model, "name_or_path", None)
    expected = source.base_model_name_or_path
    if expected and actual and expected != actual:
        raise ModelLoadError(
            f"{what}='{source.given}' was made for base model '{expected}', but model is '{actual}' "
            f"({info.name if info is not None else actual}); pass the matching model=... or another adapter."
        )
    if source.peft_dir is not None:
        try:
            check_adapter_fits(base_model, source.peft_dir)
        except ModelLoadError as error:
            raise ModelLoadError(f"{what}='{source.given}': {error}") from None


def recorded_inner_loop(source: AdapterSource):
    """The inner loop ``source`` was meta-trained for, and its learned rates.

    Read from the export's ``deltameta.json`` (+ ``deltameta_inner_lrs.safetensors``), else from the
    meta-state (an older export of a run whose meta-state is at hand).

    Returns:
        ``(InnerLoopRecord | None, {delta name: rate} | None)``; ``(None, None)`` for an adapter
        without a record (a plain PEFT LoRA, an older published export).
    """
    from deltameta.deltas.inner_loop import EXPORT_RATES_FILE, InnerLoopRecord, load_rates, read_export_record

    if source.peft_dir is not None:
        record = read_export_record(source.peft_dir)
        if record is not None and record.get("inner_loop"):
            rates_file = source.peft_dir / EXPORT_RATES_FILE
            return (InnerLoopRecord.from_dict(record["inner_loop"], f"{source.peft_dir}/deltameta.json"),
                    load_rates(rates_file) if rates_file.is_file() else None)
    if source.meta_state is not None:
        from deltameta.deltas.state import load_meta_state

        state = load_meta_state(source.meta_state)
        return state.inner_loop, state.inner_lrs
    return None, None
