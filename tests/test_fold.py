"""The static TARP fold: least squares vs mean, measured on held-out inputs; old meta-states still export."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltameta.base import load_base
from deltameta.deltas import DeltaConfig, collect_fold_moments, delta_parameters, export_peft, inject_deltas, load_meta_state
from deltameta.deltas.fold import add_moments, fold_error, fold_points, least_squares_fold, normalise_moments
from meta_helpers import tiny_config

FIT_TEXTS = ["Once upon a time there was a cat.", "2 + 2 = 4, and 3 + 3 = 6.", "Question: capital of France? Answer: Paris",
             "def f(x): return x * 2", "The quick brown fox jumps over the lazy dog."]
HELDOUT_TEXTS = ["A dog sat on the mat and slept.", "7 - 3 = 4; 9 - 1 = 8.", "Question: 5 + 5? Answer: 10"]


def test_least_squares_recovers_a_constant_map_and_survives_rank_deficiency():
    gen = torch.Generator().manual_seed(0)
    r = 4
    true = torch.randn(r, r, generator=gen, dtype=torch.float64)
    z = torch.randn(500, r, generator=gen, dtype=torch.float64)
    u = z @ true.T
    mean = torch.randn(r, r, generator=gen)  # a (wrong) mean fold: least squares must not need it
    folded = least_squares_fold(mean, z.T @ z / 500, u.T @ z / 500)
    torch.testing.assert_close(folded.double() + torch.eye(r, dtype=torch.float64), true, rtol=1e-4, atol=1e-4)
    # z only spans 2 of 4 directions: the fit holds there and the other directions keep the mean fold
    basis = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0]
    z2 = torch.randn(500, 2, generator=gen, dtype=torch.float64) @ basis[:, :2].T
    u2 = z2 @ true.T
    folded2 = least_squares_fold(mean, z2.T @ z2 / 500, u2.T @ z2 / 500).double() + torch.eye(r, dtype=torch.float64)
    assert torch.isfinite(folded2).all()
    torch.testing.assert_close(folded2 @ basis[:, :2], true @ basis[:, :2], rtol=1e-4, atol=1e-4)
    bar = mean.double() + torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(folded2 @ basis[:, 2:], bar @ basis[:, 2:], rtol=1e-4, atol=1e-4)


def _heldout(tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, :2] = -100
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}


@pytest.mark.parametrize("sigma_input", ["projected", "token"])
def test_least_squares_fold_is_closer_than_mean_on_heldout_inputs(sigma_input):
    model, tokenizer = load_base("tiny-random-llama", quantization="none", device="cpu")
    inject_deltas(model, DeltaConfig(delta="tarp", rank=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                     tarp_sigma_input=sigma_input))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in delta_parameters(model).items():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if "tarp_sigma" in name else 0.2))
    totals = {}
    for text in FIT_TEXTS:
        batch = tokenizer([text], return_tensors="pt")
        add_moments(totals, collect_fold_moments(model, batch["input_ids"], batch["attention_mask"]))
    means, moments = normalise_moments(totals)
    assert len(means) == len(moments) == 6  # 2 layers x 3 targets
    folds = {method: fold_points(means, moments, method) for method in ("least_squares", "mean")}
    result = fold_error(model, _heldout(tokenizer, HELDOUT_TEXTS), folds)
    ls, mean = result["folds"]["least_squares"], result["folds"]["mean"]
    assert 0 < ls["relative_logit_error"] < mean["relative_logit_error"]
    assert result["answer_tokens"] > 0 and result["loss_base"] != result["loss_dynamic"]


@pytest.mark.parametrize("delta", ["tarp", "lora"])
def test_least_squares_fold_of_the_multiplicative_term_is_closer_than_leaving_it_out(delta):
    from deltameta.deltas.fold import multiplicative_offsets

    model, tokenizer = load_base("tiny-random-llama", quantization="none", device="cpu")
    inject_deltas(model, DeltaConfig(delta=delta, rank=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                     multiplicative=True))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in delta_parameters(model).items():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if "tarp_sigma" in name else 0.2))
    totals = {}
    for text in FIT_TEXTS:
        batch = tokenizer([text], return_tensors="pt")
        add_moments(totals, collect_fold_moments(model, batch["input_ids"], batch["attention_mask"]))
    means, moments = normalise_moments(totals)
    assert len(moments) == 6 and all("yz" in entry for ops in moments.values() for entry in ops.values())
    ops = {name: next(iter(entries)) for name, entries in moments.items()}
    offsets = {"least_squares": multiplicative_offsets(model, moments, ops), "mean": {}}
    folds = {method: fold_points(means, moments, method) for method in ("least_squares", "mean")}
    result = fold_error(model, _heldout(tokenizer, HELDOUT_TEXTS), folds, offsets=offsets)
    ls, mean = result["folds"]["least_squares"], result["folds"]["mean"]
    assert 0 < ls["relative_logit_error"] < mean["relative_logit_error"]


@pytest.fixture(scope="module")
def trained_tarp_run(tmp_path_factory):
    from deltameta.meta.trainer import run_meta_train

    tmp = tmp_path_factory.mktemp("fold")
    config = tiny_config(tmp, controller="none", delta="tarp", outer_steps=6, outer_lr=0.05, eval_every=0,
                         checkpoint_every=0, export=True)
    return run_meta_train(config).run_dir


def test_trained_tarp_adapter_exports_the_least_squares_fold_with_its_measured_error(trained_tarp_run, tmp_path, capsys):
    state = load_meta_state(trained_tarp_run)
    assert state.fold_moments and state.fold_heldout is not None
    assert state.fold_heldout["input_ids"].shape[0] == 8 * 2  # 8 episodes x query_size 2
    sidecar = json.loads((trained_tarp_run / "peft" / "deltameta_tarp.json").read_text())
    error = sidecar["fold_error"]
    assert sidecar["fold_method"] == error["method"] == "least_squares"
    ls, mean = error["folds"]["least_squares"], error["folds"]["mean"]
    assert ls["relative_logit_error"] < mean["relative_logit_error"]
    assert error["relative_logit_error"] == ls["relative_logit_error"]
    card = (trained_tarp_run / "peft" / "README.md").read_text()
    assert "TARP static fold: least squares" in card and "loss gain kept" in card

    from deltameta.commands import export as export_command

    parser = argparse.ArgumentParser(prog="deltameta")
    export_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(trained_tarp_run), "--out", str(tmp_path / "adapter")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "TARP static fold: least squares" in out and f"{100 * ls['relative_logit_error']:.1f}%" in out


def test_old_meta_state_without_moments_exports_the_mean_fold_with_a_warning(trained_tarp_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained_tarp_run / "final", old)
    stats = load_file(str(old / "fold_stats.safetensors"))
    save_file({k: v for k, v in stats.items() if (k.count("::") == 1 and not k.startswith("__heldout__")) or k.startswith("__task")}, str(old / "fold_stats.safetensors"))
    state = load_meta_state(old)
    assert state.fold_moments is None and state.fold_heldout is None and state.fold_stats
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_peft(old, tmp_path / "adapter")
    assert any("mean of Σ(x)" in str(w.message) for w in caught)
    assert result.fold_method == "mean" and result.fold_error["heldout"] is None
    for layer, ops in result.sigma_bars.items():
        for op, bar in ops.items():
            torch.testing.assert_close(bar, state.fold_stats[layer][op])
