"""Shared fixtures: an isolated $DELTAMETA_HOME, cached tiny models and tiny meta-train runs."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Keep tests out of the user's cache unless DELTAMETA_TEST_HOME points at a shared one."""
    previous = os.environ.get("DELTAMETA_HOME")
    os.environ["DELTAMETA_HOME"] = os.environ.get("DELTAMETA_TEST_HOME") or str(tmp_path_factory.mktemp("deltameta-home"))
    yield
    if previous is None:
        os.environ.pop("DELTAMETA_HOME", None)
    else:
        os.environ["DELTAMETA_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_fp32():
    """``tiny-random-llama`` in full precision (shared; do not mutate)."""
    from deltameta.base import load_base

    return load_base("tiny-random-llama", quantization="none", device="cpu")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_fp32):
    """The byte-level tokenizer of ``tiny-random-llama``."""
    return tiny_fp32[1]


@pytest.fixture
def one_torch_thread():
    """Run the test with torch on one thread (see :func:`test_finetune_helpers.one_thread`)."""
    from test_finetune_helpers import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def meta_adapter_runs(tmp_path_factory):
    """``{"meta": RUN_DIR, "multitask": RUN_DIR}``: tiny meta-train runs (trained on first use, then reused from the base temp dir)."""
    from test_finetune_helpers import meta_runs

    return meta_runs(tmp_path_factory.getbasetemp())
