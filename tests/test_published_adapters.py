"""Every published meta-adapter under adapters/ has a card and loads with plain PEFT."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = sorted(p for p in (ROOT / "adapters").iterdir() if p.is_dir())
CARD_SECTIONS = ("## Base model", "## Task distribution", "## Reproduce", "## Metrics")


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda p: p.name)
def test_adapter_has_card_and_peft_files(adapter):
    card = (adapter / "README.md").read_text()
    for section in CARD_SECTIONS:
        assert section in card, f"{adapter.name}/README.md lacks '{section}'"
    assert "deltameta meta-train" in card
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"]
    assert (adapter / "adapter_model.safetensors").is_file()
    baseline = adapter / "baseline-multitask"  # published beside its compute-matched baseline (adapters/README.md)
    assert (baseline / "adapter_config.json").is_file() and (baseline / "README.md").is_file()
    assert "deltameta evaluate" in card


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [a for a in ADAPTERS if "smollm2-135m" in a.name], ids=lambda p: p.name)
def test_smollm2_adapter_loads_with_plain_peft_and_deltameta(adapter):
    from peft import PeftModel

    from deltameta import load_base, load_meta_adapter

    base, tokenizer = load_base("smollm2-135m", quantization="none", device="cpu")
    batch = tokenizer(["Q: Is the sky blue?\nA:"], return_tensors="pt")
    with torch.no_grad():
        reference = base(**batch).logits
        static = PeftModel.from_pretrained(base, str(adapter))
        static_logits = static(**batch).logits
    assert torch.isfinite(static_logits).all()
    assert (static_logits - reference).abs().max() > 1e-3, "the adapter changes nothing"
    ranks = json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]
    loaded = {name: module.r["default"] for name, module in static.named_modules() if hasattr(module, "r") and "default" in getattr(module, "r", {})}
    for name, rank in ranks.items():
        assert any(key.endswith(name) and value == rank for key, value in loaded.items()), name

    fresh, _ = load_base("smollm2-135m", quantization="none", device="cpu")
    dynamic = load_meta_adapter(fresh, adapter)
    with torch.no_grad():
        dynamic_logits = dynamic(**batch).logits
    assert torch.isfinite(dynamic_logits).all()


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda p: p.name)
def test_learned_rates_cover_every_lora_tensor(adapter):
    """A Meta-SGD adapter is only itself with its learned rates: each PEFT LoRA tensor must get one."""
    from safetensors.torch import load_file

    from deltameta.deltas.inner_loop import load_rates, peft_rate_name, read_export_record

    record = read_export_record(adapter)
    if record is None or not record["inner_loop"].get("learned_rates"):
        pytest.skip(f"{adapter.name} has no learned inner rates")
    rates = load_rates(adapter / record["files"]["inner_lrs"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    covered = set()
    for name, rate in rates.items():
        layer, role = peft_rate_name(name, "default")
        key = f"base_model.model.{layer}.{role}.weight"
        assert key in weights, f"rate {name} matches no tensor of adapter_model.safetensors"
        assert torch.broadcast_shapes(rate.shape, weights[key].shape) == weights[key].shape
        assert bool((rate > 0).all()), f"rate {name} is not positive"
        covered.add(key)
    assert covered == set(weights), f"LoRA tensors without a learned rate: {sorted(set(weights) - covered)[:3]}"


def expand_variables(word: str, variables: dict[str, str], line: str) -> str:
    """Replace ``$NAME`` and ``${NAME}`` in ``word`` by the values set earlier in the same code block.

    Raises:
        AssertionError: ``line`` uses a variable that its own block does not set.
    """
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"'{line.strip()[:60]}...' uses ${name}, which its own code block does not set"
        return variables[name]

    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", value, word)


def card_commands(card: str) -> list[list[str]]:
    """Every ``deltameta`` command of a card's bash blocks, with the variables of its own block expanded.

    A card's reader copies one block at a time, so each block must set every variable it uses.

    Args:
        card: The card's Markdown text.

    Returns:
        The words after ``deltameta`` of each command, in order.

    Raises:
        AssertionError: a command uses a variable that its own block does not set.
    """
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", card, flags=re.DOTALL):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                name, _, raw = words[0].partition("=")
                variables[name] = expand_variables(raw, variables, line)
            elif words and words[0] == "deltameta":
                commands.append([expand_variables(word, variables, line) for word in words[1:]])
    return commands


def test_card_commands_expand_within_their_block():
    """The parser behind the card test: variables from another block are an error, not an empty string."""
    card = "```bash\nA=x\ndeltameta evaluate adapter=$A \\\n    seed=1\n```\n\n```bash\ndeltameta evaluate adapter=$A\n```\n"
    with pytest.raises(AssertionError, match=r"uses \$A"):
        card_commands(card)
    assert card_commands(card.split("\n\n")[0]) == [["evaluate", "adapter=x", "seed=1"]]


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda p: p.name)
def test_card_commands_are_valid_and_compare_this_adapter_with_its_baseline(adapter):
    """The card's commands parse as the CLI parses them, and its evaluate command reruns the card's comparison.

    The evaluate command (and every evaluate recipe shipped beside the adapter) must name this adapter
    and its ``baseline-multitask/``, score ``meta`` and ``multitask``, and include the number of inner
    steps the adapter was meta-trained for.
    """
    from deltameta.cli import parse_command_line
    from deltameta.config import build_config
    from deltameta.deltas.inner_loop import read_export_record
    from deltameta.evaluate.config import EvaluateConfig
    from deltameta.meta.config import MetaTrainConfig

    configs = {"evaluate": EvaluateConfig, "meta-train": MetaTrainConfig}
    evaluations = []
    for words in card_commands((adapter / "README.md").read_text()):
        args = parse_command_line(words)
        assert args.command in configs, f"{adapter.name}/README.md runs 'deltameta {args.command}', which this test does not check"
        config = build_config(configs[args.command], args.config, args.overrides)
        if args.command == "evaluate":
            evaluations.append(config)
    evaluations += [build_config(EvaluateConfig, recipe) for recipe in sorted(adapter.glob("*.yaml"))]
    assert evaluations, f"{adapter.name}/README.md shows no 'deltameta evaluate' command"
    record = read_export_record(adapter)
    for config in evaluations:
        assert (ROOT / config.adapter).resolve() == adapter.resolve()
        assert (ROOT / config.multitask_adapter).resolve() == (adapter / "baseline-multitask").resolve()
        assert {"meta", "multitask"} <= set(config.methods)
        if record is not None:
            assert record["inner_loop"]["steps"] in config.steps
