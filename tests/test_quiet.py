"""Quiet by default: a CLI run prints no third-party warnings or loading bars; --verbose shows them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("Loading weights", "Writing model shards", "Warning", "warnings.warn", "kernels-community", "deprecated")


def _finetune(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS"):
        env.pop(name, None)
    # gradient checkpointing makes transformers raise its is_gradient_checkpointing FutureWarning
    command = [sys.executable, "-m", "deltameta", "finetune", "model=tiny-random-llama", "steps=1",
               "gradient_checkpointing=true", "progress=false", f"output_dir={tmp_path / 'ft'}", "--overwrite", *flags]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_third_party_noise_only_with_verbose(tmp_path, verbose):
    result = _finetune(tmp_path, *(["--verbose"] if verbose else []))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finetune finished: 1 steps" in result.stdout
    if verbose:  # the noise exists, so the quiet run's silence is a real test
        assert "Loading weights" in result.stderr and "is_gradient_checkpointing" in result.stderr
    else:
        found = [word for word in NOISE if word in result.stderr]
        assert not found, f"quiet run printed {found}:\n{result.stderr[-2000:]}"
        assert result.stderr.strip() == "", result.stderr[-2000:]


def test_version(capsys):
    from deltameta import __version__
    from deltameta.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"deltameta {__version__} (torch ") and "transformers" in out and out.count("\n") == 1
