"""``deltameta tasks list`` and ``deltameta tasks show``."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from deltameta.commands import tasks as tasks_command
from deltameta.errors import DataError

BIGBENCH = Path(__file__).parent / "fixtures" / "tasks" / "bigbench"


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deltameta")
    subparsers = parser.add_subparsers(dest="command")
    tasks_command.add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


def test_list_with_splits(capsys):
    assert run(["tasks", "list", str(BIGBENCH), "--splits", str(BIGBENCH / "splits.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["task", "family", "#examples", "#options", "split"]
    rows = {line.split()[0]: line.split() for line in out[1:-1]}
    assert rows["color__hex"][1:] == ["color", "8", "5", "meta_train"]
    assert rows["color__name"][-1] == "meta_train"  # follows its family
    assert rows["math__add"][3:] == ["-", "meta_train"]  # free-form
    assert rows["animal_sound"][-1] == "dev"
    assert out[-1] == "4 tasks, 3 families; meta_train: 3, dev: 1"


def test_list_builtin_ratio_split(capsys):
    assert run(["tasks", "list", "builtin:linear,caesar", "--builtin-tasks-per-family", "2", "--splits", "train=0.5,test=0.5"]) == 0
    out = capsys.readouterr().out
    assert "linear__001" in out and out.strip().endswith("train: 2, test: 2")


def test_show_marks_loss_span(capsys, monkeypatch, tiny_fp32):
    import deltameta.base

    requested = []
    monkeypatch.setattr(deltameta.base, "load_base", lambda name, **kw: requested.append((name, kw)) or tiny_fp32)
    argv = ["tasks", "show", str(BIGBENCH), "animal_sound", "--model", "tiny-random-llama", "--shots", "2", "--query-size", "1"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "=== support: 2 row(s) ===" in out and "=== query: 1 row(s) ===" in out
    assert out.count("[[ ") == 3 and "<|endoftext|>]]" in out
    assert run(argv + ["--in-context"]) == 0
    icl = capsys.readouterr().out
    assert "query (support in the prompt)" in icl and icl.count("[[ ") == 1
    assert requested[0] == ("tiny-random-llama", {"quantization": "none", "device": "cpu"})


def test_show_unknown_task():
    with pytest.raises(DataError, match="no task named 'animal'"):
        run(["tasks", "show", str(BIGBENCH), "animal", "--model", "tiny-random-llama"])


def test_help_lists_actions(capsys):
    with pytest.raises(SystemExit):
        run(["tasks", "--help"])
    out = capsys.readouterr().out
    assert "list" in out and "show" in out
