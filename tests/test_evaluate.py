"""``deltameta evaluate``: every method on the same episodes, results/table/plots, budget, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltameta.config import build_config
from deltameta.errors import ConfigError, ModelLoadError
from deltameta.evaluate import METHODS, EvaluateConfig, Evaluator, mean_ci, run_evaluate
from test_finetune_helpers import TINY, copy_adapter_for_other_base

#: Two multiple-choice tasks and one free-form task.
TASKS = dict(tasks="builtin:kv_lookup,word_category,caesar", splits="", split="", builtin_tasks_per_family=1,
             builtin_examples_per_task=16)
#: What evaluate runs when every adapter is given and ``methods`` is not.
DEFAULT_METHODS = [m for m in METHODS if m != "multitask-dynamic"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path, runs=None, **overrides):
    values = dict(TINY, **TASKS, episodes=2, shots=3, query_size=3, steps=[0, 2, 3], max_length=64,
                  output_dir=str(tmp_path / "eval"))
    if runs is not None:
        values["adapters"] = {"meta": str(runs["meta"]), "multitask": str(runs["multitask"])}
    values.update(overrides)
    return build_config(EvaluateConfig, overrides=values)


def test_evaluate_all_methods_on_the_same_episodes(tmp_path, meta_adapter_runs):
    results = run_evaluate(_config(tmp_path, meta_adapter_runs, plots=True))
    out = tmp_path / "eval"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results, default=str))
    assert list(results["methods"]) == DEFAULT_METHODS, "multitask-dynamic runs on request only"
    assert set(results["tasks"]) == {"kv_lookup__000", "word_category__000", "caesar__000"}
    for task, entry in results["tasks"].items():
        ids = [e["id"] for e in entry["episodes"]]
        assert ids == [f"{task}#0", f"{task}#1"]
        assert len({e["fingerprint"] for e in entry["episodes"]}) == 2, "episodes differ"
        for record in entry["episodes"]:
            assert len(record["support"]) == 3 and len(record["query"]) == 3
            assert not set(record["support"]) & set(record["query"])
        for method in results["methods"]:
            slot = entry["methods"][method]
            assert slot["episodes"] == ids, f"{method} ran on other episodes"
            for step in ("0", "2", "3"):
                assert len(slot["accuracy"][step]) == 2
                assert all(0.0 <= a <= 1.0 for a in slot["accuracy"][step])
            assert slot["passes"] == ([3, 3] if results["methods"][method]["trains"] else [0, 0])
        # fresh LoRA starts at B = 0: before any step it is the base model
        assert entry["methods"]["fresh-lora"]["accuracy"]["0"] == entry["methods"]["zero-shot"]["accuracy"]["0"]
        for method in ("fresh-lora", "multitask", "meta", "meta-dynamic"):
            losses = entry["methods"][method]["support_loss"]
            assert sum(losses["3"]) < sum(losses["0"]), f"{method}: adaptation does not lower the support loss"
    meta = results["tasks"]["caesar__000"]["methods"]
    assert meta["meta"]["support_loss"]["0"] != meta["meta-dynamic"]["support_loss"]["0"], "dynamic part inactive"
    budget = results["budget"]
    assert budget["adaptation"]["max_steps"] == 3 and budget["adaptation"]["optimizer"] == "sgd"
    assert budget["preparation"]["meta"]["forward_backward_passes"] == 12
    assert budget["preparation"]["multitask"]["forward_backward_passes"] == 12
    assert budget["preparation"]["multitask"]["algorithm"] == "multitask"
    assert budget["parity"] == {"adaptation": True, "preparation": True}
    summary = results["summary"]["methods"]
    assert all(summary[m]["3"]["n"] == 3 for m in DEFAULT_METHODS)
    assert "meta - multitask" in results["summary"]["comparisons"]
    assert set(results["timing"]["per_episode_seconds"]) == set(DEFAULT_METHODS)
    table = (out / "results.md").read_text()
    for method in DEFAULT_METHODS:
        assert f"| {method} |" in table
    assert "95% CI" in table and "forward/backward passes" in table
    assert (out / "plots" / "accuracy_vs_steps.png").stat().st_size > 0
    assert (out / "plots" / "per_task.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="already holds a evaluate run|already holds an evaluate run"):
        run_evaluate(_config(tmp_path, meta_adapter_runs))


def test_one_base_serves_every_method_exactly(tmp_path, meta_adapter_runs):
    """Static meta = plain PEFT, meta-dynamic = the delta model = load_meta_adapter; weights are restored per episode."""
    from peft import PeftModel

    from deltameta.deltas import load_meta_adapter

    config = _config(tmp_path, meta_adapter_runs)
    out = tmp_path / "eval"
    out.mkdir()
    evaluator = Evaluator(config, out)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    model = evaluator.model

    def logits(method):
        from deltameta.finetune import common

        if method == "meta-dynamic":  # deltameta's delta model on the shared frozen base
            with torch.no_grad():
                return evaluator.delta.model(input_ids=ids).logits
        evaluator.current = method
        common.activate(model, {"meta": "meta", "meta-dynamic": "meta"}[method])
        try:
            with torch.no_grad():
                return model(input_ids=ids).logits
        finally:
            evaluator.current = None

    peft_dir = meta_adapter_runs["meta"] / "peft"
    from deltameta.base import load_base

    reference = PeftModel.from_pretrained(load_base("tiny-random-llama", "none", device="cpu")[0], str(peft_dir))
    dynamic = load_meta_adapter(load_base("tiny-random-llama", "none", device="cpu")[0], peft_dir)
    with torch.no_grad():
        assert torch.allclose(logits("meta"), reference(input_ids=ids).logits, atol=1e-5)
        assert torch.allclose(logits("meta-dynamic"), dynamic(input_ids=ids).logits, atol=1e-5)
    episode = evaluator.episodes_of(evaluator.tasks[0])[0]
    first = evaluator.run_method("meta", episode)
    evaluator.run_method("fresh-lora", episode)
    evaluator.run_method("meta-dynamic", evaluator.episodes_of(evaluator.tasks[1])[1])
    again = evaluator.run_method("meta", episode)
    dynamic_again = evaluator.run_method("meta-dynamic", evaluator.episodes_of(evaluator.tasks[1])[1])
    assert first["accuracy"] == again["accuracy"]
    assert torch.allclose(logits("meta-dynamic"), dynamic(input_ids=ids).logits, atol=1e-5), "delta model not restored"
    assert dynamic_again["query_loss"] == evaluator.run_method("meta-dynamic", evaluator.episodes_of(evaluator.tasks[1])[1])["query_loss"]
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(first["support_loss"].values(), again["support_loss"].values()))
    with torch.no_grad():
        assert torch.allclose(logits("meta"), reference(input_ids=ids).logits, atol=1e-5), "meta weights not restored"


def test_methods_without_adapters_and_cli(tmp_path, capsys):
    from deltameta.cli import main

    args = ["evaluate", *[f"{k}={v}" for k, v in TINY.items()], f"tasks={TASKS['tasks']}", "splits=", "split=",
            "builtin_tasks_per_family=1", "builtin_examples_per_task=16", "episodes=1", "shots=2", "query_size=2",
            "steps=[0,1]", "max_tasks=2", f"output_dir={tmp_path / 'eval'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "zero-shot" in out and "icl" in out and "fresh-lora" in out and "meta " not in out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results["methods"]) == ["zero-shot", "icl", "fresh-lora"]
    base = json.loads((tmp_path / "eval" / "run.json").read_text())["base"]  # the exact weights are recorded
    assert base["name"] == "tiny-random-llama" and base["seed"] == 0 and "files" in base["weights"]
    assert main(args + ["methods=[zero-shot, meta-dynamc]"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'meta-dynamc'" in err and "Did you mean 'meta-dynamic'?" in err and "Traceback" not in err


def test_bad_input_errors(tmp_path, meta_adapter_runs):
    with pytest.raises(ConfigError, match="method 'multitask' needs the multitask adapter"):
        run_evaluate(_config(tmp_path, methods=["zero-shot", "multitask"]))
    with pytest.raises(ConfigError, match="does not exist"):
        run_evaluate(_config(tmp_path, adapter=str(tmp_path / "missing-run")))
    assert not (tmp_path / "eval").exists(), "a failed setup leaves no results directory"
    other = copy_adapter_for_other_base(meta_adapter_runs["meta"] / "peft", tmp_path / "other")
    with pytest.raises(ModelLoadError, match="made for base model 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        run_evaluate(_config(tmp_path, adapter=str(other)))
    with pytest.raises(ConfigError, match="shots=20 needs at least 21 examples per task"):
        run_evaluate(_config(tmp_path, shots=20))
    with pytest.raises(ConfigError, match="split='dev' is not a split"):
        run_evaluate(_config(tmp_path, splits="train=0.5,validation=0.5", split="dev"))
    with pytest.raises(ConfigError, match="adapters has an unknown key 'metaa'. Did you mean 'meta'"):
        _config(tmp_path, adapters={"metaa": "x"})


def test_mean_ci():
    stats = mean_ci([0.5, 0.7, 0.6])
    assert stats["mean"] == pytest.approx(0.6)
    assert stats["ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)  # t(0.975, df=2)
    assert mean_ci([0.4])["ci95"] is None and mean_ci([])["mean"] is None


def test_merging_evaluations_of_different_methods(tmp_path):
    """Methods evaluated in separate runs merge into the table a single run would give."""
    from deltameta.evaluate import merge_evaluations

    single = run_evaluate(_config(tmp_path / "all", methods=["zero-shot", "fresh-lora", "icl"], plots=False))
    first = run_evaluate(_config(tmp_path / "a", methods=["zero-shot", "fresh-lora"], plots=False))
    second = run_evaluate(_config(tmp_path / "b", methods=["icl"], plots=False))
    merged = merge_evaluations([str(tmp_path / "a" / "eval"), str(tmp_path / "b" / "eval")], str(tmp_path / "merged"))
    assert set(merged["methods"]) == {"zero-shot", "fresh-lora", "icl"}
    assert (tmp_path / "merged" / "results.md").is_file() and (tmp_path / "merged" / "results.json").is_file()
    for task, entry in single["tasks"].items():
        for method in ("zero-shot", "fresh-lora", "icl"):
            assert merged["tasks"][task]["methods"][method]["accuracy"] == entry["methods"][method]["accuracy"], method
    assert merged["summary"]["methods"] == single["summary"]["methods"]

    # on the command line, key=value words may follow the dirs of --merge
    from deltameta.cli import main

    assert main(["evaluate", "--merge", str(tmp_path / "a" / "eval"), str(tmp_path / "b" / "eval"),
                 f"output_dir={tmp_path / 'merged-cli'}"]) == 0
    assert json.loads((tmp_path / "merged-cli" / "results.json").read_text())["summary"] == merged["summary"]
    assert main(["evaluate", "--merge", f"output_dir={tmp_path / 'm0'}"]) == 2

    # parts on other episodes, or repeating a method, are refused
    other = run_evaluate(_config(tmp_path / "c", methods=["icl"], seed=7, plots=False))
    with pytest.raises(ConfigError, match="used episodes"):
        merge_evaluations([str(tmp_path / "a" / "eval"), str(tmp_path / "c" / "eval")], str(tmp_path / "m2"))
    with pytest.raises(ConfigError, match="repeats method"):
        merge_evaluations([str(tmp_path / "b" / "eval"), str(tmp_path / "c" / "eval")], str(tmp_path / "m3"))
    with pytest.raises(ConfigError, match="holds no results.json"):
        merge_evaluations([str(tmp_path / "a" / "eval"), str(tmp_path / "nope")], str(tmp_path / "m4"))
    assert first and second and other


def test_multitask_dynamic_adapts_a_tarp_twin_in_its_own_parameters(tmp_path):
    """multitask-dynamic is exactly meta-dynamic with the twin as the adapter, beside the meta-adapter's run."""
    from deltameta.meta.trainer import run_meta_train
    from meta_helpers import tiny_config
    from test_finetune_helpers import one_thread

    runs = {}
    with one_thread():
        for name, algorithm in (("meta", "fomaml"), ("multitask", "multitask")):
            runs[name] = run_meta_train(tiny_config(tmp_path / name, algorithm=algorithm, delta="tarp", controller="none",
                                                    outer_steps=2, eval_every=0, checkpoint_every=0, export=True)).run_dir
        both = Evaluator(_config(tmp_path, runs, methods=["multitask", "multitask-dynamic", "meta-dynamic"],
                                 output_dir=str(tmp_path / "both")), tmp_path / "both")
        alone = Evaluator(_config(tmp_path, adapter=str(runs["multitask"]), methods=["meta-dynamic"],
                                  output_dir=str(tmp_path / "alone")), tmp_path / "alone")
        assert both.inner_loops["multitask-dynamic"]["parameters"].startswith("delta model")
        assert not both.inner_loops["multitask-dynamic"]["learned_rates"]
        static_differs = False
        for task in both.tasks[:2]:
            for episode in both.episodes_of(task):
                twin = both.run_method("multitask-dynamic", episode)
                again = alone.run_method("meta-dynamic", episode)
                for key in ("accuracy", "support_loss", "query_loss"):
                    for step in ("0", "2", "3"):
                        a, b = twin[key][step], again[key][step]
                        assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-6), (key, step)
                static = both.run_method("multitask", episode)
                static_differs |= static["query_loss"]["3"] != twin["query_loss"]["3"]
                assert both.run_method("multitask-dynamic", episode)["query_loss"] == twin["query_loss"], "restored"
        assert static_differs, "adapting the TARP parameters changed nothing against the static fold"
    from deltameta.evaluate.report import comparison_pairs

    assert ("meta-dynamic", "multitask-dynamic") in comparison_pairs(["multitask", "multitask-dynamic", "meta-dynamic"])
