"""``query_context=support``: query prompts carry the support examples as demonstrations (MetaICL-style).

* meta-train encodes every query after the episode's support examples (up to
  ``max_length * (shots + 1)`` tokens), for the meta-learner and its multitask twin alike;
* the record travels with the adapter (meta-state, ``deltameta.json``, card);
* ``evaluate`` scores the adapted methods' queries the same way by default (a fresh LoRA at
  step 0 is then exactly ICL), flags an override, and its query loss is the same whether it
  rides in the scoring forward or not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deltameta.config import build_config
from deltameta.errors import ConfigError, MetaStateError
from deltameta.evaluate import EvaluateConfig, Evaluator
from meta_helpers import TINY_EVAL_TASKS as EVAL_TASKS
from test_finetune_helpers import TINY, one_thread

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = dict(algorithm="metasgd", delta="lora", controller="none", inner_steps=1, outer_steps=2, outer_lr=0.05,
           eval_every=0, checkpoint_every=0, export=True, query_context="support")


@pytest.fixture(scope="module")
def support_run(tmp_path_factory):
    from deltameta.meta.trainer import run_meta_train
    from meta_helpers import tiny_config

    root = tmp_path_factory.mktemp("query-context")
    with one_thread():
        run_meta_train(tiny_config(root, **RUN))
    return root / "run"


def test_config_rejects_demonstrations_without_shots_and_unknown_values(tmp_path):
    from meta_helpers import tiny_config

    with pytest.raises(ConfigError, match="query_context=support .* shots=0"):
        tiny_config(tmp_path, algorithm="multitask", shots=0, query_context="support")
    with pytest.raises(ConfigError, match="query_context"):
        tiny_config(tmp_path, query_context="demos")
    with pytest.raises(ConfigError, match="query_context"):
        build_config(EvaluateConfig, overrides=dict(TINY, query_context="demos", output_dir=str(tmp_path / "e")))
    assert tiny_config(tmp_path, query_context="support").query_max_length() == 96 * 3
    assert tiny_config(tmp_path).query_max_length() == 96


def test_meta_train_queries_follow_the_support_examples(tmp_path):
    """The trainer's query batch is the support examples + each query, encoded like ICL; the support batch is not."""
    from deltameta.meta.run_dir import prepare_run_dir
    from deltameta.meta.trainer import MetaTrainer
    from deltameta.tasks import encode_examples
    from meta_helpers import tiny_config

    def trainer(name, **overrides):
        config = tiny_config(tmp_path / name, algorithm="multitask", controller="none", delta="lora", **overrides)
        return MetaTrainer(config, prepare_run_dir(config.output_dir))

    with one_thread():
        plain, demos = trainer("a"), trainer("b", query_context="support")
    episode = demos.sampler.episode(0)
    support, query = demos._encode(episode)
    plain_support, plain_query = plain._encode(episode)
    assert torch.equal(support["input_ids"], plain_support["input_ids"])
    expected = encode_examples(demos.tokenizer, episode.query, episode.task.template, 96 * 3, in_context=episode.support)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(query[key], expected[key]), key
    assert query["input_ids"].shape[1] > plain_query["input_ids"].shape[1]
    # the answers (label tokens) are the same; only the prompts grew
    answers = lambda batch: [row[row != -100].tolist() for row in batch["labels"]]  # noqa: E731
    assert answers(query) == answers(plain_query)
    text = demos.tokenizer.decode(query["input_ids"][0][query["attention_mask"][0].bool()])
    first = episode.task.template.render_input(episode.support[0]).strip()
    assert first[:20] in text


def test_the_record_travels_with_the_adapter(support_run):
    from deltameta.deltas import load_meta_state
    from deltameta.deltas.inner_loop import InnerLoopRecord

    record = load_meta_state(support_run).inner_loop
    assert record.query_context == "support"
    meta = json.loads((support_run / "peft" / "deltameta.json").read_text())
    assert meta["inner_loop"]["query_context"] == "support"
    assert "support examples as in-context demonstrations" in (support_run / "peft" / "README.md").read_text()
    older = {k: v for k, v in record.to_dict().items() if k != "query_context"}
    assert InnerLoopRecord.from_dict(older).query_context == "none", "records before the field read as none"
    with pytest.raises(MetaStateError, match="query_context"):
        InnerLoopRecord.from_dict(dict(record.to_dict(), query_context="all"))


def _evaluator(tmp_path, adapter, name, **overrides) -> Evaluator:
    values = dict(TINY, **EVAL_TASKS, adapter=str(adapter), episodes=2, query_size=3, max_length=96, steps=[0, 1],
                  methods=["icl", "fresh-lora", "meta"], output_dir=str(tmp_path / name))
    values.update(overrides)
    return Evaluator(build_config(EvaluateConfig, overrides=values), tmp_path / f"{name}-out")


