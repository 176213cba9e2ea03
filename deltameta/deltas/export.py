"""Export a meta-state as a standard PEFT LoRA adapter, and load it back with the dynamic TARP part.

PEFT's ``PeftType`` enum is closed, so the export is plain ``LORA``:

* LoRA ops are written as they are (``lora_A``, ``lora_B``, ``r``, ``lora_alpha`` per sublayer via
  ``rank_pattern`` / ``alpha_pattern``); sublayers where the controller chose ``skip`` are left out.
* TARP ops are folded: ``lora_B' = B M`` with ``M`` the least-squares fold of ``Σ(x)`` over the
  tokens of the fold inputs (:mod:`deltameta.deltas.fold`; the mean of ``Σ(x)`` for meta-states
  without the least-squares statistics); its error is measured on the held-out examples stored in
  the meta-state (:attr:`ExportResult.fold_error`). The fold inputs are, in order of preference:
  the given ``fold_inputs``, else the ``task_examples``, else the fold statistics stored in the
  meta-state during meta-training, else :data:`DEFAULT_FOLD_TEXT` (a short neutral text). The exact dynamic
  remainder ``s B (Σ(x) - M) A x`` goes to the sidecar ``deltameta_tarp.safetensors`` (+
  ``deltameta_tarp.json``), which :func:`load_meta_adapter` re-attaches on top of ``PeftModel``.
* The multiplicative (IA3-like) term is not expressible in LoRA: the least-squares fold adds its
  projection on the span of ``A x`` to ``lora_B`` (:mod:`deltameta.deltas.fold`); the exact term is
  kept in the sidecar only (a warning says so).
* ``deltameta.json`` records the inner loop the adapter was meta-trained for (see
  :mod:`deltameta.deltas.inner_loop`), the delta config and the chosen structure; beside it
  ``deltameta_inner_lrs.safetensors`` (Meta-SGD's learned rates), ``deltameta_deltas.safetensors``
  (every delta tensor, to rebuild the delta model, see :mod:`deltameta.deltas.rebuild`) and
  ``deltameta_controller.safetensors`` (the controller, for a per-task structure) make the export
  self-contained. Exports without ``deltameta.json`` (older ones) still load.

The adapter is never merged into the base (merging into a 4-bit base would requantize and destroy
a small delta).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltameta.atomic import atomic_directory
from deltameta.deltas.config import parse_op
from deltameta.deltas.fold import (
    FOLD_METHODS,
    add_moments,
    fold_error,
    fold_points,
    multiplicative_offsets,
    normalise_moments,
)
from deltameta.deltas.inner_loop import EXPORT_RATES_FILE, save_rates
from deltameta.deltas.model import collect_fold_moments, delta_layers, task_embedding
from deltameta.deltas.state import MetaState, build_from_meta_state, load_meta_state
from deltameta.errors import DataError, DeltametaError, ModelLoadError
from deltameta.integrity import check_safetensors

logger = logging.getLogger(__name__)

SIDECAR = "deltameta_tarp.safetensors"
SIDECAR_META = "deltameta_tarp.json"
#: What the adapter is (schema-versioned strict JSON): inner loop, delta config, structure, files.
EXPORT_META = "deltameta.json"
#: Version of ``deltameta.json``.
EXPORT_SCHEMA = 1
#: Every delta tensor of the meta-state (all candidate ops), to rebuild the delta model exactly.
DELTAS_FILE = "deltameta_deltas.safetensors"
#: The architecture controller's weights (+ its metadata in ``deltameta.json["controller"]``).
CONTROLLER_FILE = "deltameta_controller.safetensors"
#: Marker file of a deltameta export (an export may be replaced only where this and adapter_config.json are).
EXPORT_MARKER = ".deltameta_export"
#: Fold input used when neither task examples nor stored fold statistics exist.
DEFAULT_FOLD_TEXT = "The quick brown fox jumps over the lazy dog. Question: what is 2 + 3? Answer: 5."


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_peft` wrote.

    Attributes:
        path: The adapter directory.
        decisions: ``{sublayer: op}`` for every candidate (``skip`` included).
        sigma_bars: ``{sublayer: {op: M - I}}`` fold matrices of the exported TARP ops.
        fold_source: Where the fold point came from.
        fold_method: ``least_squares``, ``mean`` (older meta-states) or ``none`` (nothing to fold:
            no TARP op, no multiplicative term).
        fold_error: ``None`` with nothing to fold; else ``method``, ``fold_source`` and, when the
            meta-state holds held-out examples, the measured ``relative_logit_error`` and
            ``loss_gain_kept`` of the exported fold plus every fold's numbers under ``folds``
            (see :func:`deltameta.deltas.fold.fold_error`).
        b_offsets: ``{sublayer: {op: D}}`` added to ``lora_B``: the least-squares projection of
            the multiplicative term (empty without it); ``static_export(model, sigma_bars,
            b_offsets)`` computes what the export computes.
    """

    path: Path
    decisions: dict[str, str]
    sigma_bars: dict[str, dict[str, torch.Tensor]]
    fold_source: str
    fold_method: str = "none"
    fold_error: dict[str, Any] | None = None
    b_offsets: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)


