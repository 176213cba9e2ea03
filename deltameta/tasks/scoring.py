"""Losses and scores: answer-only LM loss, multiple choice by log-likelihood, free-form by generation.

The scorers take a ``logits_fn`` callable rather than a model (see :data:`LogitsFn`;
:func:`deltameta.finetune.common.logits_fn` makes one from a model), so callers can score a base
model with adapters, hooks or weights applied functionally.

Multiple choice runs the shared prompt of a query once: the prompt and all its options are packed
in one row, each option attending to the prompt and to itself only (a block-causal 4-D mask) at the
positions it would have after the prompt, so every option gets exactly the log-likelihood it gets
in a row of its own, for one forward instead of one per option. Free-form answers are generated
greedily with a KV cache (the prompt runs once, then one token per step). Either scorer can also
return the loss of the answers (the query loss of an episode): one more block per example rides
in the forward that runs the prompt, and nothing scored attends to it.
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

LogitsFn = Callable[..., torch.Tensor]
"""``logits_fn(input_ids, attention_mask, *, position_ids=None, past_key_values=None, logits_to_keep=0) -> logits``.

``attention_mask`` is either the usual ``(batch, length)`` padding mask or a boolean
``(batch, 1, length, keys)`` mask (``True``: may attend) given with explicit ``position_ids``;
``past_key_values`` is a cache (``transformers.DynamicCache``) that the call extends in place;
``logits_to_keep > 0`` asks for the logits of the last that many positions only (0: all). A
``transformers`` causal LM takes exactly these arguments, so
``lambda ids, mask, **kw: model(input_ids=ids, attention_mask=mask, **kw).logits`` is one.
"""


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
        answer_loss: With ``answer_loss=True``, the mean cross-entropy over the answer tokens (and
            EOS) of every example's ``target``: the :func:`lm_loss` of the same examples encoded by
            :func:`~deltameta.tasks.encoding.encode_examples`, equal to it up to float rounding;
            ``None`` otherwise.
    """

    scores: list[list[float]]
    lengths: list[list[int]]
    predictions: list[int]
    predictions_norm: list[int]
    accuracy: float
    accuracy_norm: float
    answer_loss: float | None = None