def test_evaluate_scores_adapted_queries_with_the_recorded_demonstrations(tmp_path, support_run):
    evaluator = _evaluator(tmp_path, support_run, "recorded")
    assert evaluator.config.query_context == "support" and evaluator.queries_in_context
    for method in ("fresh-lora", "meta"):
        assert evaluator.inner_loops[method]["query_context"] == "support"
    assert evaluator.inner_loops["meta"]["mismatch"] == []
    moved = False
    for task in evaluator.tasks[:2]:
        for episode in evaluator.episodes_of(task):
            icl = evaluator.run_method("icl", episode)
            fresh = evaluator.run_method("fresh-lora", episode)
            # a fresh LoRA (B = 0) with the support examples in its prompts is the base model doing ICL
            assert fresh["accuracy"]["0"] == icl["accuracy"]["0"]
            assert fresh["accuracy_norm"]["0"] == icl["accuracy_norm"]["0"]
            riding = evaluator.run_method("meta", episode)
            evaluator.query_loss_from_scores = False
            try:
                own = evaluator.run_method("meta", episode)
            finally:
                evaluator.query_loss_from_scores = True
            for step in ("0", "1"):
                assert math.isclose(riding["query_loss"][step], own["query_loss"][step], rel_tol=1e-5)
                assert riding["accuracy"][step] == own["accuracy"][step]
            moved |= riding["query_loss"]["1"] != riding["query_loss"]["0"]
    assert moved, "the adaptation step changed no query loss"
    table = __import__("deltameta.evaluate.report", fromlist=["markdown_table"]).markdown_table(evaluator.run())
    assert "fresh-lora, meta score each query after the k support examples" in table


def test_evaluate_without_demonstrations_differs_and_is_flagged(tmp_path, support_run):
    with_demos = _evaluator(tmp_path, support_run, "with", methods=["meta"])
    without = _evaluator(tmp_path, support_run, "without", methods=["meta"], query_context="none")
    assert without.inner_loops["meta"]["mismatch"] == ["query_context none (trained with support)"]
    episode = with_demos.episodes_of(with_demos.tasks[0])[0]
    assert without.run_method("meta", episode)["query_loss"]["0"] != with_demos.run_method("meta", episode)["query_loss"]["0"]


def _finetune_config(tmp_path, name, **overrides):
    """A one-step finetune config on one built-in task, validating on 4 held-out examples, in ``tmp_path / name``."""
    from deltameta.finetune import FinetuneConfig

    values = dict(TINY, tasks="builtin:linear", builtin_examples_per_task=32, steps=1, eval_every=1, batch_size=4,
                  eval_examples=4, max_length=96, output_dir=str(tmp_path / name))
    values.update(overrides)
    return build_config(FinetuneConfig, overrides=values)


def _finetune_trainer(tmp_path, name, **overrides):
    """A finetune trainer of :func:`_finetune_config` (nothing trained yet)."""
    from deltameta.finetune.trainer import _Trainer

    out = tmp_path / name
    out.mkdir()
    with one_thread():
        return _Trainer(_finetune_config(tmp_path, name, **overrides), out, None)


def test_finetune_validates_a_support_adapter_after_its_support_examples(tmp_path, support_run, caplog):
    """Validation prompts carry the inner loop's support examples, as the adapter was meta-trained to answer."""
    from deltameta.finetune import common
    from deltameta.tasks import encode_examples, evaluate_examples

    recorded = _finetune_trainer(tmp_path, "recorded", adapter=str(support_run))
    assert recorded.query_context == "support"
    [(task_name, demos)] = recorded.demonstrations.items()
    assert demos == [item.example for item in recorded._support_items()], "one task: the demonstrations are the support set"
    shots = len(demos)
    assert shots == recorded.record.shots
    for item, (ids, labels) in zip(recorded.val_items, recorded.val_rows, strict=True):
        batch = encode_examples(recorded.tokenizer, [item.example], item.task.template, 96 * (shots + 1), in_context=demos)
        width = int(batch["attention_mask"][0].sum())
        assert ids == batch["input_ids"][0, :width].tolist() and labels == batch["labels"][0, :width].tolist()
    with caplog.at_level("WARNING", logger="deltameta.finetune.trainer"):
        plain = _finetune_trainer(tmp_path, "plain", adapter=str(support_run), query_context="none")
    assert "meta-trained to answer after query_context=support" in caplog.text
    assert plain.demonstrations is None
    answers = lambda labels: [t for t in labels if t != -100]  # noqa: E731
    for (with_demos, with_labels), (without, labels) in zip(recorded.val_rows, plain.val_rows, strict=True):
        assert len(with_demos) > len(without) and answers(with_labels) == answers(labels)
    assert recorded._mean_loss(recorded.val_rows) != plain._mean_loss(plain.val_rows)
    # accuracy: the same scorer as evaluate, with the demonstrations (and their token limit)
    [(task, examples)] = __import__("deltameta.finetune.data", fromlist=["group_by_task"]).group_by_task(recorded.val_items)
    with one_thread():
        expected = evaluate_examples(common.logits_fn(recorded.model, False), recorded.tokenizer, examples, task.template,
                                     96 * (shots + 1), in_context=demos)["accuracy"]
        assert recorded._accuracy() == expected


def test_finetune_records_query_context_and_fresh_lora_defaults_to_none(tmp_path, support_run):
    from deltameta.errors import ConfigError
    from deltameta.finetune import run_finetune

    assert _finetune_trainer(tmp_path, "fresh").query_context == "none"
    fresh_demos = _finetune_trainer(tmp_path, "fresh-demos", query_context="support", shots=3)
    assert [len(d) for d in fresh_demos.demonstrations.values()] == [3]
    with pytest.raises(ConfigError, match=r"query_context=support .* \['number_property"):
        _finetune_trainer(tmp_path, "other-val", query_context="support", val_tasks="builtin:number_property")
    with one_thread():
        result = run_finetune(_finetune_config(tmp_path, "run", adapter=str(support_run), dynamic=False))
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["query_context"] == "support"
    assert "`query_context=support`" in (result.adapter_dir / "README.md").read_text()
