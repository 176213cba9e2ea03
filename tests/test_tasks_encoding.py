"""Encoding (loss masks, truncation, packing, in-context) and scoring on tiny-random-llama."""

from __future__ import annotations

import warnings

import pytest
import torch

from deltameta.errors import ConfigError
from deltameta.tasks import (
    IGNORE_INDEX,
    Episode,
    Example,
    PromptTemplate,
    Task,
    TruncationWarning,
    encode_episode,
    encode_examples,
    evaluate_examples,
    lm_loss,
    normalize_answer,
    render_row,
    score_free_form,
    score_multiple_choice,
)

TEMPLATE = PromptTemplate("Q: {input}\nA:", " {target}")


def test_loss_mask_covers_only_the_answer(tiny_tokenizer):
    examples = [Example("2+2", "4"), Example("a longer question here", "answer")]
    batch = encode_examples(tiny_tokenizer, examples, TEMPLATE)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    for row, example in enumerate(examples):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        scored = labels != IGNORE_INDEX
        answer = tiny_tokenizer(" " + example.target, add_special_tokens=False)["input_ids"] + [eos]
        assert labels[scored].tolist() == answer
        assert ids[scored].tolist() == answer  # labels are the tokens themselves, unshifted
        length = int(mask.sum())
        assert scored[:length].tolist()[-len(answer) :] == [True] * len(answer)
        assert not scored[: length - len(answer)].any() and not scored[length:].any()
        assert (ids[length:] == pad).all() and mask[:length].all()
        prompt = tiny_tokenizer.decode(ids[: length - len(answer)])
        assert prompt == TEMPLATE.render_prompt(example)
    assert "[[ 4<|endoftext|>]]" in render_row(tiny_tokenizer, batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0])


def test_lm_loss_counts_only_answer_tokens(tiny_fp32):
    model, tokenizer = tiny_fp32
    batch = encode_examples(tokenizer, [Example("hello", "world"), Example("x", "yz")], TEMPLATE)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = lm_loss(logits, batch["labels"])
    # hand-computed: mean over answer positions of -log p(token | prefix)
    terms = []
    for row in range(2):
        for t in range(1, batch["labels"].shape[1]):
            if batch["labels"][row, t] != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[row, t - 1], -1)[batch["labels"][row, t]])
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
    # logits at positions that predict prompt or padding tokens do not matter
    changed = logits.detach().clone()
    unscored = torch.zeros(batch["labels"].shape, dtype=torch.bool)
    unscored[:, :-1] = batch["labels"][:, 1:] == IGNORE_INDEX  # position t predicts token t + 1
    unscored[:, -1] = True
    changed[unscored] += torch.randn(changed.shape[-1]) * 5
    assert torch.allclose(lm_loss(changed, batch["labels"]), loss, atol=1e-5)
    empty = torch.full_like(batch["labels"], IGNORE_INDEX)
    assert lm_loss(logits, empty).item() == 0.0


def test_left_truncation_keeps_answer_and_warns(tiny_tokenizer):
    examples = [Example("x" * 200, "keep me"), Example("short", "ok"), Example("y" * 300, "also kept")]
    with pytest.warns(TruncationWarning, match="2 of 3 example"):
        batch = encode_examples(tiny_tokenizer, examples, TEMPLATE, max_length=40)
    assert batch["input_ids"].shape[1] == 40
    for row, example in enumerate(examples):
        labels = batch["labels"][row]
        answer = tiny_tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True)
        assert answer == " " + example.target
    row0 = tiny_tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert row0.endswith("xxx\nA: keep me") and not row0.startswith("Q:")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_examples(tiny_tokenizer, examples[1:2], TEMPLATE, max_length=40)
    with pytest.raises(ConfigError):
        encode_examples(tiny_tokenizer, [], TEMPLATE)


def test_packing_and_in_context(tiny_tokenizer):
    examples = [Example(f"q{i}", f"a{i}") for i in range(6)]
    plain = encode_examples(tiny_tokenizer, examples, TEMPLATE, max_length=64)
    packed = encode_examples(tiny_tokenizer, examples, TEMPLATE, max_length=64, pack=True)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]
    assert packed["input_ids"].shape[1] <= 64
    assert (packed["labels"] != IGNORE_INDEX).sum() == (plain["labels"] != IGNORE_INDEX).sum()

    demos = [Example("d1", "r1"), Example("d2", "r2")]
    batch = encode_examples(tiny_tokenizer, [Example("q", "a")], TEMPLATE, in_context=demos)
    text = tiny_tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True)
    assert text == "Q: d1\nA: r1\n\nQ: d2\nA: r2\n\nQ: q\nA: a"
    labels = batch["labels"][0]
    assert tiny_tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True) == " a"


