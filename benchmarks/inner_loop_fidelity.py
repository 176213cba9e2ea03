"""Does ``evaluate`` adapt a meta-adapter the way it was meta-trained? Query loss after the trained steps.

For every held-out episode ``evaluate`` draws, this prints the query loss before adaptation and
after the run's trained number of inner steps for

* ``inner loop``: the meta-train inner loop itself (``algorithm.adapt`` on the meta-state, with
  the controller's structure chosen from the episode's support set, as in meta-training);
* ``meta``: ``evaluate``'s static PEFT export adapted as PEFT LoRA;
* ``meta-dynamic``: ``evaluate``'s dynamic variant;

``meta`` and ``meta-dynamic`` run with ``evaluate``'s default adaptation settings, so the same
script measures any version of deltameta: run it with ``PYTHONPATH`` at an older checkout to get
the "before" numbers on the same run directory and the same episodes.

    python benchmarks/inner_loop_fidelity.py --model tiny-random-llama            # smoke: trains a tiny run
    deltameta meta-train outer_steps=8 output_dir=/tmp/d10_run                    # smollm2-135m, default recipe
    python benchmarks/inner_loop_fidelity.py --run /tmp/d10_run --max-tasks 3 --episodes 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY_RUN = dict(model="tiny-random-llama", quantization="none", tasks="builtin:caesar,string_op,kv_lookup,linear",
                splits="train=0.5,validation=0.5", builtin_tasks_per_family=3, builtin_examples_per_task=8, shots=2,
                query_size=2, max_length=96, rank=2, delta="tarp", controller="global", ops=["tarp-2", "lora-2"],
                target_modules=["q_proj", "v_proj"], outer_steps=6, meta_batch_size=2, inner_steps=2, eval_every=0,
                checkpoint_every=0, progress=False, plots=False, export=True)


def train_tiny_run(directory: Path) -> Path:
    """A tiny TARP + global-controller run (seconds), exported."""
    from deltameta.config import build_config
    from deltameta.meta.config import MetaTrainConfig
    from deltameta.meta.trainer import run_meta_train

    run_meta_train(build_config(MetaTrainConfig, overrides=dict(TINY_RUN, output_dir=str(directory))))
    return directory


def run_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "final" / "meta_state.json").read_text())["config"]


def evaluate_losses(run_dir: Path, cfg: dict, episodes: int, max_tasks: int, out: Path) -> tuple[dict, list]:
    """Query losses of meta and meta-dynamic at steps 0 and k, from evaluate's own adaptation."""
    from deltameta.config import build_config
    from deltameta.evaluate import EvaluateConfig, Evaluator
    from deltameta.finetune import common
    from deltameta.tasks import encode_examples

    k = int(cfg["inner_steps"])
    config = build_config(EvaluateConfig, overrides=dict(
        model=cfg["model"], quantization=cfg["quantization"], adapter=str(run_dir), methods=["meta", "meta-dynamic"],
        tasks=cfg["tasks"], splits=cfg["splits"], split="validation",
        builtin_tasks_per_family=cfg["builtin_tasks_per_family"], builtin_examples_per_task=cfg["builtin_examples_per_task"],
        episodes=episodes, max_tasks=max_tasks, shots=cfg["shots"], query_size=cfg["query_size"],
        max_length=cfg["max_length"], steps=[0, k], seed=0, plots=False, progress=False, output_dir=str(out)))

    class Probe(Evaluator):
        """Records the query loss wherever evaluate scores (any deltameta version calls ``_score``)."""

        def _score(self, episode, in_context, **kwargs):
            scores = super()._score(episode, in_context, **kwargs)
            batch = encode_examples(self.tokenizer, list(episode.query), episode.task.template, self.config.max_length)
            with torch.no_grad():
                loss = float(common.batch_loss(self.model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
                                               self.device))
            self.probed.append(loss)
            return scores

    out.mkdir(parents=True, exist_ok=True)
    evaluator = Probe(config, out)
    losses: dict[str, list[tuple[float, float]]] = {"meta": [], "meta-dynamic": []}
    episodes_list = []
    for task in evaluator.tasks:
        for episode in evaluator.episodes_of(task):
            episodes_list.append((task, episode))
            for method in losses:
                evaluator.probed = []
                evaluator.run_method(method, episode)
                losses[method].append((evaluator.probed[0], evaluator.probed[-1]))
    return losses, episodes_list


