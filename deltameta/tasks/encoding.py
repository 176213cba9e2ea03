"""Turning examples into token batches with the loss on the answer only.

Each row is ``prompt tokens + answer tokens (+ EOS)``; ``labels`` are ``-100`` on the prompt and
on padding, and equal to the token ids on the answer (and EOS), so a causal LM loss shifted by one
(:func:`deltameta.tasks.scoring.lm_loss`) counts the answer tokens only. Prompt and answer are
tokenized separately, so the boundary is exact. Rows are right-padded with the tokenizer's pad
token. A row longer than ``max_length`` loses prompt tokens on the left (the answer is kept);
a :class:`TruncationWarning` says how many rows were cut.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from deltameta.errors import ConfigError
from deltameta.tasks.task import DEFAULT_TEMPLATE, Example, PromptTemplate

IGNORE_INDEX = -100


class TruncationWarning(UserWarning):
    """Some rows were longer than ``max_length`` and were truncated."""


def pad_token_id(tokenizer) -> int:
    """Return the id used for padding: the pad token, else EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize_pairs(
    tokenizer, prompts: Sequence[str], targets: Sequence[str], add_eos: bool = True
) -> list[tuple[list[int], list[int]]]:
    """Tokenize prompts (with the tokenizer's special prefix, e.g. BOS) and answers (without).

    Args:
        tokenizer: A ``transformers`` tokenizer.
        prompts: Prompt texts.
        targets: Answer texts (already rendered by the template).
        add_eos: Append EOS to every answer.

    Returns:
        ``(prompt_ids, target_ids)`` per pair.
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"] if prompts else []
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"] if targets else []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    pairs = []
    for prompt, target in zip(prompt_ids, target_ids):
        prompt = list(prompt)
        if not prompt and tokenizer.bos_token_id is not None:
            prompt = [tokenizer.bos_token_id]  # the first answer token needs a position to predict it from
        pairs.append((prompt, list(target) + eos))
    return pairs


def truncate_pair(prompt: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Fit one pair into ``max_length`` tokens: drop prompt tokens on the left, keep the answer.

    When the answer alone does not fit, one prompt token is kept and the answer is cut on the
    right.

    Returns:
        ``(prompt, target, truncated)``.
    """
    if len(prompt) + len(target) <= max_length:
        return prompt, target, False
    keep = max_length - len(target)
    if keep >= 1:
        return prompt[-keep:], target, True
    return prompt[-1:], target[: max_length - 1], True


