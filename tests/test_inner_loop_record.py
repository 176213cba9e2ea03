"""Issue 10: the inner loop travels with the adapter, and evaluate adapts a meta-adapter exactly as meta-training did.

* the meta-state, the export's ``deltameta.json`` and the card record the inner loop; Meta-SGD's
  learned rates are saved beside them (safetensors);
* ``evaluate`` uses the recorded inner loop by default (learned rates included), always scores
  the trained step count, records what it used and flags overrides;
* ``meta-dynamic`` adapts TARP's own tensors (A, B, Σ map, multiplicative term) on the rebuilt
  delta model, with the structure a task-conditioned controller chooses from each episode's
  support set: its query loss after k steps equals the meta-train inner loop's;
* exports without ``deltameta.json`` (older ones) still load.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from deltameta.config import build_config
from deltameta.errors import MetaStateError
from deltameta.evaluate import EvaluateConfig, Evaluator, run_evaluate
from meta_helpers import TINY_EVAL_TASKS as EVAL_TASKS
from test_finetune_helpers import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
#: Meta-SGD, TARP, a task-conditioned controller: every piece at once.
METASGD_RUN = dict(algorithm="metasgd", delta="tarp", controller="task", inner_steps=2,
                   inner_lr=0.05, outer_steps=3, outer_lr=0.05, eval_every=0, checkpoint_every=0, export=True)


@pytest.fixture(scope="module")
def metasgd_run(tmp_path_factory):
    from deltameta.meta.trainer import run_meta_train
    from meta_helpers import tiny_config

    root = tmp_path_factory.mktemp("metasgd")
    from test_finetune_helpers import one_thread

    with one_thread():
        run_meta_train(tiny_config(root, **METASGD_RUN))
    return root / "run"


def _eval_config(tmp_path, adapter, **overrides):
    values = dict(TINY, **EVAL_TASKS, adapter=str(adapter), episodes=1, shots=2, query_size=2, max_length=96,
                  steps=[0, 1], output_dir=str(tmp_path / "eval"))
    values.update(overrides)
    return build_config(EvaluateConfig, overrides=values)


def _strict_json(path: Path):
    def reject(value):
        raise ValueError(f"non-standard JSON constant {value}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_meta_state_export_and_card_record_the_inner_loop(metasgd_run):
    from deltameta.deltas import load_meta_state
    from deltameta.deltas.inner_loop import EXPORT_RATES_FILE

    state = load_meta_state(metasgd_run)
    record = state.inner_loop
    assert (record.algorithm, record.steps, record.optimizer, record.lr, record.clip) == ("metasgd", 2, "sgd", 0.05, 1.0)
    assert record.first_order is True and record.shots == 2 and record.query_size == 2 and record.learned_rates
    rates = state.inner_lrs
    assert set(rates) == set(state.deltas), "one learned rate per delta tensor"
    assert any(abs(float(r.flatten()[0]) - 0.05) > 1e-6 for r in rates.values()), "the rates were not meta-learned"
    export = metasgd_run / "peft"
    meta = _strict_json(export / "deltameta.json")
    assert meta["schema"] == 1 and meta["inner_loop"] == record.to_dict()
    assert meta["controller"]["mode"] == "task" and meta["files"]["inner_lrs"] == EXPORT_RATES_FILE
    from safetensors.torch import load_file

    exported = load_file(str(export / EXPORT_RATES_FILE))
    assert set(exported) == set(rates) and all(torch.equal(exported[k], rates[k]) for k in rates)
    card = (export / "README.md").read_text()
    assert "meta-trained inner loop" in card and "metasgd: 2 step(s) of sgd" in card and EXPORT_RATES_FILE in card


@pytest.mark.parametrize("run", ["metasgd-task-controller", "fomaml-tarp"])
def test_meta_dynamic_equals_the_meta_train_inner_loop(tmp_path, run, metasgd_run, meta_adapter_runs):
    """Query loss after k steps of evaluate's meta-dynamic = the meta-train inner loop's (relative 1e-5).

    ``metasgd-task-controller``: learned rates, structure chosen per episode from its support set;
    ``fomaml-tarp``: TARP everywhere (A, B and the Σ map adapted).
    """
    from deltameta.deltas import build_from_meta_state, delta_parameters, load_meta_state, task_embedding
    from deltameta.meta import data
    from deltameta.meta.algorithms import InnerLoop, make_algorithm
    from deltameta.meta.functional import lm_loss_fn

    run_dir = metasgd_run if run.startswith("metasgd") else meta_adapter_runs["meta"]
    tasks = EVAL_TASKS if run.startswith("metasgd") else dict(tasks="builtin:kv_lookup,caesar", splits="", split="",
                                                             builtin_tasks_per_family=1, builtin_examples_per_task=16)
    out = tmp_path / "eval"
    out.mkdir()
    evaluator = Evaluator(_eval_config(tmp_path, run_dir, methods=["meta-dynamic"], **tasks), out)
    assert evaluator.config.steps == [0, 1, 2], "the trained inner step count is always scored"
    used = evaluator.inner_loops["meta-dynamic"]
    assert used["mismatch"] == [] and used["optimizer"] == "sgd"
    assert used["learned_rates"] == run.startswith("metasgd")

    record = load_meta_state(run_dir).inner_loop
    model, tokenizer, controller = build_from_meta_state(run_dir)
    inner = InnerLoop(steps=record.steps, lr=record.lr, first_order=True, clip=record.clip)
    algorithm = make_algorithm(record.algorithm, model, delta_parameters(model), inner,
                               loss_fn_factory=lambda m, groups: lm_loss_fn(m, groups=groups, use_cache=False))
    assert any(".tarp_sigma." in name for name in algorithm.params)
    with torch.no_grad():
        for name, rate in algorithm.extra_parameters().items():
            rate.copy_(evaluator.delta.inner_lrs[name.removeprefix("metasgd_lr.")])
    for task in evaluator.tasks[:2]:
        episode = evaluator.episodes_of(task)[0]
        result = evaluator.run_method("meta-dynamic", episode)
        support = data.encode(tokenizer, task, episode.support, 96)
        query = data.encode(tokenizer, task, episode.query, 96)
        structure = contextlib.nullcontext()
        if controller is not None:
            decisions = controller.decide(task_embedding(model, support["input_ids"], support["attention_mask"]))
            assert result["structure"] == dict(zip(controller.candidates, decisions)), "structure not chosen per episode"
            structure = controller.apply(model, controller.decision_weights(decisions))
        with structure:
            loss_fn = algorithm.loss_fn()
            with torch.no_grad():
                before = float(loss_fn(algorithm.params, query))
            fast = algorithm.adapt(algorithm.params, support)
            with torch.no_grad():
                after = float(loss_fn(fast, query))
        assert math.isclose(result["query_loss"]["0"], before, rel_tol=1e-5)
        assert math.isclose(result["query_loss"]["2"], after, rel_tol=1e-5), (result["query_loss"], after)
        assert after != before
    if controller is not None:  # results.json keeps each episode's structure, in the candidates' order
        results = evaluator.run()
        assert results["methods"]["meta-dynamic"]["delta_model"]["candidates"] == controller.candidates
        for name, entry in results["tasks"].items():
            structures = entry["methods"]["meta-dynamic"]["structures"]
            assert len(structures) == len(entry["episodes"]) and all(len(s) == len(controller.candidates) for s in structures)
            first = next(t for t in evaluator.tasks if t.name == name)
            support = data.encode(tokenizer, first, evaluator.episodes_of(first)[0].support, 96)
            assert structures[0] == controller.decide(task_embedding(model, support["input_ids"], support["attention_mask"]))
    if run.startswith("metasgd"):  # a fixed rate instead of the learned ones is flagged
        fixed = Evaluator(_eval_config(tmp_path, run_dir, methods=["meta-dynamic"], inner_lr=0.05, **tasks,
                                       output_dir=str(tmp_path / "fixed")), tmp_path / "fixed_out")
        assert fixed.inner_loops["meta-dynamic"]["mismatch"] == ["fixed lr 0.05 instead of the learned Meta-SGD rates"]


def test_evaluate_records_what_each_method_used_and_flags_mismatch(tmp_path, meta_adapter_runs):
    results = run_evaluate(build_config(EvaluateConfig, overrides=dict(
        TINY, tasks="builtin:kv_lookup,caesar", splits="", split="", builtin_tasks_per_family=1,
        builtin_examples_per_task=16, adapter=str(meta_adapter_runs["meta"]), methods=["fresh-lora", "meta", "meta-dynamic"],
        episodes=1, shots=2, query_size=2, max_length=64, steps=[0, 1], inner_lr=0.2, output_dir=str(tmp_path / "e"))))
    assert results["steps"] == [0, 1, 2]
    for method in ("fresh-lora", "meta", "meta-dynamic"):
        used = results["methods"][method]["inner_loop"]
        assert used["lr"] == 0.2 and used["optimizer"] == "sgd" and used["clip"] == 1.0
    assert results["methods"]["meta"]["inner_loop"]["mismatch"] == ["lr 0.2 (trained with 0.05)"]
    assert results["methods"]["meta"]["inner_loop"]["recorded"]["steps"] == 2
    assert results["methods"]["fresh-lora"]["inner_loop"]["mismatch"] == []
    assert results["methods"]["meta-dynamic"]["inner_loop"]["parameters"].startswith("delta model")
    table = (tmp_path / "e" / "results.md").read_text()
    assert "meta adapts with an inner loop other than the one the meta-adapter was trained for: lr 0.2" in table
    for entry in results["tasks"].values():
        assert all(isinstance(v, float) for v in entry["methods"]["meta-dynamic"]["query_loss"]["2"])


def test_evaluate_shots_default_to_the_recorded_ones(tmp_path, metasgd_run):
    """``shots=null`` (the default) draws episodes of the meta-adapter's recorded k; a value overrides it, flagged."""
    values = dict(TINY, **EVAL_TASKS, adapter=str(metasgd_run), methods=["meta"], episodes=1, query_size=2,
                  max_length=96, steps=[0, 1])
    assert build_config(EvaluateConfig, overrides=dict(values, output_dir=str(tmp_path / "a"))).shots is None
    recorded = Evaluator(build_config(EvaluateConfig, overrides=dict(values, output_dir=str(tmp_path / "a"))),
                         tmp_path / "a")
    assert recorded.config.shots == 2, "the run was meta-trained with shots=2"
    assert recorded.inner_loops["meta"]["mismatch"] == []
    episode = recorded.episodes_of(recorded.tasks[0])[0]
    assert len(episode.support) == 2
    given = Evaluator(build_config(EvaluateConfig, overrides=dict(values, shots=3, output_dir=str(tmp_path / "b"))),
                      tmp_path / "b")
    assert given.config.shots == 3 and len(given.episodes_of(given.tasks[0])[0].support) == 3
    assert given.inner_loops["meta"]["mismatch"] == ["shots 3 (trained with 2)"]
    without = dict(values, methods=["zero-shot"], output_dir=str(tmp_path / "c"))
    del without["adapter"]
    assert Evaluator(build_config(EvaluateConfig, overrides=without), tmp_path / "c").config.shots == 4