def load_task_examples(source: str | Path | Sequence[str] | Sequence[dict]) -> list[tuple[str, str | None]]:
    """Read task examples as ``(input, output)`` pairs (``output`` is ``None`` for plain strings).

    Args:
        source: A jsonl file of ``{"input": ..., "output": ...}`` lines, or a list of strings (or
            of such dicts).

    Raises:
        DataError: the file is missing or a line is not such an object (file and line are named).
    """
    from_file = isinstance(source, (str, Path))
    if from_file:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"task examples file '{path}' does not exist.")
        records: list[tuple[Any, str]] = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({error.msg}); each line of a task examples file must be "
                    'an object {"input": "...", "output": "..."}.'
                ) from None
        if not records:
            raise DataError(f"task examples file '{path}' holds no examples.")
    else:
        records = [(item, f"task example {i}") for i, item in enumerate(source)]
        if not records:
            raise DataError("task examples: the list is empty.")
    pairs: list[tuple[str, str | None]] = []
    for record, where in records:
        if isinstance(record, str) and not from_file:
            pairs.append((record, None))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("input"), str) or not isinstance(record.get("output"), str):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f'{where}: expected an object with string fields "input" and "output", got {got}.')
        pairs.append((record["input"], record["output"]))
    return pairs


def read_task_examples(source: str | Path | Sequence[str] | Sequence[dict]) -> list[str]:
    """Read task examples as texts (``input + "\\n" + output`` for pairs); see :func:`load_task_examples`."""
    return [text if output is None else text + "\n" + output for text, output in load_task_examples(source)]


def _encode(tokenizer, examples: list[tuple[str, str | None]], device, max_length: int):
    """Tokenize examples the way meta-training encodes support sets when possible.

    Pairs go through ``deltameta.tasks.encoding.encode_examples`` (prompt template + answer) when
    that module is available, so the task embedding matches the one the controller was trained
    on; plain strings (and the fallback) are tokenized as they are.
    """
    if all(output is not None for _, output in examples):
        try:
            from deltameta.tasks.encoding import encode_examples
            from deltameta.tasks.task import Example
        except ImportError:
            encode_examples = None
        if encode_examples is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                batch = encode_examples(tokenizer, [Example(input=i, target=o) for i, o in examples], max_length=max_length)
            return batch["input_ids"].to(device), batch["attention_mask"].to(device)
    texts = [text if output is None else text + "\n" + output for text, output in examples]
    return _tokenize(tokenizer, texts, device, max_length)


