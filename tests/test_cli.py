"""The ``deltameta`` command line as users meet it: help everywhere, clear errors, the README's commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from deltameta.cli import COMMAND_MODULES, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["meta-train", "finetune", "evaluate", "export", "tasks", "models", "recipes"]


def test_top_level_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "deltameta", "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert name in result.stdout
    assert len(COMMAND_MODULES) == len(SUBCOMMANDS)


@pytest.mark.parametrize(
    "words",
    [[name] for name in SUBCOMMANDS] + [["tasks", "list"], ["tasks", "show"], ["models", "list"], ["models", "prepare"], ["models", "path"],
                                          ["recipes", "ls"], ["recipes", "cp"]],
    ids=" ".join,
)
def test_every_subcommand_has_help(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(words + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: deltameta " + " ".join(words) in capsys.readouterr().out


def test_user_errors_are_one_message_and_exit_code_2(capsys):
    assert main(["meta-train", "inner_lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'inner_lrr'" in err and "inner_lr" in err and "Traceback" not in err


def test_overrides_may_follow_options(tmp_path, capsys):
    # `key=value` words after an option are still overrides (argparse alone would reject them)
    assert main(["meta-train", "--overwrite", "model=tiny-random-llama", "outer_stepz=1"]) == 2
    assert "unknown key 'outer_stepz'" in capsys.readouterr().err


def test_unknown_words_are_still_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["models", "list", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_models_list_shows_aliases(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "HuggingFaceTB/SmolLM2-135M-Instruct" in out and "tiny-random-llama" in out


def _readme_block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```(?:bash|python)\n(.*?)```", section, re.S).group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_block_after("Run the tests")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_readme_python_loop_example_runs():
    code = _readme_block_after("### Write your own meta-learning loop")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["query_loss"].item() < namespace["before"].item()
