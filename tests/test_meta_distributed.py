"""Task-parallel meta-training: 2 gloo processes on CPU reproduce the single-process run."""

from __future__ import annotations

import os
import shutil
import socket
import types

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from deltameta.errors import ConfigError
from deltameta.meta import checkpoint as ckpt
from deltameta.meta import distributed as D
from deltameta.meta.trainer import run_meta_train
from meta_helpers import tiny_config

#: Runs that together cover task-batched and looped inner loops, FOMAML and Meta-SGD (learned inner
#: rates), the task-conditioned controller (gathered embeddings), the global one and an NF4 base.
RUNS = {
    "fomaml-task": dict(algorithm="fomaml", controller="task", task_batched=True, meta_batch_size=4, outer_steps=3,
                        eval_every=0, checkpoint_every=0),
    "metasgd-global": dict(algorithm="metasgd", controller="global", task_batched=False, meta_batch_size=2,
                           outer_steps=4, eval_every=2, checkpoint_every=2),
    # the default 4-bit base: every rank quantizes tiny-random-llama itself (transformers 5's
    # save_pretrained writes only on rank 0 once a process group exists)
    "fomaml-nf4": dict(algorithm="fomaml", controller="none", quantization="nf4", meta_batch_size=2, outer_steps=2,
                       eval_every=0, checkpoint_every=0),
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, resume_dir: str) -> None:
    """One rank: the error scenarios, the RUNS and a resume of a single-process run (1 -> 2 processes)."""
    import pathlib

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    root = pathlib.Path(root)
    with D.torn_down_after():
        errors = {}
        for name, overrides in (("divisible", dict(meta_batch_size=3)),
                                ("mismatch", dict(inner_lr=0.05 if rank == 0 else 0.1))):
            try:
                run_meta_train(tiny_config(root / f"{name}-{rank}", output_dir=str(root / name), **overrides))
                errors[name] = None
            except ConfigError as error:
                errors[name] = str(error)
        (root / f"errors-{rank}.txt").write_text(repr(errors))
        for name, overrides in RUNS.items():
            run_meta_train(tiny_config(root, output_dir=str(root / f"dist-{name}"), **overrides))
        run_meta_train(tiny_config(root, output_dir=resume_dir, **RUNS["metasgd-global"]), resume=True)


def _deltas(run_dir):
    return load_file(str(run_dir / "final" / "deltas.safetensors"))


def _assert_close(expected, actual, what, tolerance=1e-6):
    assert expected.keys() == actual.keys()
    worst = max(float((expected[k] - actual[k]).abs().max()) for k in expected)
    assert worst <= tolerance, f"{what}: max |difference| {worst:.3g}"
    assert any(not torch.equal(expected[k], torch.zeros_like(expected[k])) for k in expected)


def test_two_processes_match_single_process(tmp_path):
    singles = {name: run_meta_train(tiny_config(tmp_path, output_dir=str(tmp_path / f"single-{name}"), **overrides))
               for name, overrides in RUNS.items()}
    # a single-process run, cut back to its step-2 checkpoint, is resumed by 2 processes
    resume_dir = tmp_path / "resume"
    shutil.copytree(singles["metasgd-global"].run_dir, resume_dir)
    shutil.rmtree(ckpt.checkpoint_dir(resume_dir, 4))
    shutil.rmtree(resume_dir / "final")

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), str(resume_dir)), nprocs=2, join=True)

    errors = [eval((tmp_path / f"errors-{rank}.txt").read_text()) for rank in range(2)]
    for rank_errors in errors:
        assert "meta_batch_size=3 cannot be split evenly over 2 processes" in rank_errors["divisible"]
        mismatch = "rank 1 of 2 resolved a different config than rank 0: inner_lr=0.1 (rank 0: 0.05)"
        assert mismatch in rank_errors["mismatch"]
    assert not (tmp_path / "divisible").exists() and not (tmp_path / "mismatch").exists()

    for name, single in singles.items():
        dist_dir = tmp_path / f"dist-{name}"
        _assert_close(_deltas(single.run_dir), _deltas(dist_dir), name)
        if RUNS[name]["controller"] == "none":
            continue
        ca = load_file(str(single.run_dir / "final" / "controller.safetensors"))
        cb = load_file(str(dist_dir / "final" / "controller.safetensors"))
        # the controller's Adam (lr 0.05) amplifies summation-order rounding in its tiny gradients:
        # one process, task-batched vs looped, differs by ~2e-6 there too
        _assert_close(ca, cb, f"{name} controller", tolerance=1e-5)
    _assert_close(_deltas(singles["metasgd-global"].run_dir), _deltas(resume_dir), "resumed on 2 processes")