def test_older_export_without_deltameta_json_still_loads(tmp_path, meta_adapter_runs):
    """An export without deltameta.json rebuilds from its sidecar: the same model as load_meta_adapter."""
    from deltameta.base import load_base
    from deltameta.deltas import load_meta_adapter
    from deltameta.deltas.rebuild import rebuild_delta_model
    from deltameta.finetune.adapters import recorded_inner_loop, resolve_adapter

    old = tmp_path / "old_export"
    shutil.copytree(meta_adapter_runs["meta"] / "peft", old)
    for name in ("deltameta.json", "deltameta_deltas.safetensors"):
        (old / name).unlink()
    assert recorded_inner_loop(resolve_adapter(str(old))) == (None, None)
    base = load_base("tiny-random-llama", "none", device="cpu")[0]
    rebuilt = rebuild_delta_model(base, peft_dir=old)
    assert rebuilt.inner_loop is None and "no deltameta.json" in rebuilt.source
    assert any(".tarp_sigma." in n for n in rebuilt.params)
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    reference = load_meta_adapter(load_base("tiny-random-llama", "none", device="cpu")[0], old)
    with torch.no_grad():
        assert torch.allclose(rebuilt.model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
        plain = base(input_ids=ids).logits
    assert not torch.allclose(plain, reference(input_ids=ids).logits), "the shared base itself was modified"


def test_rates_of_any_broadcastable_shape_map_to_peft_and_bad_files_fail_clearly(tmp_path):
    from deltameta.deltas.inner_loop import InnerLoopRecord, check_rates_fit, rates_for_peft, read_export_record

    params = {"m.q_proj.lora_A.tarp-2": torch.zeros(2, 8), "m.q_proj.lora_B.tarp-2": torch.zeros(8, 2)}
    rates = {"m.q_proj.lora_A.tarp-2": torch.full((2, 8), 0.3), "m.q_proj.lora_B.tarp-2": torch.tensor(0.7)}
    check_rates_fit(rates, params, "test")
    peft = {"base_model.model.m.q_proj.lora_A.meta.weight": torch.zeros(2, 8),
            "base_model.model.m.q_proj.lora_B.meta.weight": torch.zeros(8, 2),
            "base_model.model.m.v_proj.lora_A.meta.weight": torch.zeros(2, 8)}
    mapped = rates_for_peft(rates, peft, "meta", 0.05)
    assert torch.equal(mapped["base_model.model.m.q_proj.lora_A.meta.weight"], torch.full((2, 8), 0.3))
    assert float(mapped["base_model.model.m.q_proj.lora_B.meta.weight"]) == pytest.approx(0.7)
    assert float(mapped["base_model.model.m.v_proj.lora_A.meta.weight"]) == pytest.approx(0.05)
    with pytest.raises(MetaStateError, match="lora_A.tarp-2.*does not broadcast"):
        check_rates_fit({"m.q_proj.lora_A.tarp-2": torch.zeros(3)}, params, "test")
    (tmp_path / "deltameta.json").write_text('{"schema": 99}')
    with pytest.raises(MetaStateError, match="schema 99"):
        read_export_record(tmp_path)
    with pytest.raises(MetaStateError, match="field 'steps'"):
        InnerLoopRecord.from_dict({"schema": 1, "algorithm": "fomaml", "steps": "two"})


@pytest.mark.parametrize("run", ["metasgd-task-controller", "fomaml-tarp"])
def test_finetune_trains_tarp_in_its_own_parameters_after_the_recorded_inner_loop(tmp_path, run, metasgd_run,
                                                                                  meta_adapter_runs):
    """finetune from a TARP meta-adapter: recorded inner loop first, then A, B, Σ map trained, exported exactly."""
    from safetensors.torch import load_file

    from deltameta.deltas import load_meta_adapter
    from deltameta.deltas.rebuild import rebuild_delta_model
    from deltameta.finetune import FinetuneConfig, run_finetune

    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(json.dumps({"input": f"{i} + {i}", "output": str(2 * i)}) for i in range(20)) + "\n")
    controlled = run.startswith("metasgd")
    run_dir = metasgd_run if controlled else meta_adapter_runs["meta"]
    values = dict(TINY, adapter=str(run_dir), tasks=str(data), steps=3, lr=1e-2, max_length=48, eval_every=0,
                  eval_accuracy=False, output_dir=str(tmp_path / "ft"))
    run_finetune(build_config(FinetuneConfig, overrides=values))
    result = json.loads((tmp_path / "ft" / "run.json").read_text())
    inner = result["inner_loop_first"]
    assert inner["inner_steps"] == 2 and inner["examples"] == 2 and len(inner["support_losses"]) == 2
    assert inner["lr"] == ("learned" if controlled else 0.05)
    assert result["trained"].startswith("delta model")
    last = tmp_path / "ft" / "last"
    meta = _strict_json(last / "deltameta.json")
    assert meta["inner_loop"]["algorithm"] == ("metasgd" if controlled else "fomaml")
    start = load_file(str(run_dir / "peft" / "deltameta_deltas.safetensors"))
    trained = load_file(str(last / "deltameta_deltas.safetensors"))
    moved = {n for n in trained if not torch.equal(trained[n], start[n])}
    if controlled:
        assert isinstance(result["structure"], dict) and meta["decisions"] == result["structure"]
        assert meta["structure_source"] == "the support examples of the fine-tuning data"
        chosen = {f"{layer}.{kind}.{op}" for layer, op in result["structure"].items() if op != "skip"
                  for kind in ("lora_A", "lora_B", "tarp_sigma")}
        assert moved and moved <= chosen, "only the tensors of the chosen structure train"
    else:
        sigmas = {n for n in trained if ".tarp_sigma." in n}
        assert sigmas and sigmas <= moved, "the TARP Σ map was not trained"
    # the saved export is exact: the rebuilt delta model = load_meta_adapter (static fold + sidecar)
    from deltameta.base import load_base

    ids = torch.randint(0, 250, (1, 9), generator=torch.Generator().manual_seed(3))
    rebuilt = rebuild_delta_model(load_base("tiny-random-llama", "none", device="cpu")[0], peft_dir=last)
    structure = (rebuilt.controller.apply(rebuilt.model, rebuilt.controller.decision_weights(list(result["structure"].values())))
                 if controlled else contextlib.nullcontext())
    with torch.no_grad(), structure:
        exact = rebuilt.model(input_ids=ids).logits
    with torch.no_grad():
        loaded = load_meta_adapter(load_base("tiny-random-llama", "none", device="cpu")[0], last)(input_ids=ids).logits
    assert torch.allclose(exact, loaded, atol=1e-5)
    # inner_loop_first=false: no recorded inner loop
    run_finetune(build_config(FinetuneConfig, overrides=dict(values, inner_loop_first=False, output_dir=str(tmp_path / "ft2"))))
    assert json.loads((tmp_path / "ft2" / "run.json").read_text())["inner_loop_first"] is None


def test_inner_loop_fidelity_benchmark_smoke():
    """benchmarks/inner_loop_fidelity.py on a tiny run: meta-dynamic reproduces the inner loop."""
    from benchmark_helpers import load_benchmark

    result = load_benchmark("inner_loop_fidelity").main(["--model", "tiny-random-llama", "--max-tasks", "1", "--episodes", "1"])
    assert result["inner_steps"] == 2 and len(result["episodes"]) == 1
    assert result["max_relative_gap_dynamic"] < 1e-5
    assert result["mean_after"]["inner_loop"] < result["mean_start"]["inner_loop"]