def test_encode_episode_uses_task_template(tiny_tokenizer):
    task = Task("t", "", [Example(f"i{n}", f"o{n}") for n in range(4)], template=TEMPLATE)
    episode = Episode(task, support=task.examples[:2], query=task.examples[2:])
    support, query = encode_episode(tiny_tokenizer, episode)
    assert support["input_ids"].shape[0] == 2 and query["input_ids"].shape[0] == 2
    assert tiny_tokenizer.decode(support["input_ids"][0], skip_special_tokens=True) == "Q: i0\nA: o0"
    _, icl = encode_episode(tiny_tokenizer, episode, in_context=True)
    assert tiny_tokenizer.decode(icl["input_ids"][0], skip_special_tokens=True).startswith("Q: i0\nA: o0\n\nQ: i1")


def _option_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logprobs[len(prompt_ids) + i - 1, token]) for i, token in enumerate(answer_ids))


def test_multiple_choice_loglik_matches_hand_computation(tiny_fp32):
    model, tokenizer = tiny_fp32
    examples = [Example("color of sky", "blue", options=["red", "blue", "a long green option"]), Example("1+1", "2", options=["2", "11"])]

    def logits_fn(ids, mask, **kwargs):
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits

    result = score_multiple_choice(logits_fn, tokenizer, examples, TEMPLATE, batch_size=2)
    for example, scores, lengths in zip(examples, result.scores, result.lengths):
        prompt = TEMPLATE.render_prompt(example)
        expected = [_option_logprob(model, tokenizer, prompt, " " + o) for o in example.options]
        assert scores == pytest.approx(expected, abs=1e-4)
        assert lengths == [len(" " + o) for o in example.options]  # byte-level tokenizer
    expected_pred = [max(range(len(s)), key=s.__getitem__) for s in result.scores]
    assert result.predictions == expected_pred
    norm = [max(range(len(s)), key=lambda i: s[i] / n[i]) for s, n in zip(result.scores, result.lengths)]
    assert result.predictions_norm == norm
    assert result.accuracy == sum(p in e.correct for p, e in zip(expected_pred, examples)) / 2
    with pytest.raises(ConfigError, match="no options"):
        score_multiple_choice(logits_fn, tokenizer, [Example("q", "a")], TEMPLATE)


def test_free_form_scoring(tiny_fp32):
    model, tokenizer = tiny_fp32
    byte = {c: tokenizer.convert_tokens_to_ids(c) for c in ":4" + "2"}
    byte[" "] = tokenizer(" ", add_special_tokens=False)["input_ids"][0]
    follow = {byte[":"]: byte[" "], byte[" "]: byte["4"], byte["4"]: byte["2"], byte["2"]: tokenizer.eos_token_id}

    def scripted(ids, mask, **kwargs):  # always continues "...A:" with " 42" then EOS
        logits = torch.zeros(ids.shape[0], ids.shape[1], len(tokenizer))
        for row in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                logits[row, t, follow.get(int(ids[row, t]), byte["4"])] = 10.0
        return logits

    examples = [Example("six times seven", "42"), Example("a much longer question than that", "41")]
    result = score_free_form(scripted, tokenizer, examples, TEMPLATE, batch_size=2)
    assert result.predictions == ["42", "42"] and result.exact == [True, False] and result.exact_match == 0.5

    echo = score_free_form(None, tokenizer, [Example("q", "The Answer")], generate_fn=lambda prompts: ["  answer.\nmore"])
    assert echo.exact == [False] and echo.normalized == [True]
    assert normalize_answer("The  Cat!") == "cat"

    from deltameta.finetune.common import logits_fn

    mixed = [Example("q", "b", options=["a", "b"]), Example("q", "zz")]
    metrics = evaluate_examples(logits_fn(model), tokenizer, mixed, TEMPLATE)
    assert metrics["count"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0
