"""Seconds per evaluation episode: the scorers before (one row per option, uncached generation) and now.

Run:
    python benchmarks/evaluate_speed.py [--model smollm2-135m] [--quantization nf4] [--tasks builtin]
        [--splits ...] [--split ...] [--max-tasks 4] [--episodes 2] [--query-size 8] [--steps 0,5]

One frozen base and one :class:`~deltameta.evaluate.runner.Evaluator` serve both paths. For every
task, episode and method (``zero-shot``, ``icl`` and the trained ``fresh-lora``, scored after each
of ``--steps`` adaptation steps), :meth:`Evaluator.run_method` runs twice on the same episode: once
with the current scorers (:mod:`deltameta.tasks.scoring`) and once with the scorers of git main
f2cba74, kept verbatim below (``legacy_*``: every option of a multiple-choice query re-runs the
whole prompt in its own row; greedy generation re-runs the whole sequence for every new token).
The current path also holds the 4-bit weights dequantized (:mod:`deltameta.dequantize_cache`) and
shares forwards (the support loss at a scored step comes from that adaptation step's own forward;
a fresh LoRA's step-0 scores are the zero-shot scores of the same episode, which ``zero-shot``
computed just before: a LoRA with B = 0 leaves the base's outputs unchanged), computes the query
loss of an episode in its scoring forward (one extra block per query, in the options' forward for
multiple choice and in the generation's prefill for free form, see
:func:`without_query_loss_in_scores`) and, for the trained methods, projects only the positions that
predict answer tokens onto the vocabulary (f2cba74 did so only without the PEFT wrapper, see
:func:`full_head_under_peft`); the f2cba74 path recomputes all of these in forwards of their own
and projects every position. Losses from the sparse head and from the scoring forward agree to
rounding, not bitwise. The order of the two alternates from episode to episode, so that both see
the same machine load. The script also checks that both paths give the same accuracies and counts
the losses that are bitwise equal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Sequence

import torch

# ------------------------------------------------------------------------------ the old scorers (f2cba74)


@torch.no_grad()
def legacy_score_multiple_choice(logits_fn, tokenizer, examples, template, max_length, in_context, batch_size, device):
    """``score_multiple_choice`` of f2cba74: one row per (example, option); returns (hits, hits_norm)."""
    from deltameta.tasks.encoding import IGNORE_INDEX, pad_token_id, tokenize_pairs, truncate_pair
    from deltameta.tasks.scoring import sequence_logprobs

    prompts, targets, owners = [], [], []
    for number, example in enumerate(examples):
        prompt = template.render_prompt(example, in_context or ())
        for option in example.options:
            prompts.append(prompt)
            targets.append(template.render_target(option))
            owners.append(number)
    pairs = [truncate_pair(p, t, max_length)[:2] for p, t in tokenize_pairs(tokenizer, prompts, targets, add_eos=False)]
    pad = pad_token_id(tokenizer)
    sums: list[float] = []
    counts: list[int] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(p) + len(t) for p, t in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, (p, t) in enumerate(chunk):
            ids[row, : len(p) + len(t)] = torch.tensor(p + t)
            mask[row, : len(p) + len(t)] = 1
            labels[row, len(p) : len(p) + len(t)] = torch.tensor(t)
        if device is not None:
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        total, count = sequence_logprobs(logits_fn(ids, mask), labels)
        sums.extend(total.tolist())
        counts.extend(count.tolist())
    scores: list[list[float]] = [[] for _ in examples]
    lengths: list[list[int]] = [[] for _ in examples]
    for owner, total, count in zip(owners, sums, counts):
        scores[owner].append(total)
        lengths[owner].append(count)
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    normalized = [[t / max(c, 1) for t, c in zip(s, n)] for s, n in zip(scores, lengths)]
    predictions_norm = [max(range(len(s)), key=s.__getitem__) for s in normalized]
    return (sum(p in e.correct for p, e in zip(predictions, examples)),
            sum(p in e.correct for p, e in zip(predictions_norm, examples)))


@torch.no_grad()
def legacy_greedy_generate(logits_fn, prompts: Sequence[Sequence[int]], max_new_tokens, stop_ids, pad_id, device):
    """``greedy_generate`` of f2cba74: no cache, the whole sequence for every new token."""
    rows = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows)))
    stops = set(stop_ids)
    for _ in range(max_new_tokens):
        if not active:
            break
        width = max(len(rows[i]) for i in active)
        ids = torch.full((len(active), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(active):
            ids[row, : len(rows[i])] = torch.tensor(rows[i])
            mask[row, : len(rows[i])] = 1
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
        logits = logits_fn(ids, mask)
        last = torch.tensor([len(rows[i]) - 1 for i in active], device=logits.device)
        chosen = logits[torch.arange(len(active), device=logits.device), last].argmax(-1).tolist()
        still = []
        for i, token in zip(active, chosen):
            if token in stops:
                continue
            rows[i].append(token)
            outputs[i].append(token)
            still.append(i)
        active = still
    return outputs


def legacy_score_free_form(logits_fn, tokenizer, examples, template, max_length, in_context, batch_size, device):
    """``score_free_form`` of f2cba74 (generation through ``logits_fn``); returns (hits, hits_norm)."""
    from deltameta.tasks.encoding import pad_token_id, tokenize_pairs
    from deltameta.tasks.scoring import normalize_answer

    prompts = [template.render_prompt(e, in_context or ()) for e in examples]
    targets = [template.render_target(e.target) for e in examples]
    pairs = tokenize_pairs(tokenizer, prompts, targets, add_eos=False)
    max_new_tokens = max(len(t) for _, t in pairs) + 4
    prompt_ids = [p[-max(1, max_length - max_new_tokens) :] for p, _ in pairs]
    stops = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]
    texts = []
    for start in range(0, len(prompt_ids), batch_size):
        generated = legacy_greedy_generate(logits_fn, prompt_ids[start : start + batch_size], max_new_tokens, stops,
                                           pad_token_id(tokenizer), device)
        texts.extend(tokenizer.decode(g, skip_special_tokens=True) for g in generated)
    predictions = [text.strip().split("\n", 1)[0].strip() if text.strip() else "" for text in texts]
    return (sum(p == e.target.strip() for p, e in zip(predictions, examples)),
            sum(normalize_answer(p) == normalize_answer(e.target) for p, e in zip(predictions, examples)))


def legacy_evaluate_examples(logits_fn, tokenizer, examples, template, max_length, in_context, batch_size, device):
    """``evaluate_examples`` of f2cba74."""
    mc = [e for e in examples if e.options is not None]
    free = [e for e in examples if e.options is None]
    hits = hits_norm = 0.0
    for part, scorer in ((mc, legacy_score_multiple_choice), (free, legacy_score_free_form)):
        if part:
            h, hn = scorer(logits_fn, tokenizer, part, template, max_length, in_context, batch_size, device)
            hits, hits_norm = hits + h, hits_norm + hn
    count = max(len(examples), 1)
    return {"accuracy": hits / count, "accuracy_norm": hits_norm / count, "count": float(len(examples))}


def _legacy_score(self, episode: Any, in_context: bool, answer_loss: bool = False) -> dict[str, float]:
    """``Evaluator._score`` of f2cba74 over the legacy scorers (``logits_fn(ids, mask)``, all logits).

    ``answer_loss`` is refused: f2cba74 computed the query loss in a forward of its own.
    """
    if answer_loss:
        raise ValueError("the f2cba74 scorers do not compute the query loss; use without_query_loss_in_scores")
    from deltameta.finetune import common

    c = self.config
    return legacy_evaluate_examples(common.logits_fn(self.model, self.autocast), self.tokenizer, episode.query,
                                    episode.task.template, self._max_length(in_context),
                                    episode.support if in_context else None,
                                    c.batch_size, self.device)


@contextlib.contextmanager
def legacy_scoring(evaluator: Any):
    """Make ``evaluator`` score with the f2cba74 scorers inside the block."""
    evaluator._score = types.MethodType(_legacy_score, evaluator)
    try:
        yield
    finally:
        del evaluator._score


@contextlib.contextmanager
def without_dequantize_cache(evaluator: Any):
    """Inside the block, the 4-bit layers dequantize on every call again (the cache stays built)."""
    import bitsandbytes as bnb

    models = torch.nn.ModuleList([evaluator.model] + ([evaluator.delta.model] if evaluator.delta is not None else []))
    saved = [(m, m.__dict__.pop("forward")) for m in models.modules()
             if isinstance(m, bnb.nn.Linear4bit) and "forward" in m.__dict__]
    try:
        yield
    finally:
        for module, forward in saved:
            module.forward = forward


@contextlib.contextmanager
def without_shared_forwards(evaluator: Any):
    """Recompute the support loss at every scored step and a fresh LoRA's step-0 scores (as f2cba74 did)."""
    evaluator.shared_forwards = False
    try:
        yield
    finally:
        evaluator.shared_forwards = True


