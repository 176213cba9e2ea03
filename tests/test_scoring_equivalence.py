"""The fast scorers (packed options, cached generation) give the scores of the plain ones.

The references below are the straightforward forms: one row per (prompt, option) pair, and
greedy decoding that re-runs the whole sequence for every new token. The fast scorers must match
them exactly in accuracy and predictions, and within 1e-4 (fp32) in every option's
log-likelihood, on tiny-random-llama: multiple choice and free form, with and without in-context
demonstrations, on the bare base, with a PEFT LoRA adapter, and with TARP's dynamic hooks.
"""

from __future__ import annotations

import pytest
import torch

from deltameta.finetune import common
from deltameta.tasks import Example, PromptTemplate, greedy_generate, score_free_form, score_multiple_choice
from deltameta.tasks.encoding import IGNORE_INDEX, pad_token_id, tokenize_pairs, truncate_pair

TEMPLATE = PromptTemplate("Q: {input}\nA:", " {target}")
MC = [
    Example("color of sky", "blue", options=["red", "blue", "a long green option"]),
    Example("1+1", "2", options=["2", "11", "two"]),
    Example("a much longer question " * 3, "b", options=["a", "b", "ccccc dd"]),
    Example("pick one", "yes", options=["yes", "no"]),
    Example("", "x", options=["x", "xyz", ""]),
]
FREE = [Example("six times seven", "42"), Example("a much longer question than that", "forty one"), Example("q", "z")]
DEMOS = [Example("first demo", "a", options=["a", "b"]), Example("second demonstration here", "zz")]


def _reference_mc(logits_fn, tokenizer, examples, max_length, in_context):
    """One row per option, right-padded: the scorer before packing."""
    scores = []
    for example in examples:
        prompt = TEMPLATE.render_prompt(example, in_context or ())
        targets = [TEMPLATE.render_target(o) for o in example.options]
        pairs = [truncate_pair(p, t, max_length)[:2] for p, t in tokenize_pairs(tokenizer, [prompt] * len(targets), targets, add_eos=False)]
        width = max(len(p) + len(t) for p, t in pairs)
        ids = torch.full((len(pairs), width), pad_token_id(tokenizer))
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, (p, t) in enumerate(pairs):
            ids[row, : len(p) + len(t)] = torch.tensor(p + t)
            mask[row, : len(p) + len(t)] = 1
            if t:
                labels[row, len(p) : len(p) + len(t)] = torch.tensor(t)
        logprobs = torch.log_softmax(logits_fn(ids, mask)[:, :-1].float(), -1)
        targets_ = labels[:, 1:]
        picked = logprobs.gather(-1, targets_.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.append(((picked * (targets_ != IGNORE_INDEX)).sum(-1)).tolist())
    return scores


def _reference_generate(logits_fn, prompts, max_new_tokens, stops, pad):
    """Greedy decoding without a cache, one prompt at a time."""
    outputs = []
    for prompt in prompts:
        row, out = list(prompt), []
        for _ in range(max_new_tokens):
            ids = torch.tensor([row])
            token = int(logits_fn(ids, torch.ones_like(ids))[0, -1].argmax())
            if token in stops:
                break
            row.append(token)
            out.append(token)
        outputs.append(out)
    return outputs


@pytest.fixture(scope="module", params=["base", "lora", "lora+tarp-hooks"])
def scorer(request):
    """A fresh tiny fp32 model, optionally with a random PEFT LoRA adapter and random TARP hooks."""
    from deltameta.base import load_base
    from deltameta.deltas.export import _dynamic_hook

    model, tokenizer = load_base("tiny-random-llama", quantization="none", device="cpu")
    handles = []
    if request.param != "base":
        from peft import get_peft_model

        torch.manual_seed(0)
        config = common.fresh_lora_config(4, 8.0, ["q_proj", "v_proj", "down_proj"])
        config.init_lora_weights = False  # random A and B: the adapter changes the logits
        model = get_peft_model(model, config)
    if request.param == "lora+tarp-hooks":
        generator = torch.Generator().manual_seed(1)
        rank = 2
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "down_proj")) and hasattr(module, "base_layer"):
                d_in, d_out = module.base_layer.in_features, module.base_layer.out_features
                parts = {"lora_A": torch.randn(rank, d_in, generator=generator),
                         "lora_B": torch.randn(d_out, rank, generator=generator),
                         "tarp_sigma": torch.randn(rank * rank, rank, generator=generator),
                         "sigma_bar": torch.randn(rank, rank, generator=generator)}
                info = {"rank": rank, "scaling": 0.5, "kind": "tarp", "sigma_input": "projected"}
                handles.append(module.register_forward_hook(_dynamic_hook(info, parts)))
        assert handles
    model.eval()
    yield common.logits_fn(model), tokenizer
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("max_length", [256, 14])
@pytest.mark.parametrize("demos", [False, True])
def test_multiple_choice_scores_unchanged(scorer, demos, max_length):
    logits_fn, tokenizer = scorer
    in_context = DEMOS if demos else None
    fast = score_multiple_choice(logits_fn, tokenizer, MC, TEMPLATE, max_length=max_length, in_context=in_context, batch_size=2)
    reference = _reference_mc(logits_fn, tokenizer, MC, max_length, in_context)
    for got, want in zip(fast.scores, reference):
        assert got == pytest.approx(want, abs=1e-4)
    assert fast.predictions == [max(range(len(s)), key=s.__getitem__) for s in reference]
    hits = sum(max(range(len(s)), key=s.__getitem__) in e.correct for s, e in zip(reference, MC))
    assert fast.accuracy == hits / len(MC)
    assert len({round(v, 3) for s in reference for v in s}) > 5, "degenerate scores would not test anything"


