"""Helpers shared by the finetune and evaluate tests (no tests here).

The meta-adapters the tests start from come from real, very short meta-training runs on
tiny-random-llama through the meta engine's Python API (``run_meta_train``); they are made once
per session under pytest's base temp dir and reused by every test module.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

#: Small meta-training runs: the meta-learner (TARP, first-order MAML) and the multitask baseline
#: with the same budget (2 outer steps x 2 tasks x (2 + 1) passes).
META_RUNS = {
    "meta": dict(algorithm="fomaml", delta="tarp", controller="none"),
    "multitask": dict(algorithm="multitask", delta="lora", controller="none"),
}

TINY = dict(model="tiny-random-llama", quantization="none", progress=False, plots=False)


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread (2 shared cores: oversubscription slows tiny models ~100x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def meta_runs(base_temp: Path) -> dict[str, Path]:
    """Return ``{"meta": RUN_DIR, "multitask": RUN_DIR}``, training them on first use."""
    from deltameta.config import build_config
    from deltameta.meta.config import MetaTrainConfig
    from deltameta.meta.trainer import run_meta_train
    from meta_helpers import TINY_RUN

    root = base_temp / "deltameta-meta-runs"
    runs = {}
    for name, overrides in META_RUNS.items():
        run_dir = root / name
        if not (run_dir / "peft" / "adapter_config.json").is_file():
            if run_dir.exists():
                shutil.rmtree(run_dir)
            values = dict(TINY_RUN, outer_steps=2, eval_every=0, checkpoint_every=0, export=True,
                          output_dir=str(run_dir), **overrides)
            with one_thread():
                run_meta_train(build_config(MetaTrainConfig, overrides=values))
        runs[name] = run_dir
    return runs


def copy_adapter_for_other_base(peft_dir: Path, target: Path, base: str = "HuggingFaceTB/SmolLM2-135M-Instruct") -> Path:
    """Copy an exported adapter and claim it was made for another base model."""
    shutil.copytree(peft_dir, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target
