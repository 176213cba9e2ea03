"""Issue 13, cases 1 and 2: never delete what deltameta did not write; --overwrite only after every check."""

from __future__ import annotations

import json
import os
import stat

import pytest

from deltameta.cli import main
from deltameta.deltas.export import export_peft
from deltameta.errors import ConfigError
from meta_helpers import TINY_RUN, tiny_config

FINISHED = dict(controller="none", ops=["lora-2"], outer_steps=2, export=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny meta-train run with a PEFT export."""
    from deltameta.meta.trainer import run_meta_train

    return run_meta_train(tiny_config(tmp_path_factory.mktemp("finished"), **FINISHED)).run_dir


def _tree(path):
    """``{relative path: bytes}`` of every file under ``path`` (to prove nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- case 1


def test_export_refuses_a_folder_it_did_not_write(finished_run, tmp_path, capsys):
    docs = tmp_path / "mydocs"
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.txt").write_text("years of work")
    (docs / "sub" / "notes.txt").write_text("more")
    for extra in ([], ["--overwrite"]):
        assert main(["export", str(finished_run), "--out", str(docs), *extra]) == 2
        err = capsys.readouterr().err
        assert "holds no deltameta export" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (docs / "thesis.txt").read_text() == "years of work" and (docs / "sub" / "notes.txt").read_text() == "more"


@pytest.mark.parametrize("out", ["run", "parent", "final"])
def test_export_refuses_the_source_run_and_its_parents(finished_run, out, capsys):
    before = _tree(finished_run)
    target = {"run": finished_run, "parent": finished_run.parent, "final": finished_run / "final"}[out]
    assert main(["export", str(finished_run / "final"), "--out", str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "would replace the exported run" in err and "Traceback" not in err
    assert _tree(finished_run) == before


def test_export_to_the_working_directory_is_a_clear_error(finished_run, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert main(["export", str(finished_run), "--out", "."]) == 2
    err = capsys.readouterr().err
    assert "current (or root) directory" in err and "Traceback" not in err
    assert list(empty.iterdir()) == [] and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_replaces_a_previous_export_only_with_overwrite(finished_run, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    assert (out / ".deltameta_export").is_file() and (out / "adapter_config.json").is_file()
    first = _tree(out)
    assert main(["export", str(finished_run), "--out", str(out)]) == 2
    assert "already holds a deltameta export; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(finished_run), "--out", str(out), "--overwrite"]) == 0
    assert _tree(out).keys() == first.keys()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folders left"
    with pytest.raises(ConfigError, match="already holds a deltameta export"):
        export_peft(finished_run, out)


def test_exports_honour_the_umask(finished_run, tmp_path):
    old = os.umask(0o022)
    try:
        export_peft(finished_run, tmp_path / "adapter")
    finally:
        os.umask(old)
    out = tmp_path / "adapter"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for file in out.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name
    assert stat.S_IMODE((finished_run / "run.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((finished_run / "final").stat().st_mode) == 0o755


# ---------------------------------------------------------------------------------------------- case 2


def _meta_args(run, *extra):
    values = dict(TINY_RUN, **FINISHED, output_dir=str(run))
    words = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]
    return ["meta-train", "--overwrite", *words, *extra]


@pytest.mark.parametrize("bad", ["tasks=/nonexistent/tasks", "shots=500", "model=/nonexistent/model"])
def test_meta_train_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(finished_run, tmp_path, bad, capsys):
    import shutil

    run = tmp_path / "runA"
    shutil.copytree(finished_run, run)
    before = _tree(run)
    assert main(_meta_args(run, bad)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert _tree(run) == before, "the old run must stay intact"


def test_meta_train_overwrite_replaces_the_old_run_once_the_new_one_starts(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "runA"
    shutil.copytree(finished_run, run)
    (run / "checkpoints" / "step-000099").mkdir()
    (run / "checkpoints" / "step-000099" / "trainer_state.pt").write_bytes(b"old")
    assert main(_meta_args(run, "outer_steps=1", "export=false")) == 0
    assert not (run / "checkpoints" / "step-000099").exists() and not (run / "peft").exists()
    assert json.loads((run / "run.json").read_text())["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _old_run(path, marker="run.json"):
    path.mkdir()
    (path / marker).write_text('{"status": "finished"}')
    (path / "results.md").write_text("old results")
    (path / "config.yaml").write_text("old: true\n")
    return _tree(path)


def test_finetune_overwrite_keeps_the_old_run_on_bad_input(tmp_path, capsys):
    run = tmp_path / "ft"
    before = _old_run(run)
    code = main(["finetune", "--overwrite", "model=tiny-random-llama", "quantization=none", "progress=false",
                 "tasks=/nonexistent.jsonl", f"output_dir={run}"])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert _tree(run) == before


def test_evaluate_overwrite_keeps_the_old_results_on_a_missing_adapter(tmp_path, capsys):
    out = tmp_path / "eval"
    before = _old_run(out)
    code = main(["evaluate", "--overwrite", "model=tiny-random-llama", "quantization=none", "progress=false",
                 "adapter=nosuch", f"output_dir={out}"])
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert out.is_dir() and _tree(out) == before
