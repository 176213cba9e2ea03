"""Shared fixtures: an isolated $DELTAMETA_HOME and cached tiny models."""

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
