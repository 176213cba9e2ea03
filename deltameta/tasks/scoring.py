"""Losses and scores: answer-only LM loss, multiple choice by log-likelihood, free-form by generation.

Every function takes a ``logits_fn(input_ids, attention_mask) -> logits`` callable rather than a
model, so callers can score a base model with adapter weights applied functionally, e.g.
``lambda ids, mask: torch.func.functional_call(model, params, (ids,), {"attention_mask": mask}).logits``.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from deltameta.errors import ConfigError
from deltameta.tasks.encoding import IGNORE_INDEX, pad_token_id, tokenize_pairs, truncate_pair
from deltameta.tasks.task import DEFAULT_TEMPLATE, Example, PromptTemplate

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (labels != -100), shifted for a causal LM.

    Args:
        logits: ``(batch, length, vocab)``; position ``t`` predicts token ``t + 1``.
        labels: ``(batch, length)`` token ids, ``-100`` where no loss is taken.

    Returns:
        A scalar: the mean over all answer tokens of the batch (0, still attached to the graph,
        when there are none), computed as :func:`grouped_lm_loss` with one group.
    """
    return grouped_lm_loss(logits, labels, 1)[0]


def grouped_lm_loss(logits: torch.Tensor, labels: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group :func:`lm_loss` of a batch made of ``groups`` equal contiguous groups (tasks).

    The loss is computed in the logits' dtype, with half precision upcast to float32 (float64
    stays float64, for exact gradient checks).

    Args:
        logits: ``(batch, length, vocab)`` with ``batch`` divisible by ``groups``.
        labels: ``(batch, length)`` with ``-100`` outside the answers.
        groups: Number of groups in the batch.

    Returns:
        ``(groups,)`` losses, each the mean over that group's answer tokens (0 for a group without
        any answer token).
    """
    return grouped_cross_entropy(logits[:, :-1, :], labels[:, 1:], groups)


def grouped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-group mean cross-entropy of aligned predictions: ``logits[:, i]`` predicts ``targets[:, i]``.

    Args:
        logits: ``(batch, positions, vocab)``; half precision is upcast to float32.
        targets: ``(batch, positions)`` token ids, ``-100`` where no loss is taken.
        groups: Number of equal contiguous groups in the batch.

    Returns:
        ``(groups,)`` mean losses over each group's counted positions (0 where there are none).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = targets.to(logits.device)
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(groups, -1)
    mask = (targets != IGNORE_INDEX).view(groups, -1).to(token_loss.dtype)
    return (token_loss * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of answer-token log-probabilities and the number of answer tokens.

    Args:
        logits: ``(batch, length, vocab)``.
        labels: ``(batch, length)`` with ``-100`` outside the answers.

    Returns:
        ``(sum_logprob, token_count)``, each of shape ``(batch,)``.
    """
    logprobs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    targets = labels[:, 1:].to(logits.device)
    mask = targets != IGNORE_INDEX
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


@dataclasses.dataclass
class MultipleChoiceResult:
    """Option scores and predictions.

    Attributes:
        scores: Per example, the summed log-likelihood of each option.
        lengths: Per example, the number of answer tokens of each option.
        predictions: Argmax of the summed log-likelihood, per example.
        predictions_norm: Argmax of the length-normalized (per-token) log-likelihood.
        accuracy: Fraction of ``predictions`` among the correct options.
        accuracy_norm: Same for ``predictions_norm``.
    """

    scores: list[list[float]]
    lengths: list[list[int]]
    predictions: list[int]
    predictions_norm: list[int]
    accuracy: float
    accuracy_norm: float


@torch.no_grad()
def score_multiple_choice(
    logits_fn: LogitsFn,
    tokenizer,
    examples: Sequence[Example],
    template: PromptTemplate | None = None,
    max_length: int = 256,
    in_context: Sequence[Example] | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> MultipleChoiceResult:
    """Score every option of multiple-choice examples by its log-likelihood after the prompt.

    Rows (one per example and option) are batched ``batch_size`` at a time. No EOS is appended
    to the options.

    Args:
        logits_fn: ``(input_ids, attention_mask) -> logits``.
        tokenizer: The tokenizer.
        examples: Multiple-choice examples.
        template: Prompt template (default :data:`~deltameta.tasks.task.DEFAULT_TEMPLATE`).
        max_length: Longest row (prompts are truncated on the left).
        in_context: Demonstrations put before every prompt.
        batch_size: Rows per ``logits_fn`` call.
        device: Where to put the batches (default: CPU tensors).

    Returns:
        The scores and accuracies.

    Raises:
        ConfigError: an example without options, or no examples.
    """
    if not examples:
        raise ConfigError("score_multiple_choice needs at least one example.")
    template = template or DEFAULT_TEMPLATE
    prompts, targets, owners = [], [], []
    for number, example in enumerate(examples):
        if example.options is None:
            raise ConfigError(f"example {number} has no options; score free-form examples with score_free_form.")
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
    hits = sum(p in e.correct for p, e in zip(predictions, examples))
    hits_norm = sum(p in e.correct for p, e in zip(predictions_norm, examples))
    return MultipleChoiceResult(
        scores=scores,
        lengths=lengths,
        predictions=predictions,
        predictions_norm=predictions_norm,
        accuracy=hits / len(examples),
        accuracy_norm=hits_norm / len(examples),
    )


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD-style)."""
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@torch.no_grad()
def greedy_generate(
    logits_fn: LogitsFn,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Greedy decoding through ``logits_fn`` (no cache: fine for short answers).

    Args:
        logits_fn: ``(input_ids, attention_mask) -> logits``.
        prompts: Token ids of each prompt.
        max_new_tokens: Most tokens generated per prompt.
        stop_ids: Tokens that end a generation (not included in the output).
        pad_id: Padding id (rows are right-padded, so padding never precedes real tokens).
        device: Where to put the batches.

    Returns:
        The generated token ids of each prompt.
    """
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


