"""Every script in benchmarks/ runs end to end on the tiny model (seconds each), so none can rot.

One row per script in :data:`SMOKE`: the arguments of a minimal run on ``tiny-random-llama`` and
a text its output must contain. A new benchmark script needs a row here (checked below).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

#: script -> (arguments of a minimal tiny-model run, text the output must contain)
SMOKE: dict[str, tuple[list[str], str]] = {
    "base_memory.py": (["--model", "tiny-random-llama"], "| nf4 |"),
    "distributed_scaling.py": (["--model", "tiny-random-llama", "--procs", "2", "--steps", "2", "--warmup", "1",
                                "--meta-batch-size", "2"], "| 2 |"),
    "evaluate_speed.py": (["--model", "tiny-random-llama", "--quantization", "none", "--max-tasks", "2", "--episodes", "1",
                           "--shots", "1", "--query-size", "2", "--steps", "0,1", "--max-length", "48",
                           "--builtin-tasks-per-family", "2", "--builtin-examples-per-task", "8"], "| fresh-lora | 2 |"),
    "inner_loop_fidelity.py": (["--model", "tiny-random-llama", "--max-tasks", "1", "--episodes", "1"], "meta-dynamic"),
    "metasgd_rate_grad.py": (["--model", "tiny-random-llama", "--quantization", "none", "--inner-steps", "1", "2",
                              "--steps", "1"], "| 2 |"),
    # built-in kv_lookup mixed into the fixture BIG-bench meta_train: every evaluation stage runs, on the
    # best/ states of runs validated on a held-out kv_lookup rule (BIG-bench tasks, one per family, stay)
    "study.py": (["--name", "smoke", "--smoke", "--out", "{tmp}", "--bigbench", "tests/fixtures/tasks/bigbench",
                  "--mix-builtin", "kv_lookup", "--checkpoint", "best", "--",
                  "val_holdout=0.5", "val_holdout_unit=task", "eval_every=1", "delta=lora"],
                 "| smoke | eval-dev (best/) | meta |"),
    # the committed five-family mixed dev tables: the pooled meta - twin row of benchmarks/README.md
    "pair_tables.py": ([arg for s in ("", "-seed1", "-seed2") for arg in
                        ("--pair", f"benchmarks/study/metasgd-lora-mc6-mix-hold-kv{s}-on-dev.md:meta",
                         f"benchmarks/study/metasgd-lora-mc6-mix-hold-kv{s}-on-dev.md:multitask")],
                       "| pooled (3 seeds, by task) | +0.8 ± 3.4 (n=20) |"),
    # seed 0's ICL comes from a second evaluation scored at step 0 only: the parts of a seed combine
    "pool_seeds.py": (["--smoke", "{tmp}", "--pairs", "fresh-lora-zero-shot,fresh-lora-icl"], "(n=4) |\n"),
    "tarp_fold.py": (["--model", "tiny-random-llama", "--val-episodes", "2"], "| least squares |"),
    "meta_step.py": (["--model", "tiny-random-llama", "--quantization", "none", "--device", "cpu", "--steps", "1",
                      "--warmup", "0", "--meta-batch-size", "2", "--inner-steps", "1", "--shots", "1", "--query-size", "1",
                      "--max-length", "32", "--threads", "1"], "| first-order (task-batched) |"),
}


def test_every_benchmark_has_a_smoke_row():
    scripts = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
    missing = [s for s in scripts if s not in SMOKE]
    assert not missing, f"add a row to SMOKE in {Path(__file__).name} for: {', '.join(missing)}"
    assert not [s for s in SMOKE if s not in scripts], "SMOKE names a script that is gone"


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke(script, tmp_path):
    args, expected = SMOKE[script]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{script} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    assert expected in done.stdout, f"{script} printed no '{expected}':\n{done.stdout[-2000:]}"
