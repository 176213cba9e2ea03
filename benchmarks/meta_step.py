"""Meta-train throughput and memory vs plain PEFT LoRA training, on the same model and tokens.

Run:
    python benchmarks/meta_step.py [--model smollm2-135m] [--quantization nf4] [--steps 6] [--device cpu]

Variants, each in a fresh child process (so that peak memory does not mix):

* ``plain LoRA`` (the reference): ``peft.get_peft_model`` LoRA with the same rank, alpha and
  target modules on the same frozen base, AdamW. Per outer step and task it runs ``inner_steps``
  forward/backward passes on the task's support batch and one on its query batch — the same
  batches and the same number of passes as the meta-learners — accumulating into one AdamW step
  (with the same gradient clipping), using the engine's target-only loss.
* ``first-order (task loop)``: ``algorithm=fomaml task_batched=false``;
* ``second-order (task loop)``: ``algorithm=maml task_batched=false`` (attention in the math SDPA
  backend, as the engine runs it);
* ``first-order (task-batched)``: ``algorithm=fomaml task_batched=true``.

The meta-learners run the engine's own outer step (:meth:`MetaTrainer.train_step`: episode
sampling and encoding, the algorithm's task step, clipping, AdamW), with LoRA deltas and no
controller. All variants draw the same episodes (same task source, seed and sampler), so they
process the same tokens: every non-pad token of every forward pass, inner and outer, is counted
(``inner_steps`` x support + query per task). Warm-up steps are excluded from the timing.

Peak memory: on CPU the peak resident set size (``VmHWM``, reset after loading) minus the RSS
before the first step; on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated
before the first step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

#: Variant key -> (label, config overrides of a meta-learner or None for plain LoRA, target ratio).
VARIANTS: dict[str, tuple[str, dict[str, Any] | None, str]] = {
    "lora": ("plain PEFT LoRA (reference)", None, ""),
    "fomaml": ("first-order (task loop)", {"algorithm": "fomaml", "task_batched": False}, ">= 0.9x"),
    "maml": ("second-order (task loop)", {"algorithm": "maml", "task_batched": False}, ">= 0.4x"),
    "fomaml-batched": ("first-order (task-batched)", {"algorithm": "fomaml", "task_batched": True}, "> task loop"),
}


# ------------------------------------------------------------------------------------ memory


class PeakMemory:
    """Peak memory above the level at :meth:`start` (CUDA allocator, or process RSS on CPU)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0

    @staticmethod
    def _rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    @staticmethod
    def _hwm() -> int | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def start(self) -> None:
        """Record the baseline and reset the peak."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        self.baseline = self._rss()
        try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self.use_hwm = self._hwm() is not None
        except OSError:
            self.use_hwm = False
        if not self.use_hwm:  # elsewhere: sample the RSS
            self._sampled = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, self._rss())

    def peak_increase(self) -> int:
        """Bytes of the peak above the baseline."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        if self.use_hwm:
            return self._hwm() - self.baseline
        self._stop.set()
        self._thread.join()
        return max(self._sampled, self._rss()) - self.baseline


# ------------------------------------------------------------------------------------ children


def _config(args: argparse.Namespace, overrides: dict[str, Any], output_dir: str):
    from deltameta.config import build_config
    from deltameta.meta.config import MetaTrainConfig

    values = dict(
        model=args.model, quantization=args.quantization, device=args.device, delta="lora", controller="none",
        rank=args.rank, alpha=args.alpha, inner_steps=args.inner_steps, shots=args.shots, query_size=args.query_size,
        meta_batch_size=args.meta_batch_size, max_length=args.max_length, outer_steps=args.warmup + args.steps,
        seed=args.seed, val_split="", eval_every=0, checkpoint_every=0, export=False, plots=False, progress=False,
        output_dir=output_dir,
    )
    if args.target_modules:
        values["target_modules"] = args.target_modules.split(",")
    values.update(overrides)
    return build_config(MetaTrainConfig, overrides=values)