def test_teardown_waits_for_every_rank_unless_a_run_failed(monkeypatch, caplog):
    calls = []
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    D.teardown()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    D.teardown(synchronize=False)
    assert calls == ["destroy"]
    calls.clear()
    with pytest.raises(ValueError), D.torn_down_after():  # a failed body: no barrier, peers may be gone
        raise ValueError("rank failed")
    with D.torn_down_after(created=False):  # a group this caller did not create stays
        pass
    assert calls == ["destroy"]

    def peer_gone():
        raise RuntimeError("Connection closed by peer")

    calls.clear()
    monkeypatch.setattr(dist, "barrier", peer_gone)
    with caplog.at_level("WARNING", logger="deltameta.meta.distributed"):
        D.teardown()
    assert calls == ["destroy"] and "final barrier failed (Connection closed by peer)" in caplog.text


def test_meta_train_synchronizes_its_teardown_only_after_success(tmp_path, monkeypatch):
    from deltameta.meta import trainer as T

    seen = []
    monkeypatch.setattr(T.D, "setup", lambda device: (D.SINGLE, True))  # as if this call created a group
    monkeypatch.setattr(T.D, "teardown", lambda synchronize=True: seen.append(synchronize))
    config = tiny_config(tmp_path, output_dir=str(tmp_path / "run"), outer_steps=1, eval_every=0,
                         checkpoint_every=0, export=False, plots=False)
    run_meta_train(config)
    with pytest.raises(ConfigError, match="already"):  # the same output_dir again: refused before training
        run_meta_train(config)
    assert seen == [True, False]


def test_divisibility_and_device_errors():
    with pytest.raises(ConfigError, match=r"meta_batch_size=6 cannot be split evenly over 4 processes.*meta_batch_size=4 or 8"):
        D.check_divisible(6, 4)
    D.check_divisible(6, 3)
    two = D.DistContext(rank=1, world_size=2, local_rank=1)
    with pytest.raises(ConfigError, match="meta_batch_size=5 cannot be split evenly over 2"):
        D.check_run(types.SimpleNamespace(meta_batch_size=5), two)
    assert D.resolve_device("cpu", two) == "cpu"
    assert D.resolve_device("cuda", two) == "cuda:1"
    with pytest.raises(ConfigError, match="device=cuda:0 with 2 processes"):
        D.resolve_device("cuda:0", two)
    assert D.resolve_device("cuda:0", D.SINGLE) == "cuda:0"


def test_launcher_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert D.env_world() == (0, 1, 0)
    assert D.setup("cpu") == (D.SINGLE, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT are not; launch with torchrun"):
        D.setup("cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="inconsistent launcher environment RANK=2, WORLD_SIZE=2"):
        D.env_world()


def test_config_digest_ignores_progress_only(tmp_path):
    a = tiny_config(tmp_path, progress=False)
    assert D.config_digest(a)[0] == D.config_digest(tiny_config(tmp_path, progress=True))[0]
    assert D.config_digest(a)[0] != D.config_digest(tiny_config(tmp_path, seed=1))[0]



def _finetune_worker(rank: int, world: int, port: int, root: str) -> None:
    """One rank of `torchrun --nproc_per_node 2 -m deltameta finetune ...` (gloo, tiny model)."""
    import contextlib
    import io
    import pathlib

    from deltameta.cli import main

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    root = pathlib.Path(root)
    err = io.StringIO()
    with D.torn_down_after():
        with contextlib.redirect_stderr(err):
            code = main(["finetune", "model=tiny-random-llama", "tasks=builtin:linear", "steps=2", "progress=false",
                         f"output_dir={root / 'ft'}"])
        (root / f"finetune-{rank}.txt").write_text(f"{code}\n{err.getvalue()}")


def test_finetune_under_a_launcher_refuses_with_one_line(tmp_path):
    mp.spawn(_finetune_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    code0, *lines0 = (tmp_path / "finetune-0.txt").read_text().splitlines()
    code1, *lines1 = (tmp_path / "finetune-1.txt").read_text().splitlines()
    assert code0 == code1 == "2"
    assert len(lines0) == 1 and "finetune runs in one process, but this is one of 2 processes" in lines0[0]
    assert lines1 == []
    assert not (tmp_path / "ft").exists()  # nothing written, no duplicate runs
