"""``deltameta models``: list built-in base models and prepare them in the cache."""

from __future__ import annotations

import argparse
from pathlib import Path

from deltameta.base import ALIASES, DEFAULT_MODEL, QUANTIZATIONS, cache_state, is_prepared, prepare
from deltameta.home import models_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``models list`` and ``models prepare``."""
    parser = subparsers.add_parser("models", help="list and prepare base models", description="List and prepare base models; print where their weights are.")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION")
    listing = actions.add_parser("list", help="show aliases, cache state and sizes", description="Show built-in model aliases, whether each is prepared in the cache, and sizes.")
    listing.set_defaults(func=_list)
    prep = actions.add_parser(
        "prepare",
        help="convert and quantize a model into the cache",
        description="Convert a model to safetensors and quantize it to 4-bit once, so later loads read "
        "only the 4-bit weights. A second call is a no-op.",
    )
    prep.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"alias, local directory or hub id (default: {DEFAULT_MODEL})")
    prep.add_argument("--quantization", default="nf4", choices=QUANTIZATIONS, help="variant to prepare (default: nf4)")
    prep.add_argument("--double-quant", action="store_true", help="double-quantize the 4-bit constants")
    prep.add_argument("--revision", default=None, help="hub revision (hub ids only)")
    prep.set_defaults(func=_prepare)
    path = actions.add_parser(
        "path",
        help="print the directory of a model's full-precision safetensors (preparing it if needed)",
        description="Print the directory holding the full-precision safetensors deltameta loads for MODEL "
        "(for smollm2-135m: the GGUF Q4_1 file dequantized, the exact weights adapters are trained on), "
        "so plain transformers/PEFT can load the same weights: AutoModelForCausalLM.from_pretrained(PATH).",
    )
    path.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"alias or local directory (default: {DEFAULT_MODEL})")
    path.set_defaults(func=_path)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _list(args: argparse.Namespace) -> int:
    print(f"cache: {models_dir()}")
    print(f"{'alias':<20} {'hub id':<38} {'prepared':<22} description")
    for alias in ALIASES.values():
        if alias.gguf_file is None:
            state = "built in-process"
        else:
            rows = cache_state(alias.name)
            state = ", ".join(f"{variant} ({_human(size)})" for variant, _, size in rows) or "not prepared"
        print(f"{alias.name:<20} {alias.hub_id:<38} {state:<22} {alias.description}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    if args.model == "tiny-random-llama":
        print("tiny-random-llama is built in-process; nothing to prepare.")
        return 0
    ready = is_prepared(args.model, args.quantization, args.double_quant, args.revision)
    target = prepare(args.model, args.quantization, args.double_quant, args.revision, show_progress=not ready)
    state = "already prepared, nothing to do" if ready else "prepared"
    print(f"{args.model} ({args.quantization}): {state}: {target}")
    return 0


def _path(args: argparse.Namespace) -> int:
    from deltameta.base import full_precision_source
    from deltameta.errors import ModelLoadError

    if args.model == "tiny-random-llama":
        raise ModelLoadError("tiny-random-llama is built in-process; it has no weights directory.")
    source, _ = full_precision_source(args.model, show_progress=True)
    if not Path(source).is_dir():
        raise ModelLoadError(f"'{args.model}' is a hub id; transformers loads it by that id, not from a deltameta directory.")
    print(source)
    return 0
