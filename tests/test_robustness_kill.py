"""Issue 13: real kills. A meta-train subprocess is SIGKILLed while it writes a checkpoint and while it
writes the export, then resumed; the result matches an uninterrupted run bit for bit.

The subprocess is stopped at the exact point by ``DELTAMETA_TEST_PAUSE_AT`` (see
:func:`deltameta.atomic._test_pause`): it announces itself on stderr just before the new directory
is renamed into place and sleeps until it is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meta_helpers import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent
TIMING_KEYS = {"tokens_per_s", "seconds", "memory_mb"}
RUN = dict(TINY_RUN, controller="none", ops=["lora-2"], export=True)


def _argv(*args):
    words = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in RUN.items()]
    return [sys.executable, "-m", "deltameta", "meta-train", *words, *args]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("DELTAMETA_TEST_PAUSE_AT", None)
    env.update(extra)
    return env


def _killed_at(point, run_dir):
    """Start a run, SIGKILL it when it pauses at ``point``; return what it left."""
    env = _env(DELTAMETA_TEST_PAUSE_AT=point, DELTAMETA_TEST_PAUSE_SECONDS="120")
    process = subprocess.Popen(_argv(f"output_dir={run_dir}"), env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 240
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith(f"DELTAMETA_TEST_PAUSED {point}"):
            process.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "".join(seen[-20:])
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen[-20:])


def _rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines if line.strip()]


def _tensors(path):
    return load_file(str(path))


def _assert_identical(a, b):
    for file in ("final/deltas.safetensors", "peft/adapter_model.safetensors"):
        ta, tb = _tensors(a / file), _tensors(b / file)
        assert ta.keys() == tb.keys(), file
        for name in ta:
            assert torch.equal(ta[name], tb[name]), (file, name)
    assert _rows(a) == _rows(b)
    sa, sb = json.loads((a / "run.json").read_text()), json.loads((b / "run.json").read_text())
    assert sb["status"] == "finished" and sb["final_validation"] is not None
    for key in ("step", "skipped", "initial_validation", "final_validation", "best_validation"):
        assert sa[key] == sb[key], key
    leftovers = [p for p in b.rglob(".*") if p.name.endswith(".tmp") or ".old." in p.name]
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in this process: only the killed run needs its own)."""
    from deltameta.meta.trainer import run_meta_train
    from meta_helpers import tiny_config

    with _one_thread():
        return run_meta_train(tiny_config(tmp_path_factory.mktemp("kill"), **RUN)).run_dir


def _one_thread():
    from test_finetune_helpers import one_thread

    return one_thread()


@pytest.mark.parametrize("point", ["directory:step-000004", "directory:peft"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(reference, tmp_path, point):
    run_dir = tmp_path / "run"
    _killed_at(point, run_dir)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    name = point.split(":")[1]
    parent = run_dir / "checkpoints" if name.startswith("step-") else run_dir
    assert [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "killed inside the atomic write"
    assert not (parent / name).exists()
    from deltameta.cli import main

    with _one_thread():
        assert main(["meta-train", "--resume", str(run_dir)]) == 0
    _assert_identical(reference, run_dir)