@pytest.mark.parametrize("max_length", [256, 14, 4])
def test_answer_loss_rides_in_the_scoring_forward(scorer, max_length):
    """``answer_loss=True`` gives the loss of the encoded query batch and leaves every score as it was."""
    from deltameta.tasks import encode_examples, lm_loss

    logits_fn, tokenizer = scorer
    plain = score_multiple_choice(logits_fn, tokenizer, MC, TEMPLATE, max_length=max_length, batch_size=2)
    with_loss = score_multiple_choice(logits_fn, tokenizer, MC, TEMPLATE, max_length=max_length, batch_size=2,
                                      answer_loss=True)
    batch = encode_examples(tokenizer, MC, TEMPLATE, max_length)
    want = float(lm_loss(logits_fn(batch["input_ids"], batch["attention_mask"]), batch["labels"]))
    assert plain.answer_loss is None
    assert with_loss.answer_loss == pytest.approx(want, rel=1e-5, abs=1e-5)
    for got, want_scores in zip(with_loss.scores, plain.scores):
        assert got == pytest.approx(want_scores, abs=1e-4)
    assert (with_loss.predictions, with_loss.accuracy, with_loss.accuracy_norm) == (
        plain.predictions, plain.accuracy, plain.accuracy_norm)


def test_answer_loss_is_left_out_for_a_mix_of_multiple_choice_and_free_form(scorer):
    from deltameta.tasks import evaluate_examples

    logits_fn, tokenizer = scorer
    assert evaluate_examples(logits_fn, tokenizer, MC, TEMPLATE, answer_loss=True)["answer_loss"] > 0
    assert evaluate_examples(logits_fn, tokenizer, FREE, TEMPLATE, answer_loss=True)["answer_loss"] > 0
    assert evaluate_examples(logits_fn, tokenizer, MC + FREE[:1], TEMPLATE, answer_loss=True)["answer_loss"] is None
    assert evaluate_examples(logits_fn, tokenizer, MC, TEMPLATE)["answer_loss"] is None


@pytest.mark.parametrize("demos", [False, True])
def test_free_form_generation_unchanged(scorer, demos):
    logits_fn, tokenizer = scorer
    in_context = DEMOS if demos else None
    prompts = [TEMPLATE.render_prompt(e, in_context or ()) for e in FREE]
    prompt_ids = [p for p, _ in tokenize_pairs(tokenizer, prompts, [""] * len(prompts), add_eos=False)]
    pad = pad_token_id(tokenizer)
    reference = _reference_generate(logits_fn, prompt_ids, 8, set(), pad)
    assert greedy_generate(logits_fn, prompt_ids, 8, (), pad) == reference
    # stopping on a token the reference generates mid-way stops each row at the same place
    stop = reference[0][3] if len(reference[0]) > 3 else reference[0][-1]
    stopped = _reference_generate(logits_fn, prompt_ids, 8, {stop}, pad)
    assert greedy_generate(logits_fn, prompt_ids, 8, (stop,), pad) == stopped
    fast = score_free_form(logits_fn, tokenizer, FREE, TEMPLATE, in_context=in_context, batch_size=2)
    budget = max(len(t) for _, t in tokenize_pairs(tokenizer, prompts, [TEMPLATE.render_target(e.target) for e in FREE],
                                                  add_eos=False)) + 4
    stops = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in _reference_generate(logits_fn, prompt_ids, budget, stops, pad)]
    assert fast.predictions == [t.strip().split("\n", 1)[0].strip() if t.strip() else "" for t in texts]