def inner_loop_losses(run_dir: Path, cfg: dict, episodes: list) -> list[tuple[float, float]]:
    """The meta-train inner loop on the same episodes (structure chosen from each support set)."""
    import contextlib

    from deltameta.deltas import build_from_meta_state, delta_parameters, task_embedding
    from deltameta.meta import data
    from deltameta.meta.algorithms import InnerLoop, make_algorithm
    from deltameta.meta.functional import lm_loss_fn

    model, tokenizer, controller = build_from_meta_state(run_dir, device="cpu")
    inner = InnerLoop(steps=int(cfg["inner_steps"]), lr=float(cfg["inner_lr"]), first_order=True,
                      clip=float(cfg.get("inner_clip") or 0) or None, optimizer=cfg.get("inner_optimizer", "sgd"))
    algorithm = make_algorithm(cfg["algorithm"], model, delta_parameters(model), inner,
                               loss_fn_factory=lambda m, groups: lm_loss_fn(m, groups=groups, use_cache=False))
    rates_file = run_dir / "final" / "inner_lrs.safetensors"
    if rates_file.is_file() and algorithm.extra_parameters():
        from safetensors.torch import load_file

        rates = load_file(str(rates_file))
        with torch.no_grad():
            for name, rate in algorithm.extra_parameters().items():
                rate.copy_(rates[name.removeprefix("metasgd_lr.")])
    out = []
    for task, episode in episodes:
        support = data.encode(tokenizer, task, episode.support, cfg["max_length"])
        query = data.encode(tokenizer, task, episode.query, cfg["max_length"])
        structure = contextlib.nullcontext()
        if controller is not None:
            emb = task_embedding(model, support["input_ids"], support["attention_mask"]) if controller.mode == "task" else None
            structure = controller.apply(model, controller.decision_weights(controller.decide(emb)))
        with structure:
            loss_fn = algorithm.loss_fn()
            with torch.no_grad():
                before = float(loss_fn(algorithm.params, query))
            fast = algorithm.adapt(algorithm.params, support, first_order=True)
            with torch.no_grad():
                after = float(loss_fn({k: v.detach() for k, v in fast.items()}, query))
        out.append((before, after))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="tiny-random-llama: train a tiny TARP run first (smoke mode)")
    parser.add_argument("--run", default=None, help="a finished meta-train run directory")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per held-out task")
    parser.add_argument("--max-tasks", type=int, default=3, help="held-out tasks (0: all)")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            run_dir = Path(args.run)
        elif args.model == "tiny-random-llama":
            run_dir = train_tiny_run(Path(tmp) / "run")
        else:
            parser.error("give --run RUN_DIR, or --model tiny-random-llama for the smoke mode")
        cfg = run_config(run_dir)
        evaluated, episodes = evaluate_losses(run_dir, cfg, args.episodes, args.max_tasks, Path(tmp) / "eval")
        reference = inner_loop_losses(run_dir, cfg, episodes)
    k = int(cfg["inner_steps"])
    rows = []
    print(f"run {run_dir}: {cfg['model']} ({cfg['quantization']}), {cfg['algorithm']}, delta {cfg['delta']}, "
          f"controller {cfg['controller']}, inner loop {k} x {cfg.get('inner_optimizer', 'sgd')} lr {cfg['inner_lr']} "
          f"clip {cfg.get('inner_clip')}; deltameta from {Path(sys.modules['deltameta'].__file__).parent}")
    print(f"| episode | start (inner loop) | inner loop @{k} | meta @{k} | meta-dynamic @{k} | start (meta) | start (meta-dynamic) |")
    print("|---|---|---|---|---|---|---|")
    for (task, episode), ref, meta, dyn in zip(episodes, reference, evaluated["meta"], evaluated["meta-dynamic"]):
        rows.append({"episode": f"{task.name}#{episode.index}", "inner_loop": ref, "meta": meta, "meta-dynamic": dyn})
        print(f"| {task.name}#{episode.index} | {ref[0]:.4f} | {ref[1]:.4f} | {meta[1]:.4f} | {dyn[1]:.4f} | "
              f"{meta[0]:.4f} | {dyn[0]:.4f} |")
    mean = {key: sum(r[key][1] for r in rows) / len(rows) for key in ("inner_loop", "meta", "meta-dynamic")}
    start = {key: sum(r[key][0] for r in rows) / len(rows) for key in ("inner_loop", "meta", "meta-dynamic")}
    print(f"| mean of {len(rows)} | {start['inner_loop']:.4f} | {mean['inner_loop']:.4f} | {mean['meta']:.4f} | "
          f"{mean['meta-dynamic']:.4f} | {start['meta']:.4f} | {start['meta-dynamic']:.4f} |")
    gap = max(abs(r["meta-dynamic"][1] - r["inner_loop"][1]) / abs(r["inner_loop"][1]) for r in rows)
    print(f"max relative |meta-dynamic - inner loop| after {k} steps: {gap:.2e}; {time.perf_counter() - started:.0f} s")
    result = {"run": str(run_dir), "inner_steps": k, "episodes": rows, "mean_after": mean, "mean_start": start,
              "max_relative_gap_dynamic": gap}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not all(math.isfinite(v) for v in mean.values()):
        raise SystemExit("non-finite query loss")
    return result


if __name__ == "__main__":
    main()
