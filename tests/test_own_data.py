"""Your own data in every command: ``columns`` and ``template`` for csv, jsonl and parquet files."""

from __future__ import annotations

import csv
import json

import pytest

from deltameta.config import build_config
from deltameta.errors import ConfigError
from deltameta.finetune import FinetuneConfig
from deltameta.meta.config import MetaTrainConfig
from deltameta.tasks import PromptTemplate, load_tasks
from deltameta.tasks.hf import parse_columns

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLUMNS = "{input: text, target: label, options: choices, task: dataset}"
TEMPLATE = "Q: {input}\\nA:||| {target}"
FAMILIES = ("plus", "minus", "times", "parity")


def _rows():
    rows = []
    for family in FAMILIES:
        for n in range(10):
            value = {"plus": n + 1, "minus": n - 1, "times": 2 * n, "parity": n % 2}[family]
            options = [str(value), str(value + 3)]
            rows.append({"text": f"{family} {n}", "label": str(value), "choices": json.dumps(options),
                         "dataset": f"{family}__{n % 2}"})
    return rows


@pytest.fixture()
def own_csv(tmp_path):
    path = tmp_path / "mine.csv"
    rows = _rows()
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_every_file_format_honours_columns_and_template(tmp_path, own_csv):
    rows = _rows()
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parquet = tmp_path / "mine.parquet"
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "mine.jsonl").write_text(jsonl.read_text(), encoding="utf-8")
    columns = parse_columns(COLUMNS)
    for source in (own_csv, jsonl, parquet, folder):
        collection = load_tasks(source, columns=columns, template=TEMPLATE)
        assert sorted(collection.families) == sorted(FAMILIES), source
        assert len(collection) == 8
        task = collection["plus__1"]
        assert task.template == PromptTemplate("Q: {input}\nA:", " {target}")
        assert [e.input for e in task.examples] == ["plus 1", "plus 3", "plus 5", "plus 7", "plus 9"]
        assert task.examples[0].options == ["2", "5"] and task.examples[0].target == "2"
    with pytest.raises(ConfigError, match="built-in tasks .* have fixed fields"):
        load_tasks("builtin:linear", columns=columns)


def test_hub_dataset_honours_columns_and_template(monkeypatch):
    import datasets

    from deltameta.tasks import hf

    asked = []

    def fake_load(source, **kwargs):  # the hub is offline here: serve the rows as that dataset
        asked.append((source, kwargs))
        return datasets.Dataset.from_list(_rows())

    monkeypatch.setattr(hf, "load_hf_dataset", fake_load)
    collection = load_tasks("someone/mine", columns=parse_columns(COLUMNS), template=TEMPLATE, hf_split="validation")
    assert asked == [("someone/mine", {"split": "validation", "config": None, "revision": None})]
    assert len(collection) == 8 and collection["parity__0"].template == PromptTemplate("Q: {input}\nA:", " {target}")


def test_columns_and_template_keys_parse_and_fail_clearly():
    for text in (COLUMNS, "input=text,target=label,options=choices,task=dataset"):
        config = build_config(MetaTrainConfig, overrides=[f"columns={text}", "template={input} =>||| {target}"])
        assert config.columns == {"input": "text", "target": "label", "options": "choices", "task": "dataset"}
        assert config.template == "{input} =>||| {target}"
    with pytest.raises(ConfigError, match="unknown column mapping key 'inputs'.*valid keys: input, output"):
        build_config(FinetuneConfig, overrides=["columns={inputs: text}"])
    with pytest.raises(ConfigError, match="needs a space after the colon"):
        build_config(FinetuneConfig, overrides=["columns={input:text}"])
    with pytest.raises(ConfigError, match="'output' twice"):
        build_config(FinetuneConfig, overrides=["columns={output: a, target: b}"])
    with pytest.raises(ConfigError, match="must be a string containing '{input}'"):
        build_config(FinetuneConfig, overrides=["template=no placeholder"])


def test_csv_with_other_columns_meta_trains_finetunes_and_evaluates(tmp_path, own_csv, capsys):
    from deltameta.cli import main

    common = ["model=tiny-random-llama", "quantization=none", "progress=false", "plots=false", f"tasks={own_csv}",
              f"columns={COLUMNS}", f"template={TEMPLATE}", "max_length=48"]
    meta = tmp_path / "meta"
    assert main(["meta-train", *common, "splits=train=0.5,validation=0.5", "shots=2", "query_size=2", "rank=2",
                 "ops=[tarp-2, skip]", "target_modules=[q_proj]", "outer_steps=2", "meta_batch_size=2",
                 "eval_every=0", "eval_tasks=1", "checkpoint_every=0", f"output_dir={meta}"]) == 0
    assert (meta / "peft" / "adapter_config.json").is_file()
    finetune = tmp_path / "ft"
    assert main(["finetune", *common, f"adapter={meta}", "task_names=[plus__0]", "steps=2", "batch_size=2",
                 "eval_every=0", f"output_dir={finetune}"]) == 0
    run = json.loads((finetune / "run.json").read_text())
    assert run["status"] == "finished" and run["data"] == {"plus__0": {"train": 4, "validation": 1}}
    evaluate = tmp_path / "eval"
    assert main(["evaluate", *common, f"adapter={meta}", "splits=train=0.5,validation=0.5", "methods=[zero-shot, meta]",
                 "episodes=1", "shots=2", "query_size=2", "steps=[0, 1]", f"output_dir={evaluate}"]) == 0
    results = json.loads((evaluate / "results.json").read_text())
    assert set(results["methods"]) == {"zero-shot", "meta"}
    assert (meta / "config.yaml").read_text().count("dataset") == 1  # the mapping is recorded in the run
    assert "Traceback" not in capsys.readouterr().err