def _tokenize(tokenizer, texts: list[str], device, max_length: int):
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def _device_of(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def is_export_dir(path: str | Path) -> bool:
    """Return whether ``path`` holds a previous deltameta export (``adapter_config.json`` + marker)."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return False
    if (path / EXPORT_MARKER).is_file() or (path / SIDECAR_META).is_file():
        return True
    card = path / "README.md"  # exports written before the marker existed: the card names deltameta
    try:
        return card.is_file() and "deltameta" in card.read_text(encoding="utf-8", errors="replace")[:4000]
    except OSError:
        return False


def check_export_dir(out_dir: str | Path, source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Check that an export may be written to ``out_dir``; never deletes anything.

    Args:
        out_dir: The destination.
        source: The run or meta-state directory exported (refused as a destination, with its parents).
        overwrite: Replace a previous deltameta export there.

    Returns:
        ``out_dir``, absolute.

    Raises:
        ConfigError: ``out_dir`` is the working directory, the source or one of its parents, a file,
            a non-empty folder that is not a deltameta export, or an export (without ``overwrite``).
    """
    from deltameta.errors import ConfigError

    given = out_dir
    out = Path(out_dir).expanduser().resolve()
    if out == Path.cwd().resolve() or out.parent == out:
        raise ConfigError(f"--out '{given}' is the current (or root) directory; give a new directory for the adapter, "
                          "e.g. --out my-adapter.")
    if source is not None:
        src = Path(source).expanduser().resolve()
        if src == out or out in src.parents:
            raise ConfigError(f"--out '{given}' would replace the exported run '{source}' (or a folder holding it); "
                              "give a directory outside it, e.g. --out my-adapter.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{given}' is a file; give a directory.")
    if out.is_dir() and any(out.iterdir()):
        if not is_export_dir(out):
            raise ConfigError(f"--out '{given}' is not empty and holds no deltameta export; refusing to replace it "
                              "(even with --overwrite). Choose an empty or new directory.")
        if not overwrite:
            raise ConfigError(f"--out '{given}' already holds a deltameta export; pass --overwrite to replace it, "
                              "or choose another directory.")
    return out


def export_peft(
    source: str | Path | MetaState,
    out_dir: str | Path,
    task_examples: str | Path | Sequence[str] | None = None,
    fold_inputs: Sequence[str] | None = None,
    device: str | None = "cpu",
    max_length: int = 512,
    built: tuple[nn.Module, Any, Any] | None = None,
    structure_embedding: torch.Tensor | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export a meta-trained run (or meta-state) as a PEFT LoRA adapter directory.

    Args:
        source: A run directory (its ``final/`` is used), a meta-state directory or a
            :class:`MetaState`.
        out_dir: Destination; written atomically.
        task_examples: jsonl file or list of texts of the target task: the task-conditioned
            controller chooses the structure from their embedding, and TARP folds on them.
        fold_inputs: Texts to fold TARP on (overrides ``task_examples`` for the fold).
        device: Device to build the model on.
        max_length: Token limit per example.
        built: ``(model, tokenizer, controller)`` already holding the deltas (e.g. the delta model
            ``finetune`` trained); default: built from the meta-state.
        structure_embedding: Task embedding a task-conditioned controller chooses the structure
            from (overrides ``task_examples`` for the structure).
        overwrite: Replace a previous deltameta export in ``out_dir`` (anything else there is refused).

    Returns:
        An :class:`ExportResult`.

    Raises:
        ConfigError: ``out_dir`` holds something other than a deltameta export, an export (without
            ``overwrite``), or is the source run or one of its parents (see :func:`check_export_dir`).
        MetaStateError: the run has no finished state.
        DataError: task examples in a wrong format.
        DeltametaError: the controller skipped every sublayer.
    """
    from peft import LoraConfig

    check_export_dir(out_dir, None if isinstance(source, MetaState) else source, overwrite)
    state = source if isinstance(source, MetaState) else load_meta_state(source)
    examples = load_task_examples(task_examples) if task_examples is not None else None
    model, tokenizer, controller = built if built is not None else build_from_meta_state(state, device=device)
    model_device = _device_of(model)
    layers = delta_layers(model)
    config = state.delta_config

    probs = None
    weights = None
    embedding_source = None
    if controller is not None:
        emb = None
        if controller.mode == "task":
            if structure_embedding is not None:
                emb = structure_embedding.to(model_device)
                embedding_source = "the support examples of the fine-tuning data"
            elif examples:
                emb = task_embedding(model, *_encode(tokenizer, examples, model_device, max_length))
                embedding_source = "the given task examples"
            elif state.task_embedding_mean is not None:
                emb = state.task_embedding_mean.to(model_device)
                embedding_source = "the mean task embedding of meta-training"
            else:
                emb = task_embedding(model, *_tokenize(tokenizer, [DEFAULT_FOLD_TEXT], model_device, max_length))
                embedding_source = "a default text (no task examples, no stored mean embedding)"
                warnings.warn("task-conditioned controller without task examples or a stored mean embedding; "
                              "the structure is chosen from a default text.", stacklevel=2)
        with torch.no_grad():
            probs = controller.probs(emb)
        decisions = dict(zip(controller.candidates, controller.decide(emb)))
        weights = controller.decision_weights(list(decisions.values()))
    else:
        decisions = {name: layer.op_names[0] for name, layer in layers.items()}
    kept = {name: op for name, op in decisions.items() if op != "skip"}
    if not kept:
        raise DeltametaError("the controller chose 'skip' for every sublayer; there is nothing to export.")

    def op_context():
        return controller.apply(model, weights) if controller is not None else contextlib.nullcontext()

    # TARP fold point (least squares when the statistics allow it, see deltameta.deltas.fold).
    sigma_bars: dict[str, dict[str, torch.Tensor]] = {}
    fold_source = "none (no TARP op exported)"
    fold_method = "none"
    fold_err: dict[str, Any] | None = None
    b_offsets: dict[str, dict[str, torch.Tensor]] = {}
    tarp_kept = {name: op for name, op in kept.items() if parse_op(op).kind == "tarp"}
    if tarp_kept or config.multiplicative:
        texts = [(t, None) for t in fold_inputs] if fold_inputs else examples
        if texts:
            fold_source = "the given fold inputs" if fold_inputs else "the given task examples"
        elif state.fold_stats or state.fold_moments:
            fold_source = "fold statistics stored during meta-training"
        else:
            texts = [(DEFAULT_FOLD_TEXT, None)]
            fold_source = f"the default text {DEFAULT_FOLD_TEXT!r}"
        if texts:
            totals: dict[str, Any] = {}
            with op_context():
                for example in texts:
                    ids, mask = _encode(tokenizer, [example], model_device, max_length)
                    add_moments(totals, collect_fold_moments(model, ids, mask))
            means, moments = normalise_moments(totals)
        else:
            means, moments = state.fold_stats or {}, state.fold_moments or {}
        has_moments = all(op in moments.get(name, {}) for name, op in tarp_kept.items() if op in means.get(name, {}))
        if config.multiplicative and not moments:
            has_moments = False
        fold_method = "least_squares" if has_moments else "mean"
        if tarp_kept and not has_moments:
            warnings.warn(
                f"the meta-state {state.path} stores only the mean TARP fold statistics (written by an older deltameta); "
                "folding TARP at the mean of Σ(x), which can lose much of the adapter's gain. Re-export with "
                "task examples (--task-examples) or meta-train again for the least-squares fold.",
                stacklevel=2,
            )
        candidates = {method: fold_points(means, moments if method == "least_squares" else None, method)
                      for method in FOLD_METHODS if method == "mean" or has_moments}
        for name, op in tarp_kept.items():
            r = parse_op(op).rank
            bar = candidates[fold_method].get(name, {}).get(op)
            sigma_bars[name] = {op: (bar if bar is not None else torch.zeros(r, r)).detach().float().cpu()}
        offsets = {"mean": {}}
        if has_moments and config.multiplicative:
            offsets["least_squares"] = multiplicative_offsets(model, moments, kept)
        b_offsets = offsets.get(fold_method, {})
        fold_err = {"method": fold_method, "fold_source": fold_source}
        if state.fold_heldout is not None:
            kept_bars = {method: {name: {op: bars.get(name, {}).get(op, torch.zeros_like(sigma_bars[name][op]))}
                                  for name, op in tarp_kept.items()} for method, bars in candidates.items()}
            measured = fold_error(model, state.fold_heldout, kept_bars, op_context, offsets=offsets)
            fold_err.update(
                heldout="held-out meta-training examples stored in the meta-state (not used to fit the fold)",
                relative_logit_error=measured["folds"][fold_method]["relative_logit_error"],
                loss_gain_kept=measured["folds"][fold_method]["loss_gain_kept"],
                **measured,
            )
        else:
            fold_err["heldout"] = None
            fold_err["note"] = "not measured: the meta-state holds no held-out examples"

    # Adapter tensors and sidecar.
    tensors: dict[str, torch.Tensor] = {}
    sidecar: dict[str, torch.Tensor] = {}
    sidecar_layers: dict[str, Any] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, op in kept.items():
        layer = layers[name]
        spec = parse_op(op)
        a = layer.lora_A[op].detach().float().cpu()
        b = layer.lora_B[op].detach().float().cpu()
        folded_b = b
        if spec.kind == "tarp":
            folded_b = b @ (torch.eye(spec.rank) + sigma_bars[name][op])
            sidecar[f"{name}.lora_A"] = a.contiguous()
            sidecar[f"{name}.lora_B"] = b.contiguous()
            sidecar[f"{name}.tarp_sigma"] = layer.tarp_sigma[op].detach().float().cpu().contiguous()
            sidecar[f"{name}.sigma_bar"] = sigma_bars[name][op].contiguous()
        if config.multiplicative:
            sidecar[f"{name}.mult"] = layer.mult[op].detach().float().cpu().contiguous()
        offset = b_offsets.get(name, {}).get(op)
        if offset is not None:  # least-squares projection of the multiplicative term (removed by the sidecar hook)
            folded_b = folded_b + offset
            sidecar[f"{name}.lora_A"] = a.contiguous()
            sidecar[f"{name}.fold_b_offset"] = offset.contiguous()
        if spec.kind == "tarp" or config.multiplicative:
            sidecar_layers[name] = {
                "op": op,
                "kind": spec.kind,
                "rank": spec.rank,
                "scaling": layer.scaling[op],
                "sigma_input": config.tarp_sigma_input,
                "multiplicative": config.multiplicative,
            }
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = folded_b.contiguous()
        rank_pattern[name] = spec.rank
        alpha_pattern[name] = config.alpha
    if config.multiplicative:
        warnings.warn(
            "the multiplicative (IA3-like) term cannot be expressed as LoRA; plain PEFT gets only its least-squares "
            "projection folded into lora_B. The exact term is saved only in the sidecar "
            f"{SIDECAR} and applied by deltameta.load_meta_adapter, not by plain PeftModel.from_pretrained.",
            stacklevel=2,
        )
    default_rank = collections.Counter(rank_pattern.values()).most_common(1)[0][0]
    lora_config = LoraConfig(
        r=default_rank,
        lora_alpha=config.alpha,
        target_modules=list(kept),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=state.base["base_model_name_or_path"],
        inference_mode=True,
    )

    table = controller.decision_table(list(decisions.values()), probs[0] if probs is not None and probs.dim() == 3 else probs) if controller else None
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": 1, "writer": "deltameta export"}) + "\n",
                                         encoding="utf-8")
        lora_config.save_pretrained(str(tmp))
        metadata = {"format": "pt"}
        if state.base.get("weights"):  # the exact base weights, also in the card
            metadata["deltameta_base_weights"] = json.dumps(state.base["weights"], sort_keys=True)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=metadata)
        if sidecar:
            save_file(sidecar, str(tmp / SIDECAR))
            meta = {"format": 1, "fold_source": fold_source, "fold_method": fold_method, "fold_error": fold_err,
                    "layers": sidecar_layers}
            (tmp / SIDECAR_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if controller is not None:
            (tmp / "controller_decisions.txt").write_text(table, encoding="utf-8")
            controller.decision_heatmap(tmp / "controller_decisions.png", list(decisions.values()), probs,
                                        title=f"controller decisions ({controller.mode})")
        record = _export_record(state, decisions, fold_source, embedding_source, controller)
        record["fold_error"] = fold_err
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.deltas.items()},
                  str(tmp / DELTAS_FILE))
        if state.inner_lrs:
            save_rates(tmp / EXPORT_RATES_FILE, state.inner_lrs)
            record["files"]["inner_lrs"] = EXPORT_RATES_FILE
        if controller is not None:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in controller.state_dict().items()},
                      str(tmp / CONTROLLER_FILE))
            record["files"]["controller"] = CONTROLLER_FILE
        if sidecar:
            record["files"]["sidecar"] = SIDECAR
        (tmp / EXPORT_META).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        card = _model_card(state, decisions, kept, rank_pattern, fold_source, embedding_source, table, bool(sidecar),
                           fold_err)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    logger.info("exported %d sublayers to %s", len(kept), out_dir)
    return ExportResult(path=out_dir, decisions=decisions, sigma_bars=sigma_bars, fold_source=fold_source,
                        fold_method=fold_method, fold_error=fold_err, b_offsets=b_offsets)


def _export_record(state: MetaState, decisions: dict[str, str], fold_source: str, embedding_source: str | None,
                   controller: Any) -> dict[str, Any]:
    """The content of ``deltameta.json`` (strict JSON)."""
    return {
        "schema": EXPORT_SCHEMA,
        "inner_loop": state.inner_loop.to_dict() if state.inner_loop is not None else None,
        "delta_config": json.loads(state.delta_config.to_json()),
        "base": {k: v for k, v in state.base.items() if isinstance(v, (str, int, float, bool)) or v is None},
        "decisions": dict(decisions),
        "structure_source": embedding_source,
        "fold_source": fold_source,
        "controller": controller.metadata() if controller is not None else None,
        "files": {"deltas": DELTAS_FILE},
    }


def _fmt(value: Any) -> str:
    if value is None or value == {} or value == []:
        return "_not recorded_"
    if isinstance(value, (dict, list)):
        return "```json\n" + json.dumps(value, indent=2, default=str) + "\n```"
    return str(value)


def describe_fold_error(fold_err: dict[str, Any] | None) -> str | None:
    """One line on the TARP fold and its measured error (``None`` without TARP)."""
    if not fold_err:
        return None
    method = fold_err["method"].replace("_", " ")
    if fold_err.get("heldout") is None:
        return f"TARP static fold: {method}; fold error {fold_err.get('note', 'not measured')}"
    parts = []
    for name, numbers in fold_err["folds"].items():
        err, kept = numbers["relative_logit_error"], numbers["loss_gain_kept"]
        parts.append(f"{name.replace('_', ' ')}: logit error {_pct(err)}, loss gain kept {_pct(kept)}")
    return (f"TARP static fold: {method}; on {fold_err['examples']} held-out examples ({fold_err['answer_tokens']} answer "
            f"tokens; loss base {fold_err['loss_base']:.4f}, dynamic {fold_err['loss_dynamic']:.4f}): " + "; ".join(parts))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _model_card(state, decisions, kept, rank_pattern, fold_source, embedding_source, table, has_sidecar,
                fold_err=None) -> str:
    base = state.base
    extra = state.extra
    config = state.delta_config
    ranks = collections.Counter(f"{op}" for op in kept.values())
    lines = [
        "A low-rank adapter meta-learned with MAML by deltameta on a frozen base, "
        "exported as a standard PEFT LoRA adapter (unmerged).",
        "",
        "## Base model",
        "",
        f"- base model: `{base['base_model_name_or_path']}` (deltameta name `{base.get('name')}`)",
        f"- revision: {extra.get('revision') or base.get('revision') or '_not recorded_'}",
        f"- quantization during meta-training: `{base.get('quantization')}` (compute dtype `{base.get('compute_dtype')}`, "
        f"double quant: {base.get('double_quant')})",
        "- never merge this adapter into a 4-bit base: requantization destroys a small delta.",
    ]
    lines += _weights_lines(base.get("weights"))
    lines += [
        "",
        "## Adapter",
        "",
        f"- delta: `{config.delta}`, controller: `{config.controller}`, candidate ops: "
        + ", ".join(op.name for op in config.layer_ops()),
        f"- sublayers kept: {len(kept)} of {len(decisions)}; ops: "
        + ", ".join(f"{op} x{n}" for op, n in sorted(ranks.items())),
        f"- lora_alpha: {config.alpha}; ranks per sublayer in `rank_pattern`",
        f"- TARP fold point: {fold_source}",
    ]
    fold_line = describe_fold_error(fold_err)
    if fold_line:
        lines.append(f"- {fold_line} (relative logit error = ||static - dynamic|| / ||dynamic - base|| over the "
                     "tokens; loss gain kept = (loss base - loss static) / (loss base - loss dynamic))")
    if embedding_source:
        lines.append(f"- structure chosen from: {embedding_source}")
    record = state.inner_loop
    lines.append("- meta-trained inner loop (evaluate/finetune adapt with it by default): "
                 + (record.describe() if record is not None else "_not recorded_")
                 + (f"; learned rates in `{EXPORT_RATES_FILE}`" if state.inner_lrs else "")
                 + f"; full record in `{EXPORT_META}`")
    if has_sidecar:
        lines.append(
            f"- exact dynamic part (TARP Σ(x) and/or multiplicative term) in `{SIDECAR}`: load with "
            "`deltameta.load_meta_adapter(base, DIR)` to reproduce the meta-trained model exactly; "
            "plain PEFT gives the static fold."
        )
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        f'base = AutoModelForCausalLM.from_pretrained("{base["base_model_name_or_path"]}")',
        'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/DIR")',
        "```",
        "",
        "## Task distribution",
        "",
        _fmt(extra.get("task_distribution") or extra.get("splits")),
        "",
        "## Recipe",
        "",
        _fmt(extra.get("recipe") or extra.get("config")),
    ]
    if extra.get("command"):
        lines += ["", "Command:", "", "```", str(extra["command"]), "```"]
    lines += ["", "## Metrics", "", _fmt(extra.get("metrics") or extra.get("validation")), ""]
    if table:
        lines += ["## Controller decisions", "", "```", table.rstrip("\n"), "```", "",
                  "Heatmap: `controller_decisions.png`.", ""]
    from deltameta.cards import eval_result, hub_dataset_ids, render_card

    recipe = extra.get("config") or extra.get("recipe") or {}
    tasks = recipe.get("tasks") if isinstance(recipe, dict) else None
    validation = extra.get("validation") or {}
    last = validation.get("last") if isinstance(validation, dict) else None
    results = []
    if isinstance(last, (list, tuple)) and len(last) == 2:
        results = [eval_result("held-out query loss before adaptation", last[0], tasks or "tasks", "validation"),
                   eval_result("held-out query loss after adaptation", last[1], tasks or "tasks", "validation")]
    return render_card(
        title=f"deltameta meta-adapter for {base['base_model_name_or_path']}",
        body="\n".join(lines),
        base_model=base["base_model_name_or_path"],
        tags=["meta-learning", config.delta],
        datasets=hub_dataset_ids(tasks),
        eval_results=results,
        weights=base.get("weights"),
    )


def _weights_lines(weights: dict[str, Any] | None) -> list[str]:
    """Card lines naming the exact base weights (file names and sha256)."""
    if not weights or not weights.get("files"):
        origin = (weights or {}).get("origin")
        return [f"- base weights: {origin or 'not recorded'} (sha256 not recorded)"]
    lines = [f"- base weights ({weights.get('origin')}, {weights.get('format')}):"]
    lines += [f"  - `{f['name']}` sha256 `{f['sha256']}`" for f in weights["files"]]
    return lines


# --------------------------------------------------------------------------------------------
# loading


def _base_identity(base_model: nn.Module) -> tuple[str | None, bool]:
    info = getattr(base_model, "deltameta_base", None)
    if info is not None:
        return info.base_model_name_or_path, True
    name = getattr(base_model, "name_or_path", None) or getattr(getattr(base_model, "config", None), "_name_or_path", None)
    return name, False


def check_adapter_fits(base_model: nn.Module, directory: str | Path) -> None:
    """Raise unless the adapter in ``directory`` was exported for ``base_model``.

    Raises:
        ModelLoadError: the base's modules or shapes do not fit, or a deltameta base has a
            different name (both names are given).
    """
    directory = Path(directory)
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"'{directory}' holds no adapter_config.json; is it a deltameta/PEFT export?")
    adapter_cfg = json.loads(config_file.read_text(encoding="utf-8"))
    expected = adapter_cfg.get("base_model_name_or_path")
    actual, known = _base_identity(base_model)
    weights = load_file(str(check_safetensors(directory / "adapter_model.safetensors", ModelLoadError)))
    problems = []
    for module_name in adapter_cfg.get("target_modules") or []:
        try:
            module = base_model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"module '{module_name}' is missing")
            continue
        a = weights.get(f"base_model.model.{module_name}.lora_A.weight")
        b = weights.get(f"base_model.model.{module_name}.lora_B.weight")
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if a is not None and b is not None and (a.shape[1] != in_f or b.shape[0] != out_f):
            problems.append(f"'{module_name}' is {in_f}->{out_f} but the adapter expects {a.shape[1]}->{b.shape[0]}")
    if problems:
        detail = "; ".join(problems[:3])
        if expected and actual and expected == actual:  # same name, other shapes: the adapter or base differs
            raise ModelLoadError(
                f"the adapter in '{directory}' does not fit the given base model '{actual}' although both name it: "
                f"{detail}. The adapter's weights do not match its adapter_config.json, or the base was built "
                "differently; re-export the adapter from its run."
            )
        raise ModelLoadError(
            f"the adapter in '{directory}' was exported for base model '{expected}', which does not match the "
            f"given base model '{actual}': {detail}."
        )
    if expected and actual and expected != actual:
        message = (f"the adapter in '{directory}' was exported for base model '{expected}', but the given base "
                   f"model is '{actual}'")
        if known:
            raise ModelLoadError(message + "; load the matching base (deltameta.base.load_base).")
        warnings.warn(message + " (shapes fit; continuing).", stacklevel=3)


def load_meta_adapter(base_model: nn.Module, directory: str | Path, adapter_name: str = "default", is_trainable: bool = False):
    """Load an export with PEFT and re-attach its exact dynamic part (TARP Σ(x), multiplicative term).

    Args:
        base_model: The frozen base (``transformers`` model; 4-bit or full precision).
        directory: An export of :func:`export_peft`.
        adapter_name: PEFT adapter name.
        is_trainable: Passed to ``PeftModel.from_pretrained``.

    Returns:
        The ``PeftModel``; with a sidecar, forward hooks on the LoRA modules add
        ``s B (Σ(x) - M) A x`` (and ``m ⊙ W0 x``), so it computes the meta-trained (dynamic) model.
        The hook handles are in ``peft_model.deltameta_hooks``.

    Raises:
        ModelLoadError: the base model does not match the adapter.
    """
    from peft import PeftModel

    directory = Path(directory)
    check_adapter_fits(base_model, directory)
    peft_model = PeftModel.from_pretrained(base_model, str(directory), adapter_name=adapter_name, is_trainable=is_trainable)
    handles = []
    if (directory / SIDECAR).is_file():
        meta_file = directory / SIDECAR_META
        if not meta_file.is_file():
            raise DeltametaError(f"'{directory}' has {SIDECAR} but lacks {SIDECAR_META}.")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        tensors = load_file(str(check_safetensors(directory / SIDECAR, ModelLoadError)))
        root = peft_model.base_model.model
        for name, info in meta["layers"].items():
            module = root.get_submodule(name)
            device = next(module.parameters()).device
            parts = {k.removeprefix(name + "."): v.to(device) for k, v in tensors.items() if k.startswith(name + ".") and "." not in k.removeprefix(name + ".")}
            handles.append(module.register_forward_hook(_dynamic_hook(info, parts)))
    peft_model.deltameta_hooks = handles
    return peft_model


def _dynamic_hook(info: dict[str, Any], parts: dict[str, torch.Tensor]):
    rank, scaling = int(info["rank"]), float(info["scaling"])
    tarp = info["kind"] == "tarp"
    projected = info.get("sigma_input", "projected") == "projected"

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        dtype = x.dtype
        extra = None
        z = x @ parts["lora_A"].to(dtype).T if "lora_A" in parts else None
        if tarp:
            b = parts["lora_B"].to(dtype)
            s = ((z if projected else x) @ parts["tarp_sigma"].to(dtype).T)
            s = s.reshape(*s.shape[:-1], rank, rank) - parts["sigma_bar"].to(dtype)
            extra = (torch.matmul(s, z.unsqueeze(-1)).squeeze(-1) @ b.T) * scaling
        if "mult" in parts:
            base_out = module.base_layer(x).to(dtype)
            term = base_out * parts["mult"].to(dtype)
            if "fold_b_offset" in parts:  # the export holds s D A x in place of m ⊙ W0 x
                term = term - (z @ parts["fold_b_offset"].to(dtype).T) * scaling
            extra = term if extra is None else extra + term
        return output if extra is None else output + extra.to(output.dtype)

    return hook