@dataclasses.dataclass
class FreeFormResult:
    """Generated answers and match rates.

    Attributes:
        predictions: Generated answer per example (first line, stripped).
        exact: Per example, whether the prediction equals the stripped target.
        normalized: Per example, whether they match after :func:`normalize_answer`.
        exact_match: Mean of ``exact``.
        normalized_match: Mean of ``normalized``.
    """

    predictions: list[str]
    exact: list[bool]
    normalized: list[bool]
    exact_match: float
    normalized_match: float


def score_free_form(
    logits_fn: LogitsFn | None,
    tokenizer,
    examples: Sequence[Example],
    template: PromptTemplate | None = None,
    max_length: int = 256,
    in_context: Sequence[Example] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    generate_fn: Callable[[list[str]], list[str]] | None = None,
    device: torch.device | str | None = None,
) -> FreeFormResult:
    """Generate answers greedily and compare them with the targets.

    Args:
        logits_fn: ``(input_ids, attention_mask) -> logits`` (or ``None`` with ``generate_fn``).
        tokenizer: The tokenizer.
        examples: The examples (options are ignored).
        template: Prompt template.
        max_length: Longest prompt (truncated on the left).
        in_context: Demonstrations put before every prompt.
        max_new_tokens: Generation budget (default: longest target in tokens + 4).
        batch_size: Prompts per batch.
        generate_fn: Alternative to ``logits_fn``: maps prompt texts to generated texts.
        device: Where to put the batches.

    Returns:
        Predictions and match rates; a prediction is the generated text up to the first newline.

    Raises:
        ConfigError: no examples, or neither ``logits_fn`` nor ``generate_fn``.
    """
    if not examples:
        raise ConfigError("score_free_form needs at least one example.")
    template = template or DEFAULT_TEMPLATE
    prompts = [template.render_prompt(e, in_context or ()) for e in examples]
    if generate_fn is not None:
        texts = list(generate_fn(prompts))
    elif logits_fn is not None:
        targets = [template.render_target(e.target) for e in examples]
        pairs = tokenize_pairs(tokenizer, prompts, targets, add_eos=False)
        if max_new_tokens is None:
            max_new_tokens = max(len(t) for _, t in pairs) + 4
        prompt_ids = [p[-max(1, max_length - max_new_tokens) :] for p, _ in pairs]
        stops = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]
        texts = []
        for start in range(0, len(prompt_ids), batch_size):
            generated = greedy_generate(
                logits_fn, prompt_ids[start : start + batch_size], max_new_tokens, stops, pad_token_id(tokenizer), device
            )
            texts.extend(tokenizer.decode(g, skip_special_tokens=True) for g in generated)
    else:
        raise ConfigError("score_free_form needs logits_fn or generate_fn.")
    predictions = [text.strip().split("\n", 1)[0].strip() if text.strip() else "" for text in texts]
    exact = [p == e.target.strip() for p, e in zip(predictions, examples)]
    normalized = [normalize_answer(p) == normalize_answer(e.target) for p, e in zip(predictions, examples)]
    return FreeFormResult(
        predictions=predictions,
        exact=exact,
        normalized=normalized,
        exact_match=sum(exact) / len(examples),
        normalized_match=sum(normalized) / len(examples),
    )


def evaluate_examples(
    logits_fn: LogitsFn,
    tokenizer,
    examples: Sequence[Example],
    template: PromptTemplate | None = None,
    max_length: int = 256,
    in_context: Sequence[Example] | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Score a mix of examples: multiple choice by log-likelihood, free-form by exact match.

    Returns:
        ``accuracy`` (summed-likelihood MC predictions and exact matches over all examples),
        ``accuracy_norm`` (length-normalized MC, normalized free-form match) and ``count``.
    """
    mc = [e for e in examples if e.options is not None]
    free = [e for e in examples if e.options is None]
    hits = hits_norm = 0.0
    if mc:
        result = score_multiple_choice(logits_fn, tokenizer, mc, template, max_length, in_context, batch_size, device)
        hits += result.accuracy * len(mc)
        hits_norm += result.accuracy_norm * len(mc)
    if free:
        generated = score_free_form(
            logits_fn, tokenizer, free, template, max_length, in_context, batch_size=batch_size, device=device
        )
        hits += generated.exact_match * len(free)
        hits_norm += generated.normalized_match * len(free)
    count = max(len(examples), 1)
    return {"accuracy": hits / count, "accuracy_norm": hits_norm / count, "count": float(len(examples))}
