"""Model cards of exported adapters, written with ``huggingface_hub.ModelCard``.

Every adapter deltameta writes (a meta-train export, a fine-tuned ``best/`` or ``last/``) gets a
``README.md`` whose metadata the Hub reads: license, ``base_model``, ``library_name: peft``,
tags (``base_model:adapter:<id>`` links the adapter to its base on the Hub), datasets (Hub
dataset ids only), eval results as a ``model-index``, and the exact base weights deltameta
trained on (``base_model_weights``: file names and sha256).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: Licenses of the built-in bases (the adapter is derived from the base, so this is its license too).
BASE_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "deltameta/tiny-random-llama": "apache-2.0"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_dataset_ids(source: Any) -> list[str]:
    """Return the Hub dataset ids in a task source (``hf:name`` or ``org/name``; local paths are not ids).

    Args:
        source: The ``tasks`` value of a config (a string or a list of them).
    """
    items = source if isinstance(source, (list, tuple)) else [source]
    ids = []
    for item in items:
        text = str(item or "").strip()
        if text.startswith("hf:"):
            ids.append(text[3:])
        elif _HUB_ID.match(text) and not Path(text).expanduser().exists() and not text.endswith((".jsonl", ".json", ".csv", ".parquet")):
            ids.append(text)
    return ids


def eval_result(name: str, value: float | None, dataset: str, split: str, metric_type: str = "loss") -> dict[str, Any] | None:
    """Describe one measured number for :func:`render_card` (``None`` when not measured).

    Args:
        name: What was measured, e.g. ``held-out query loss after adaptation``.
        value: The number.
        dataset: The task source it was measured on.
        split: Which part of it (``validation``).
        metric_type: ``loss`` or ``accuracy``.
    """
    if value is None or not isinstance(value, (int, float)) or value != value:  # None or NaN
        return None
    return {"metric_name": name, "metric_value": float(value), "dataset_name": str(dataset), "dataset_split": split,
            "metric_type": metric_type}


def render_card(
    *,
    title: str,
    body: str,
    base_model: str | None,
    tags: list[str],
    datasets: list[str] | None = None,
    eval_results: list[dict[str, Any] | None] | None = None,
    weights: dict[str, Any] | None = None,
) -> str:
    """Return a model card (YAML metadata + markdown) built with ``huggingface_hub.ModelCard``.

    Args:
        title: The model name (``model-index`` name and the card's heading).
        body: Markdown after the heading.
        base_model: The base's hub id (or local path).
        tags: Extra tags; ``deltameta``, ``lora``, ``peft`` and ``base_model:adapter:<base>`` are added.
        datasets: Hub dataset ids it was trained on.
        eval_results: Measured numbers from :func:`eval_result` (``None`` entries are dropped).
        weights: The exact base weights (:attr:`deltameta.base.BaseInfo.weights`).

    Returns:
        The card text (``README.md``).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    license_ = BASE_LICENSES.get(base_model or "")
    all_tags = ["deltameta", "peft", "lora"] + [t for t in tags if t not in ("deltameta", "peft", "lora")]
    if base_model:
        all_tags.append(f"base_model:adapter:{base_model}")
    results = [
        EvalResult(task_type="text-generation", dataset_type=r["dataset_name"], dataset_name=r["dataset_name"],
                   dataset_split=r["dataset_split"], metric_type=r["metric_type"], metric_name=r["metric_name"],
                   metric_value=r["metric_value"])
        for r in (eval_results or []) if r is not None
    ]
    extra: dict[str, Any] = {}
    if weights:
        extra["base_model_weights"] = weights
    if license_ is None:
        extra["license_name"] = "same-as-base-model"
    data = ModelCardData(
        license=license_ or "other",
        base_model=base_model,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=all_tags,
        datasets=datasets or None,
        model_name=title,
        eval_results=results or None,
        **extra,
    )
    notice = "" if license_ else (
        "\n\n_License: the base model's license applies to this adapter; set `license` above before publishing._"
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body.strip()}{notice}\n")
    return str(card)
