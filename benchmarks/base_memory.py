"""Resident memory after loading the base model: fp32 vs NF4 (each in a fresh process).

Run:
    python benchmarks/base_memory.py [--model smollm2-135m]

Each variant is loaded in its own child process (after ``deltameta models prepare`` has cached
it, so the one-time conversion is not measured) and the child reports its resident set size
(RSS) before ``load_base`` and after it plus one forward pass (which touches every weight;
safetensors files are memory-mapped until read), plus the bytes held by the model's tensors.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, psutil, torch
process = psutil.Process()
import bitsandbytes, transformers.models.llama.modeling_llama  # imported in both cases: not measured
import deltameta.base as base
before = process.memory_info().rss
model, tokenizer = base.load_base(sys.argv[1], quantization=sys.argv[2], device="cpu")
with torch.no_grad():  # touch every weight (safetensors are memory-mapped until used)
    model(**tokenizer(["What is the capital of France?"], return_tensors="pt"))
after = process.memory_info().rss
tensor_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(json.dumps({"rss_before": before, "rss_after": after, "tensor_bytes": tensor_bytes}))
"""


def measure(model: str, quantization: str) -> dict:
    """Load ``model`` in a child process and return its memory figures (bytes)."""
    output = subprocess.run([sys.executable, "-c", CHILD, model, quantization], capture_output=True, text=True, check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    from deltameta.base import prepare

    for quantization in ("none", "nf4"):
        prepare(args.model, quantization)
    mib = 2**20
    rows = {q: measure(args.model, q) for q in ("none", "nf4")}
    print(f"model: {args.model}")
    print("| quantization | RSS after load + forward (MiB) | RSS added (MiB) | model tensors (MiB) |")
    print("|---|---|---|---|")
    for q, r in rows.items():
        label = "fp32 (none)" if q == "none" else q
        print(f"| {label} | {r['rss_after'] / mib:.0f} | {(r['rss_after'] - r['rss_before']) / mib:.0f} | {r['tensor_bytes'] / mib:.0f} |")
    ratio = (rows["nf4"]["rss_after"] - rows["nf4"]["rss_before"]) / (rows["none"]["rss_after"] - rows["none"]["rss_before"])
    print(f"NF4 load adds {ratio:.2f}x the resident memory of the fp32 load")


if __name__ == "__main__":
    main()
