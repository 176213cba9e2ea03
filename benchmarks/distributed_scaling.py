"""Task-parallel meta-training: throughput with 1 vs N processes (``torchrun``) on this machine.

Run:
    python benchmarks/distributed_scaling.py [--model tiny-random-llama|smollm2-135m] [--procs 1,2]

Every variant runs the same short meta-train (same seed, the same global meta-batch) as a fresh
``torchrun --nproc_per_node N -m deltameta meta-train`` (N = 1 runs a plain single process), with
``--threads`` intra-op threads per process (``OMP_NUM_THREADS``). Throughput is read back from the
run's ``metrics.jsonl``: the global meta-batch's tokens (support x inner steps + query) over the
outer steps after ``--warmup`` steps, divided by their wall-clock seconds on rank 0 (which include
the gradient all-reduce). Scaling efficiency is ``tokens/s(N) / (N x tokens/s(1))``.

Validation, checkpoints, plots and the export are off so that only the outer steps are timed.
Fair comparisons need ``N x threads`` cores free: on a 2-core machine, compare ``--threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: The meta-train recipe of each model (small enough for a CPU; the GPU numbers use the same).
RECIPES = {
    "tiny-random-llama": dict(quantization="none", tasks="builtin", builtin_tasks_per_family=4,
                              builtin_examples_per_task=16, max_length=96, rank=4,
                              ops="[tarp-4,lora-2,skip]", target_modules="[q_proj,v_proj,o_proj]"),
    "smollm2-135m": dict(quantization="nf4", tasks="builtin", builtin_tasks_per_family=4,
                         builtin_examples_per_task=16, max_length=96),
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(model: str, procs: int, args: argparse.Namespace, root: Path) -> dict:
    """Meta-train with ``procs`` processes; return the throughput figures of rank 0's metrics."""
    out = root / f"{model}-{procs}"
    keys = dict(RECIPES[model], model=model, outer_steps=args.steps, meta_batch_size=args.meta_batch_size,
                task_batched=str(not args.looped).lower(), eval_every=0, val_split="", checkpoint_every=0,
                plots="false", export="false", progress="false", output_dir=str(out))
    overrides = [f"{k}={v}" for k, v in keys.items()] + list(args.overrides)
    if procs == 1:
        command = [sys.executable, "-m", "deltameta", "meta-train", *overrides]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "deltameta", "meta-train",
                   *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{procs} process(es) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("kind") == "train"][args.warmup:]
    if not steps:
        sys.exit(f"no outer steps left after --warmup {args.warmup}; raise --steps.")
    tokens = sum(r["tokens"] for r in steps)
    seconds = sum(r["seconds"] for r in steps)
    return {"procs": procs, "tokens_per_s": tokens / seconds, "step_s": seconds / len(steps),
            "loss": steps[-1]["query_after"], "wall_s": wall, "memory_mb": max(r["memory_mb"] for r in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random-llama", choices=sorted(RECIPES))
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts (each must divide the meta-batch)")
    parser.add_argument("--steps", type=int, default=8, help="outer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="outer steps left out of the timing")
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--looped", action="store_true", help="loop over each rank's tasks instead of task-batching them")
    parser.add_argument("--keep", metavar="DIR", help="keep the run directories under DIR")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra meta-train keys")
    args = parser.parse_args()
    counts = [int(p) for p in args.procs.split(",")]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="deltameta-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = [run(args.model, n, args, root) for n in counts]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    base = next((r for r in results if r["procs"] == 1), None)
    print(f"model: {args.model}, meta_batch_size={args.meta_batch_size}, {args.steps} outer steps "
          f"({args.warmup} warmup), {args.threads} thread(s)/process, task_batched={not args.looped}, "
          f"{os.cpu_count()} CPUs visible")
    print("| processes | tokens/s | s/outer step | scaling efficiency | peak memory/rank (MiB) | final query loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        efficiency = f"{r['tokens_per_s'] / (r['procs'] * base['tokens_per_s']):.0%}" if base else "-"
        print(f"| {r['procs']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {efficiency} | {r['memory_mb']:.0f} "
              f"| {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