def block_causal_mask(blocks: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed rows: causal, and a block sees only the shared block and itself.

    Args:
        blocks: ``(batch, length)`` block id of every position: ``-1`` padding, ``0`` the shared
            prompt, ``1, 2, ...`` the options packed after it.

    Returns:
        A boolean ``(batch, 1, length, length)`` mask, ``True`` where query position ``q`` may
        attend to key position ``k``: ``k <= q``, ``k`` not padding and in block 0 or in ``q``'s
        block. Every position also sees itself (padding included, so that no attention row is
        empty and no NaN can arise; padding is never attended to by real tokens).
    """
    length = blocks.size(1)
    query, key = blocks.unsqueeze(2), blocks.unsqueeze(1)
    causal = torch.ones(length, length, dtype=torch.bool, device=blocks.device).tril()
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool, device=blocks.device)
    return allowed.unsqueeze(1)


ANSWER_BLOCK = -1
"""The option index of the extra block that :func:`score_multiple_choice` packs for ``answer_loss``."""


@dataclasses.dataclass
class _Packed:
    """One packed row: a prompt and the options scored after it (``options``: (option index, target ids)).

    Option index :data:`ANSWER_BLOCK` marks the block of the answer and EOS whose loss is wanted.
    """

    owner: int
    prompt: list[int]
    options: list[tuple[int, list[int]]]

    @property
    def answer_length(self) -> int:
        return sum(len(t) for _, t in self.options)


def _pack(pairs: list[tuple[int, int, list[int], list[int]]]) -> list[_Packed]:
    """Group ``(owner, option, prompt, target)`` by owner and (truncated) prompt, in order."""
    rows: dict[tuple[int, tuple[int, ...]], _Packed] = {}
    for owner, option, prompt, target in pairs:
        key = (owner, tuple(prompt))
        if key not in rows:
            rows[key] = _Packed(owner, list(prompt), [])
        rows[key].options.append((option, list(target)))
    return list(rows.values())


def _packed_inputs(rows: Sequence[_Packed], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay packed rows out for one forward: ``(input_ids, position_ids, blocks)``, each ``(rows, width)``.

    Rows are left-padded so that they all end at the last column; each option block takes the
    positions it would have right after the prompt; ``blocks`` is what :func:`block_causal_mask` reads.
    """
    width = max(len(r.prompt) + r.answer_length for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros_like(ids)
    blocks = torch.full_like(ids, -1)
    for row, packed in enumerate(rows):
        start = width - len(packed.prompt) - packed.answer_length
        tokens, pos, block = list(packed.prompt), list(range(len(packed.prompt))), [0] * len(packed.prompt)
        for number, (_, target) in enumerate(packed.options, start=1):
            tokens += target
            pos += range(len(packed.prompt), len(packed.prompt) + len(target))
            block += [number] * len(target)
        ids[row, start:] = torch.tensor(tokens)
        positions[row, start:] = torch.tensor(pos)
        blocks[row, start:] = torch.tensor(block)
    return ids, positions, blocks


def _option_scores(logprobs: torch.Tensor, rows: Sequence[_Packed], width: int) -> list[list[tuple[int, float, int]]]:
    """Per row, ``(option index, summed log-likelihood, token count)`` of each option block.

    Args:
        logprobs: Log-probabilities of the last ``logprobs.size(1)`` columns of the packed rows.
        rows: The rows, laid out by :func:`_packed_inputs`.
        width: Their width.
    """
    offset = width - logprobs.size(1)  # column of logprobs index 0
    results = []
    for row, packed in enumerate(rows):
        column = width - packed.answer_length  # first answer column of this row
        last_prompt = column - 1
        scored = []
        for option, target in packed.options:
            if not target:
                scored.append((option, 0.0, 0))
                continue
            sources = [last_prompt] + list(range(column, column + len(target) - 1))
            index = torch.tensor(sources, device=logprobs.device) - offset
            token = torch.tensor(target, device=logprobs.device)
            scored.append((option, float(logprobs[row, index, token].sum()), len(target)))
            column += len(target)
        results.append(scored)
    return results


def _score_packed(logits_fn: LogitsFn, rows: Sequence[_Packed], pad: int, device) -> list[list[tuple[int, float, int]]]:
    """Score one batch of packed rows in one forward.

    Only the logits of the last ``1 + longest answer block`` columns are computed.

    Returns:
        Per row, ``(option index, summed log-likelihood, token count)`` of each option.
    """
    ids, positions, blocks = _packed_inputs(rows, pad)
    keep = 1 + max(r.answer_length for r in rows)
    mask = block_causal_mask(blocks)
    if device is not None:
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    logits = logits_fn(ids, mask, position_ids=positions, logits_to_keep=keep)
    logits = logits[:, -keep:, :]  # a logits_fn may return every position
    return _option_scores(torch.log_softmax(logits.float(), dim=-1), rows, ids.size(1))


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
    answer_loss: bool = False,
) -> MultipleChoiceResult:
    """Score every option of multiple-choice examples by its log-likelihood after the prompt.

    Each (prompt, option) pair is truncated to ``max_length`` tokens as if it were its own row
    (prompt cut on the left); the options of one example that keep the same prompt are then
    packed after one copy of it (see the module docstring), so the prompt runs once per example.
    ``batch_size`` packed rows go through one ``logits_fn`` call. No EOS is appended to the options.

    With ``answer_loss``, one more block per example, its ``target`` followed by EOS (truncated
    with its prompt as :func:`~deltameta.tasks.encoding.encode_examples` truncates a row), rides
    in the same forward, so the loss of the answers costs a few tokens instead of a forward of its
    own. The option blocks never attend to it, so the scores are those of a run without it, up
    to float rounding from the wider rows.

    Args:
        logits_fn: See :data:`LogitsFn` (called with a 4-D mask, ``position_ids`` and ``logits_to_keep``).
        tokenizer: The tokenizer.
        examples: Multiple-choice examples.
        template: Prompt template (default :data:`~deltameta.tasks.task.DEFAULT_TEMPLATE`).
        max_length: Longest prompt + option (prompts are truncated on the left).
        in_context: Demonstrations put before every prompt.
        batch_size: Packed rows (examples) per ``logits_fn`` call.
        device: Where to put the batches (default: CPU tensors).
        answer_loss: Also compute :attr:`MultipleChoiceResult.answer_loss`.

    Returns:
        The scores and accuracies.

    Raises:
        ConfigError: an example without options, or no examples.
    """
    if not examples:
        raise ConfigError("score_multiple_choice needs at least one example.")
    template = template or DEFAULT_TEMPLATE
    prompts, targets, owners, numbers = [], [], [], []
    for number, example in enumerate(examples):
        if example.options is None:
            raise ConfigError(f"example {number} has no options; score free-form examples with score_free_form.")
        prompt = template.render_prompt(example, in_context or ())
        for option_number, option in enumerate(example.options):
            prompts.append(prompt)
            targets.append(template.render_target(option))
            owners.append(number)
            numbers.append(option_number)
    pairs = [truncate_pair(p, t, max_length)[:2] for p, t in tokenize_pairs(tokenizer, prompts, targets, add_eos=False)]
    entries = [(o, n, p, t) for o, n, (p, t) in zip(owners, numbers, pairs)]
    if answer_loss:
        answers = tokenize_pairs(tokenizer, [template.render_prompt(e, in_context or ()) for e in examples],
                                 [template.render_target(e.target) for e in examples], add_eos=True)
        entries += [(o, ANSWER_BLOCK, *truncate_pair(p, t, max_length)[:2]) for o, (p, t) in enumerate(answers)]
        entries.sort(key=lambda entry: entry[0])  # each answer block next to its example's options
    packed = _pack(entries)
    pad = pad_token_id(tokenizer)
    scores: list[list[float]] = [[0.0] * len(e.options) for e in examples]
    lengths: list[list[int]] = [[0] * len(e.options) for e in examples]
    loss_total, loss_count = 0.0, 0
    for start in range(0, len(packed), batch_size):
        chunk = packed[start : start + batch_size]
        for row, scored in zip(chunk, _score_packed(logits_fn, chunk, pad, device)):
            for option, total, count in scored:
                if option == ANSWER_BLOCK:
                    loss_total, loss_count = loss_total - total, loss_count + count
                    continue
                scores[row.owner][option] = total
                lengths[row.owner][option] = count
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
        answer_loss=(loss_total / max(loss_count, 1)) if answer_loss else None,
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
    done: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy decoding through ``logits_fn`` with a KV cache.

    The prompts (left-padded, with explicit positions and a 4-D mask that hides the padding) run
    once into a ``transformers.DynamicCache``; then each step feeds one token per row. A row that
    has stopped keeps being fed (its output is frozen) until every row has stopped.

    Args:
        logits_fn: See :data:`LogitsFn` (called with ``past_key_values`` and ``logits_to_keep``).
        prompts: Token ids of each prompt (each non-empty).
        max_new_tokens: Most tokens generated per prompt.
        stop_ids: Tokens that end a generation (not included in the output).
        pad_id: Padding id.
        device: Where to put the batches.
        done: Optional ``done(tokens_so_far) -> bool``: a row also stops (keeping its tokens)
            once it returns true, e.g. when later tokens can no longer change what is scored.

    Returns:
        The generated token ids of each prompt.
    """
    rows = [_Packed(owner, list(p), []) for owner, p in enumerate(prompts)]
    return _generate(logits_fn, rows, max_new_tokens, stop_ids, pad_id, device, done)[0]


@torch.no_grad()
def _generate(
    logits_fn: LogitsFn,
    rows: Sequence[_Packed],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    device: torch.device | str | None,
    done: Callable[[list[int]], bool] | None,
) -> tuple[list[list[int]], list[list[tuple[int, float, int]]]]:
    """:func:`greedy_generate` of ``rows``, scoring the blocks packed after each prompt in its prefill.

    A block after a prompt (see :func:`_packed_inputs`) rides in the prompt's forward and is scored
    like a multiple-choice option; its columns then stay in the KV cache but are masked out, so the
    generated tokens attend to the prompt and to themselves only, at the positions right after the
    prompt, as without the block.

    Returns:
        The generated token ids of each row, and per row the ``(option, summed log-likelihood,
        token count)`` of its blocks (see :func:`_option_scores`).
    """
    from transformers import DynamicCache

    outputs: list[list[int]] = [[] for _ in rows]
    if not rows or max_new_tokens < 1:
        return outputs, [[] for _ in rows]
    ids, positions, blocks = _packed_inputs(rows, pad_id)
    keep = 1 + max(r.answer_length for r in rows)
    keys = blocks == 0  # which cache columns later tokens attend to: the prompts only
    mask = block_causal_mask(blocks)
    next_position = torch.tensor([len(r.prompt) for r in rows])
    last_prompt = torch.tensor([keep - 1 - r.answer_length for r in rows])  # in the kept logits
    if device is not None:
        ids, mask, positions, keys, next_position = (t.to(device) for t in (ids, mask, positions, keys, next_position))
    cache = DynamicCache()
    logits = logits_fn(ids, mask, position_ids=positions, past_key_values=cache, logits_to_keep=keep)
    logits = logits[:, -keep:, :]  # a logits_fn may return every position
    scored = _option_scores(torch.log_softmax(logits.float(), dim=-1), rows, ids.size(1)) if keep > 1 else \
        [[] for _ in rows]
    step_logits = logits[torch.arange(len(rows), device=logits.device), last_prompt.to(logits.device)]
    active = [True] * len(rows)
    stops = set(stop_ids)
    for step in range(max_new_tokens):
        chosen = step_logits.argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            if not active[row]:
                continue
            if token in stops:
                active[row] = False
            else:
                outputs[row].append(token)
                if done is not None and done(outputs[row]):
                    active[row] = False
        if not any(active) or step == max_new_tokens - 1:
            break
        keys = torch.cat([keys, torch.ones_like(keys[:, :1])], dim=1)
        step_mask = keys[:, None, None, :]
        step_logits = logits_fn(chosen[:, None], step_mask, position_ids=next_position[:, None],
                                past_key_values=cache, logits_to_keep=1)[:, -1, :]
        next_position = next_position + 1
    return outputs, scored


@dataclasses.dataclass
class FreeFormResult:
    """Generated answers and match rates.

    Attributes:
        predictions: Generated answer per example (first line, stripped).
        exact: Per example, whether the prediction equals the stripped target.
        normalized: Per example, whether they match after :func:`normalize_answer`.
        exact_match: Mean of ``exact``.
        normalized_match: Mean of ``normalized``.
        answer_loss: With ``answer_loss=True``, the mean cross-entropy over the answer tokens (and
            EOS) of every example's ``target``, as :attr:`MultipleChoiceResult.answer_loss`; ``None``
            otherwise, or when some prompt is cut differently for generation and for its loss row.
    """

    predictions: list[str]
    exact: list[bool]
    normalized: list[bool]
    exact_match: float
    normalized_match: float
    answer_loss: float | None = None


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
    answer_loss: bool = False,
) -> FreeFormResult:
    """Generate answers greedily and compare them with the targets.

    With ``answer_loss`` (and ``logits_fn``), each prompt's ``target`` followed by EOS rides in the
    prompt's prefill forward as a block the generated tokens never attend to (see :func:`_generate`),
    so the loss of the answers costs a few tokens instead of a forward of its own. It rides only
    when every prompt is cut alike for generation (``max_length - max_new_tokens`` tokens) and for
    its loss row (as :func:`~deltameta.tasks.encoding.encode_examples` cuts it); otherwise
    :attr:`FreeFormResult.answer_loss` is ``None`` and the caller computes the loss itself.

    Args:
        logits_fn: See :data:`LogitsFn` (or ``None`` with ``generate_fn``).
        tokenizer: The tokenizer.
        examples: The examples (options are ignored).
        template: Prompt template.
        max_length: Longest prompt (truncated on the left).
        in_context: Demonstrations put before every prompt.
        max_new_tokens: Generation budget (default: longest target in tokens + 4).
        batch_size: Prompts per batch.
        generate_fn: Alternative to ``logits_fn``: maps prompt texts to generated texts.
        device: Where to put the batches.
        answer_loss: Also compute :attr:`FreeFormResult.answer_loss` (ignored with ``generate_fn``).

    Returns:
        Predictions and match rates; a prediction is the generated text up to the first newline
        (after leading whitespace), so a row stops generating once that line is complete.

    Raises:
        ConfigError: no examples, or neither ``logits_fn`` nor ``generate_fn``.
    """
    if not examples:
        raise ConfigError("score_free_form needs at least one example.")
    template = template or DEFAULT_TEMPLATE
    prompts = [template.render_prompt(e, in_context or ()) for e in examples]
    loss: float | None = None
    if generate_fn is not None:
        texts = list(generate_fn(prompts))
    elif logits_fn is not None:
        targets = [template.render_target(e.target) for e in examples]
        pairs = tokenize_pairs(tokenizer, prompts, targets, add_eos=False)
        if max_new_tokens is None:
            max_new_tokens = max(len(t) for _, t in pairs) + 4
        prompt_ids = [p[-max(1, max_length - max_new_tokens) :] for p, _ in pairs]
        rows = [_Packed(number, prompt, []) for number, prompt in enumerate(prompt_ids)]
        riding = False
        if answer_loss:
            answers = [truncate_pair(p, t, max_length)[:2]
                       for p, t in tokenize_pairs(tokenizer, prompts, targets, add_eos=True)]
            riding = all(p == prompt for (p, _), prompt in zip(answers, prompt_ids))
            if riding:
                rows = [_Packed(number, prompt, [(ANSWER_BLOCK, target)])
                        for number, (prompt, target) in enumerate(answers)]
        stops = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]
        texts = []
        loss_total, loss_count = 0.0, 0

        def first_line_complete(tokens: list[int]) -> bool:  # later tokens cannot change the prediction
            return "\n" in tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

        for start in range(0, len(rows), batch_size):
            generated, scored = _generate(logits_fn, rows[start : start + batch_size], max_new_tokens, stops,
                                          pad_token_id(tokenizer), device, first_line_complete)
            texts.extend(tokenizer.decode(g, skip_special_tokens=True) for g in generated)
            for _, total, count in (block for blocks in scored for block in blocks):
                loss_total, loss_count = loss_total - total, loss_count + count
        if riding:
            loss = loss_total / max(loss_count, 1)
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
        answer_loss=loss,
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
    answer_loss: bool = False,
) -> dict[str, float | None]:
    """Score a mix of examples: multiple choice by log-likelihood, free-form by exact match.

    Args:
        answer_loss: When every example is multiple choice, or every one free form, also return
            ``answer_loss`` from the scoring forward (see :func:`score_multiple_choice` and
            :func:`score_free_form`); for a mix of both it is not computed (``None``).

    Returns:
        ``accuracy`` (summed-likelihood MC predictions and exact matches over all examples),
        ``accuracy_norm`` (length-normalized MC, normalized free-form match), ``count``, and
        ``answer_loss`` (``None`` unless computed).
    """
    mc = [e for e in examples if e.options is not None]
    free = [e for e in examples if e.options is None]
    hits = hits_norm = 0.0
    loss = None
    if mc:
        result = score_multiple_choice(logits_fn, tokenizer, mc, template, max_length, in_context, batch_size, device,
                                       answer_loss=answer_loss and not free)
        hits += result.accuracy * len(mc)
        hits_norm += result.accuracy_norm * len(mc)
        loss = result.answer_loss
    if free:
        generated = score_free_form(
            logits_fn, tokenizer, free, template, max_length, in_context, batch_size=batch_size, device=device,
            answer_loss=answer_loss and not mc,
        )
        if not mc:
            loss = generated.answer_loss
        hits += generated.exact_match * len(free)
        hits_norm += generated.normalized_match * len(free)
    count = max(len(examples), 1)
    return {"accuracy": hits / count, "accuracy_norm": hits_norm / count, "count": float(len(examples)),
            "answer_loss": loss}