@contextlib.contextmanager
def without_query_loss_in_scores(evaluator: Any):
    """Compute the query loss in a forward of its own at every scored step (as f2cba74 did)."""
    evaluator.query_loss_from_scores = False
    try:
        yield
    finally:
        evaluator.query_loss_from_scores = True


@contextlib.contextmanager
def full_head_under_peft():
    """Inside the block, a ``PeftModel``'s loss projects every position onto the vocabulary (as f2cba74 did).

    f2cba74 asked the wrapper's own ``forward`` signature whether ``logits_to_keep`` is accepted;
    ``PeftModel.forward`` takes ``**kwargs``, so the adapted methods never used the sparse head.
    """
    import inspect

    from deltameta.meta import functional

    current = functional.forward_accepts
    functional.forward_accepts = lambda model, keyword: keyword in inspect.signature(model.forward).parameters
    try:
        yield
    finally:
        functional.forward_accepts = current


def _before(evaluator: Any):
    """The "before" path: f2cba74 scorers and loss head, no dequantize cache, no shared forwards or query loss."""
    stack = contextlib.ExitStack()
    stack.enter_context(legacy_scoring(evaluator))
    stack.enter_context(full_head_under_peft())
    stack.enter_context(without_shared_forwards(evaluator))
    stack.enter_context(without_query_loss_in_scores(evaluator))
    if evaluator.config.quantization != "none":
        stack.enter_context(without_dequantize_cache(evaluator))
    return stack