def collate_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token rows into a batch.

    Args:
        rows: ``(input_ids, labels)`` per row, as lists of ints (``labels`` no longer than ``input_ids``).
        pad_id: Padding id for ``input_ids``.

    Returns:
        ``input_ids`` (padded with ``pad_id``), ``attention_mask`` (0 on padding) and ``labels``
        (``-100`` on padding), each a ``LongTensor`` of shape ``(rows, longest row)``.
    """
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def demonstrations_max_length(max_length: int, shots: int) -> int:
    """Token limit of a prompt with ``shots`` demonstrations: room for each of them and the query at ``max_length``.

    The one rule of meta-train's ``query_context=support`` rows and of evaluate's ICL and
    demonstration prompts (``icl_max_length=0``), so a meta-adapter is scored on prompts cut as in training.
    """
    return max_length * (shots + 1)


def encode_examples(
    tokenizer,
    examples: Sequence[Example],
    template: PromptTemplate | None = None,
    max_length: int = 256,
    in_context: Sequence[Example] | None = None,
    pack: bool = False,
    add_eos: bool = True,
) -> dict[str, torch.Tensor]:
    """Encode examples into a right-padded batch with an answer-only loss mask.

    Args:
        tokenizer: A ``transformers`` tokenizer (``deltameta.base.load_base(...)[1]``).
        examples: The examples (their ``target`` is the answer; for multiple choice, the first
            correct option).
        template: Prompt template (default :data:`~deltameta.tasks.task.DEFAULT_TEMPLATE`; pass
            ``task.template`` for a task's own).
        max_length: Longest row in tokens; longer rows are truncated on the left of the prompt,
            with a :class:`TruncationWarning` counting them.
        in_context: Demonstrations (with answers) put in every prompt before the query input,
            MetaICL-style (for the in-context-learning baseline).
        pack: Concatenate consecutive examples into rows of at most ``max_length`` tokens (each
            keeps its own answer-only labels; later examples can attend to earlier ones in the row).
        add_eos: Append EOS after each answer (and train on it).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` except answer tokens), each a
        ``LongTensor`` of shape ``(rows, width)``.

    Raises:
        ConfigError: no examples or ``max_length < 2``.
    """
    if not examples:
        raise ConfigError("encode_examples needs at least one example.")
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 tokens, got {max_length}.")
    template = template or DEFAULT_TEMPLATE
    demos = list(in_context or ())
    prompts = [template.render_prompt(e, demos) for e in examples]
    targets = [template.render_target(e.target) for e in examples]
    pairs = tokenize_pairs(tokenizer, prompts, targets, add_eos=add_eos)
    truncated = 0
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, target in pairs:
        prompt, target, cut = truncate_pair(prompt, target, max_length)
        truncated += cut
        rows.append((prompt + target, [IGNORE_INDEX] * len(prompt) + target))
    if truncated:
        warnings.warn(
            f"{truncated} of {len(rows)} example(s) exceeded max_length={max_length} tokens; their prompts were "
            "truncated on the left (answers kept). Raise max_length or shorten the prompts/in-context examples.",
            TruncationWarning,
            stacklevel=2,
        )
    if pack:
        packed: list[tuple[list[int], list[int]]] = []
        for ids, lab in rows:
            if packed and len(packed[-1][0]) + len(ids) <= max_length:
                packed[-1] = (packed[-1][0] + ids, packed[-1][1] + lab)
            else:
                packed.append((ids, lab))
        rows = packed
    return collate_rows(rows, pad_token_id(tokenizer))


def encode_episode(
    tokenizer,
    episode,
    template: PromptTemplate | None = None,
    max_length: int = 256,
    in_context: bool = False,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]:
    """Encode an episode's support and query sets with its task's template.

    Args:
        tokenizer: The tokenizer.
        episode: A :class:`~deltameta.tasks.episodes.Episode`.
        template: Override of ``episode.task.template``.
        max_length: Longest row.
        in_context: Put the support examples in every query prompt (ICL baseline).

    Returns:
        ``(support_batch, query_batch)``; the support batch is ``None`` for a zero-shot episode.
    """
    template = template or episode.task.template
    support = encode_examples(tokenizer, episode.support, template, max_length) if episode.support else None
    demos = episode.support if in_context else None
    query = encode_examples(tokenizer, episode.query, template, max_length, in_context=demos)
    return support, query


def render_row(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> str:
    """Decode one row exactly as the model sees it, with answer (loss) spans in ``[[...]]``.

    Padding (``attention_mask == 0``) is dropped.

    Args:
        tokenizer: The tokenizer.
        input_ids: One row of token ids.
        labels: Its labels (``-100`` outside the loss).
        attention_mask: Its attention mask.

    Returns:
        The decoded text.
    """
    ids = input_ids.tolist()
    mask = [lab != IGNORE_INDEX for lab in labels.tolist()]
    keep = attention_mask.tolist() if attention_mask is not None else [1] * len(ids)
    pieces: list[str] = []
    span: list[int] = []
    in_span = False
    for token, scored, kept in zip(ids, mask, keep):
        if not kept:
            continue
        if scored != in_span:
            text = tokenizer.decode(span, skip_special_tokens=False) if span else ""
            pieces.append(f"[[{text}]]" if in_span else text)
            span, in_span = [], scored
        span.append(token)
    if span:
        text = tokenizer.decode(span, skip_special_tokens=False)
        pieces.append(f"[[{text}]]" if in_span else text)
    return "".join(pieces)