@pytest.mark.parametrize("demos", [False, True])
def test_free_form_answer_loss_rides_in_the_prefill(scorer, demos):
    """``answer_loss=True`` gives the loss of the encoded query batch and generates the same answers."""
    from deltameta.tasks import encode_examples, lm_loss

    logits_fn, tokenizer = scorer
    in_context = DEMOS if demos else None
    plain = score_free_form(logits_fn, tokenizer, FREE, TEMPLATE, in_context=in_context, batch_size=2)
    with_loss = score_free_form(logits_fn, tokenizer, FREE, TEMPLATE, in_context=in_context, batch_size=2,
                                answer_loss=True)
    batch = encode_examples(tokenizer, FREE, TEMPLATE, 256, in_context=in_context)
    want = float(lm_loss(logits_fn(batch["input_ids"], batch["attention_mask"]), batch["labels"]))
    assert plain.answer_loss is None
    assert with_loss.answer_loss == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert (with_loss.predictions, with_loss.exact, with_loss.normalized) == (
        plain.predictions, plain.exact, plain.normalized)


def test_free_form_answer_loss_is_left_to_the_caller_when_a_prompt_is_cut_differently(scorer):
    """Generation keeps ``max_length - max_new_tokens`` prompt tokens, a loss row ``max_length - answer``."""
    logits_fn, tokenizer = scorer
    plain = score_free_form(logits_fn, tokenizer, FREE, TEMPLATE, max_length=12, batch_size=2)
    with_loss = score_free_form(logits_fn, tokenizer, FREE, TEMPLATE, max_length=12, batch_size=2, answer_loss=True)
    assert with_loss.answer_loss is None
    assert with_loss.predictions == plain.predictions


def test_free_form_scoring_builds_no_autograd_graph(scorer):
    logits_fn, tokenizer = scorer
    grad_enabled = []

    def recording(*args, **kwargs):
        grad_enabled.append(torch.is_grad_enabled())
        return logits_fn(*args, **kwargs)

    with torch.enable_grad():
        score_free_form(recording, tokenizer, FREE, TEMPLATE, answer_loss=True)
    assert grad_enabled and not any(grad_enabled)


def test_cached_generation_passes_the_cache_under_the_models_current_keyword(scorer):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns on the old name (removed in 5.40)."""
    import warnings

    logits_fn, tokenizer = scorer
    prompt_ids = [p for p, _ in tokenize_pairs(tokenizer, ["Q: q\nA:"], [""], add_eos=False)]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        assert len(greedy_generate(logits_fn, prompt_ids, 3, (), pad_token_id(tokenizer))[0]) == 3


def test_generation_stops_once_the_first_line_is_complete(tiny_tokenizer):
    """A row stops at the newline that ends its first non-blank line; the prediction is unchanged."""
    tokenizer = tiny_tokenizer
    script = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "\n42\nxyzwvu"]
    calls = []

    def scripted(ids, mask, past_key_values=None, **kwargs):  # emits script[step] at every step
        calls.append(ids.shape[1])
        logits = torch.zeros(ids.shape[0], ids.shape[1], len(tokenizer))
        logits[:, -1, script[len(calls) - 1]] = 10.0
        return logits

    result = score_free_form(scripted, tokenizer, [Example("q", "42")], TEMPLATE, max_new_tokens=10)
    assert result.predictions == ["42"] and result.exact == [True]
    assert len(calls) == 4, "prefill + 3 steps: stopped at the second newline, not after 10 tokens"


def test_packed_mask_blocks():
    from deltameta.tasks.scoring import block_causal_mask

    mask = block_causal_mask(torch.tensor([[-1, 0, 0, 1, 1, 2]]))[0, 0]
    assert mask[3].tolist() == [False, True, True, True, False, False]  # option 1: prompt + itself
    assert mask[5].tolist() == [False, True, True, False, False, True]  # option 2 does not see option 1
    assert mask[0].tolist() == [True, False, False, False, False, False]  # padding sees only itself