# ------------------------------------------------------------------------------ measurement


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (task, episode, method) with both scorers; return per-method seconds and agreement."""
    from deltameta.config import build_config
    from deltameta.evaluate.config import EvaluateConfig
    from deltameta.evaluate.runner import Evaluator
    from deltameta.finetune import common

    steps = [int(s) for s in args.steps.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        values = dict(model=args.model, quantization=args.quantization, device=args.device, tasks=args.tasks,
                      splits=args.splits, split=args.split, max_tasks=args.max_tasks, episodes=args.episodes,
                      shots=args.shots, query_size=args.query_size, steps=steps, methods=methods,
                      max_length=args.max_length, seed=args.seed, plots=False, progress=False, output_dir=tmp)
        if args.tasks.startswith("builtin"):
            values.update(builtin_tasks_per_family=args.builtin_tasks_per_family,
                          builtin_examples_per_task=args.builtin_examples_per_task)
        config = build_config(EvaluateConfig, overrides=values)
        evaluator = Evaluator(config, Path(tmp), model=common.load_frozen_base(config))
        seconds = {m: {"before": 0.0, "after": 0.0} for m in methods}
        agree = {m: [0, 0] for m in methods}
        losses = {m: {"bitwise": 0, "total": 0, "max_abs_diff": 0.0} for m in methods}
        runs = {m: 0 for m in methods}
        load = [os.getloadavg()[0]]
        cache = contextlib.ExitStack()
        started = time.perf_counter()
        cache_bytes = cache.enter_context(evaluator.dequantize_cache())
        cache_seconds = time.perf_counter() - started  # once per evaluation; added to "after" below
        with cache:
            _episodes(evaluator, methods, seconds, agree, losses, runs)
        load.append(os.getloadavg()[0])
        trained = [m for m in methods if m not in ("zero-shot", "icl")]
        for m in trained[:1]:
            seconds[m]["after"] += cache_seconds
        kinds = sorted({"multiple choice" if t.is_multiple_choice else "free form" for t in evaluator.tasks})
        return {"model": args.model, "quantization": args.quantization, "device": str(evaluator.device),
                "threads": torch.get_num_threads(), "tasks": [t.name for t in evaluator.tasks], "kinds": kinds,
                "steps": steps, "episodes": args.episodes, "query_size": config.query_size, "shots": config.shots,
                "seconds": seconds, "runs": runs, "agree": agree, "losses": losses, "load_average": load,
                "dequantize_cache": {"bytes": cache_bytes, "seconds": cache_seconds}}


def _episodes(evaluator, methods, seconds, agree, losses, runs) -> None:
    """Every (task, episode, method) on both paths, alternating which runs first."""
    number = 0
    for task in evaluator.tasks:
        for episode in evaluator.episodes_of(task):
            for method in methods:
                order = ("before", "after") if number % 2 == 0 else ("after", "before")
                number += 1
                outcome = {}
                for path in order:
                    with _before(evaluator) if path == "before" else contextlib.nullcontext():
                        started = time.perf_counter()
                        outcome[path] = evaluator.run_method(method, episode)
                        seconds[method][path] += time.perf_counter() - started
                for key in ("accuracy", "accuracy_norm"):
                    for s in outcome["after"][key]:
                        agree[method][0] += outcome["after"][key][s] == outcome["before"][key][s]
                        agree[method][1] += 1
                for key in ("support_loss", "query_loss"):
                    for s, after in outcome["after"].get(key, {}).items():
                        before = outcome["before"][key][s]
                        if after is None:
                            continue
                        losses[method]["total"] += 1
                        losses[method]["bitwise"] += after == before
                        losses[method]["max_abs_diff"] = max(losses[method]["max_abs_diff"], abs(after - before))
                runs[method] += 1


def _losses(result: dict[str, Any], method: str) -> str:
    figures = result["losses"][method]
    if not figures["total"]:
        return "-"
    return f"{figures['bitwise']}/{figures['total']} ({figures['max_abs_diff']:.1e})"


def table(result: dict[str, Any]) -> str:
    """The markdown table of :func:`measure`'s figures."""
    lines = ["| method | episodes | s/episode before | s/episode after | speedup | same accuracies | "
             "bitwise-equal losses (max abs diff) |", "|---|---|---|---|---|---|---|"]
    for method, s in result["seconds"].items():
        n = max(result["runs"][method], 1)
        same, total = result["agree"][method]
        lines.append(f"| {method} | {result['runs'][method]} | {s['before'] / n:.2f} | {s['after'] / n:.2f} | "
                     f"{s['before'] / max(s['after'], 1e-9):.1f}x | {same}/{total} | {_losses(result, method)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "none"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", default="builtin", help="task source (as evaluate's tasks=)")
    parser.add_argument("--splits", default="train=0.75,validation=0.25", help="as evaluate's splits=")
    parser.add_argument("--split", default="validation", help="as evaluate's split=")
    parser.add_argument("--max-tasks", type=int, default=4, help="tasks (spread over the split's families)")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per task")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--query-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", default="0,5", help="adaptation steps at which the trained method is scored")
    parser.add_argument("--methods", default="zero-shot,icl,fresh-lora")
    parser.add_argument("--builtin-tasks-per-family", type=int, default=16)
    parser.add_argument("--builtin-examples-per-task", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    args = parser.parse_args(argv)
    from deltameta.base import prepare

    prepare(args.model, args.quantization)  # the one-time conversion is not measured
    result = measure(args)
    print(f"model: {result['model']} ({result['quantization']}), device: {result['device']}, torch threads: "
          f"{result['threads']}; tasks `{args.tasks}` split `{args.split}`: {len(result['tasks'])} tasks "
          f"({', '.join(result['kinds'])}) x {args.episodes} episodes, k={result['shots']}, {result['query_size']} "
          f"queries, steps {result['steps']}; 1-min load average {result['load_average'][0]:.1f} -> "
          f"{result['load_average'][1]:.1f} on {os.cpu_count()} CPUs\n")
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "result": result}, indent=2))


if __name__ == "__main__":
    main()
