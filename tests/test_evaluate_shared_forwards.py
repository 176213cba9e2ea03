"""evaluate's shared forwards change no number: support losses from adapt, a fresh LoRA's step 0 from zero-shot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltameta.config import build_config
from deltameta.evaluate import EvaluateConfig
from deltameta.evaluate.runner import PEFT_NAME, Evaluator
from deltameta.finetune import common


@pytest.fixture(scope="module", params=["nf4", "none"])
def evaluator(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"shared-{request.param}")
    config = build_config(EvaluateConfig, overrides=dict(
        model="tiny-random-llama", quantization=request.param, device="cpu", tasks="builtin", max_tasks=3,
        episodes=2, shots=3, query_size=3, steps=[0, 1, 3], max_length=64, methods=["zero-shot", "fresh-lora"],
        plots=False, progress=False, output_dir=str(out)))
    return Evaluator(config, Path(out), model=common.load_frozen_base(config))


def _run_all(evaluator: Evaluator, shared: bool) -> tuple[list[dict], int]:
    """Every (task, episode, method) with ``shared_forwards`` set; the results and the scoring calls."""
    calls = 0
    score = evaluator._score

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return score(*args, **kwargs)

    evaluator.shared_forwards = shared
    evaluator._base_scores = None
    evaluator._score = counting
    try:
        outcomes = [evaluator.run_method(method, episode)
                    for task in evaluator.tasks for episode in evaluator.episodes_of(task)
                    for method in evaluator.methods]
    finally:
        del evaluator._score
        evaluator.shared_forwards = True
    return outcomes, calls


def test_shared_forwards_give_bitwise_the_same_results(evaluator):
    shared, shared_calls = _run_all(evaluator, shared=True)
    separate, separate_calls = _run_all(evaluator, shared=False)
    episodes = len(evaluator.tasks) * evaluator.config.episodes
    # per episode: zero-shot 1 + fresh-lora 3 scored steps without sharing; fresh-lora's step 0 reused with it
    assert separate_calls == episodes * 4
    assert shared_calls == episodes * 3
    for a, b in zip(shared, separate):
        for key in ("accuracy", "accuracy_norm", "support_loss", "query_loss"):
            assert a.get(key) == b.get(key), key
    losses = [v for outcome in shared if "query_loss" in outcome for v in outcome["support_loss"].values()]
    assert losses and all(isinstance(v, float) for v in losses)


def test_zero_shot_scores_are_computed_once_per_episode(evaluator):
    episode = evaluator.episodes_of(evaluator.tasks[0])[0]
    evaluator._base_scores = None
    first = evaluator.run_method("zero-shot", episode)
    assert evaluator._base_scores is not None and evaluator._base_scores[0] is episode
    cached = evaluator._base_scores[1]
    assert evaluator.run_method("zero-shot", episode)["accuracy"] == first["accuracy"]
    assert evaluator._base_scores[1] is cached
    other = evaluator.episodes_of(evaluator.tasks[0])[1]
    evaluator.run_method("zero-shot", other)
    assert evaluator._base_scores[0] is other


def test_only_a_lora_with_zero_b_counts_as_the_base(evaluator):
    start = {n: t.clone() for n, t in evaluator.initial[PEFT_NAME["fresh-lora"]].items()}
    assert evaluator._leaves_base_unchanged("fresh-lora", start)
    assert not evaluator._leaves_base_unchanged("multitask", start)
    moved = {n: (t + 1e-3 if "lora_B" in n else t) for n, t in start.items()}
    assert not evaluator._leaves_base_unchanged("fresh-lora", moved)
    only_a = {n: t for n, t in start.items() if "lora_A" in n}
    assert not evaluator._leaves_base_unchanged("fresh-lora", only_a)
    assert torch.equal(next(iter(start.values())), next(iter(evaluator.initial[PEFT_NAME["fresh-lora"]].values())))


@pytest.fixture(scope="module")
def mixed_evaluator(tmp_path_factory):
    """One multiple-choice and one free-form built-in family."""
    out = tmp_path_factory.mktemp("shared-mixed")
    config = build_config(EvaluateConfig, overrides=dict(
        model="tiny-random-llama", quantization="nf4", device="cpu", tasks="builtin:kv_lookup,base_arith",
        splits="train=1", split="train", max_tasks=2, episodes=2, shots=3, query_size=3, steps=[0, 1, 3],
        max_length=64, methods=["zero-shot", "fresh-lora"], plots=False, progress=False, output_dir=str(out)))
    return Evaluator(config, Path(out), model=common.load_frozen_base(config))


def test_query_loss_from_the_scoring_forward_equals_its_own_forward(mixed_evaluator):
    """The query loss rides in the scoring forward (MC) or the prefill (free form): same numbers, fewer forwards."""
    evaluator = mixed_evaluator
    embeddings = evaluator.model.get_input_embeddings()
    forwards = 0

    def count(*_):
        nonlocal forwards
        forwards += 1

    handle = embeddings.register_forward_pre_hook(count)
    runs = {}
    try:
        for riding in (True, False):
            evaluator.query_loss_from_scores = riding
            forwards = 0
            runs[riding] = (_run_all(evaluator, shared=True)[0], forwards)
    finally:
        handle.remove()
        evaluator.query_loss_from_scores = True
    (riding, riding_forwards), (separate, separate_forwards) = runs[True], runs[False]
    steps = len(evaluator.config.steps)
    mc_episodes = sum(t.is_multiple_choice for t in evaluator.tasks) * evaluator.config.episodes
    episodes = len(evaluator.tasks) * evaluator.config.episodes
    assert 0 < mc_episodes < episodes
    assert separate_forwards - riding_forwards == episodes * steps  # one query-loss forward per scored step
    compared = 0
    for a, b in zip(riding, separate):
        for key in ("accuracy", "accuracy_norm", "support_loss"):
            assert a.get(key) == b.get(key), key
        for step, loss in b.get("query_loss", {}).items():
            assert a["query_loss"][step] == pytest.approx(loss, rel=1e-5)
            compared += 1
    assert compared == episodes * steps