def _run_meta(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    from deltameta.meta.run_dir import prepare_run_dir
    from deltameta.meta.trainer import MetaTrainer

    with tempfile.TemporaryDirectory() as tmp:
        config = _config(args, overrides, os.path.join(tmp, "run"))
        trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
        memory = PeakMemory(trainer.device)
        memory.start()
        tokens, seconds = 0, 0.0
        for step in range(args.warmup + args.steps):
            started = time.perf_counter()
            row = trainer.train_step()
            _sync(trainer.device)
            if step >= args.warmup:
                seconds += time.perf_counter() - started
                tokens += int(row["tokens"])
        peak = memory.peak_increase()
        trainer.metrics.close()
    return {"tokens": tokens, "seconds": seconds, "peak_bytes": peak, "device": str(trainer.device)}


def _run_lora(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from deltameta.base import load_base, resolve_device
    from deltameta.finetune.common import fresh_lora_config
    from deltameta.meta import data
    from deltameta.meta.functional import MODEL_INPUT_KEYS, target_loss

    with tempfile.TemporaryDirectory() as tmp:
        config = _config(args, {"algorithm": "multitask"}, os.path.join(tmp, "run"))
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    dtype = None if config.compute_dtype == "auto" else config.compute_dtype
    base, tokenizer = load_base(config.model, config.quantization, compute_dtype=dtype, double_quant=config.double_quant,
                                device=device, seed=config.seed)
    from peft import get_peft_model

    model = get_peft_model(base, fresh_lora_config(config.rank, config.alpha, config.target_modules))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.outer_lr, weight_decay=config.weight_decay)
    # the meta-learners' episodes: same splits, same sampler seed
    sampler = data.make_sampler(data.load_splits(config).train, config, config.seed, "meta-train")
    passes = config.inner_steps + 1

    def encode(episode: Any) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device) for k, v in data.encode(tokenizer, episode.task, part, config.max_length).items()}
                for part in (episode.support, episode.query)]

    def step() -> int:
        tokens = 0
        episodes = sampler.sample_batch(config.meta_batch_size)
        scale = 1.0 / (len(episodes) * passes)
        for support, query in (encode(e) for e in episodes):
            for batch in [support] * config.inner_steps + [query]:
                inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
                loss = target_loss(model(**inputs, use_cache=False).logits, batch["labels"])
                (loss * scale).backward()
                tokens += int(batch["attention_mask"].sum())
        if config.meta_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.meta_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    memory = PeakMemory(device)
    memory.start()
    tokens, seconds = 0, 0.0
    for index in range(args.warmup + args.steps):
        started = time.perf_counter()
        count = step()
        _sync(device)
        if index >= args.warmup:
            seconds += time.perf_counter() - started
            tokens += count
    return {"tokens": tokens, "seconds": seconds, "peak_bytes": memory.peak_increase(), "device": device}


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def child(args: argparse.Namespace) -> None:
    """Measure one variant and print its figures as one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = VARIANTS[args.child][1]
    result = _run_lora(args) if overrides is None else _run_meta(args, overrides)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


# ------------------------------------------------------------------------------------ parent


def measure(variant: str, argv: list[str]) -> dict[str, Any]:
    """Run ``variant`` in a fresh child process and return its figures."""
    command = [sys.executable, os.path.abspath(__file__), "--child", variant, *argv]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"variant {variant} failed (exit code {done.returncode}); its stderr is above.")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown table of the measured variants."""
    reference = results.get("lora")
    ref_rate = reference["tokens"] / reference["seconds"] if reference else None
    loop_rate = results["fomaml"]["tokens"] / results["fomaml"]["seconds"] if "fomaml" in results else None
    lines = [
        "| variant | tokens (timed) | tokens/s | vs plain LoRA | target | met | peak memory increase (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        label, _, target = VARIANTS[key]
        rate = r["tokens"] / r["seconds"]
        ratio = rate / ref_rate if ref_rate else float("nan")
        met = ""
        if target.startswith(">= ") and ref_rate:
            met = "yes" if ratio >= float(target[3:-1]) else "no"
        elif target == "> task loop" and loop_rate:
            met = "yes" if rate > loop_rate else "no"
        lines.append(f"| {label} | {r['tokens']} | {rate:.0f} | {ratio:.2f}x | {target} | {met} | "
                     f"{r['peak_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "none"])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--steps", type=int, default=6, help="timed outer steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed outer steps before timing")
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--inner-steps", type=int, default=2)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--query-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--target-modules", default="", help="comma-separated (default: the meta-train default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    from deltameta.base import prepare

    prepare(args.model, args.quantization)  # the one-time conversion is not measured
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results = {}
    for variant in variants:
        print(f"measuring {VARIANTS[variant][0]} ...", file=sys.stderr, flush=True)
        results[variant] = measure(variant, forwarded)
    tokens = {r["tokens"] for r in results.values()}
    first = next(iter(results.values()))
    print(f"model: {args.model} ({args.quantization}), device: {first['device']}, torch threads: {first['threads']}, "
          f"{args.steps} timed outer steps after {args.warmup} warm-up; meta-batch {args.meta_batch_size} tasks x "
          f"({args.inner_steps} x {args.shots} support + {args.query_size} query examples), LoRA rank {args.rank}\n")
    print(table(results))
    if len(tokens) > 1:
        print("\nwarning: the variants processed different numbers of tokens; the comparison is not on the same data.")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
