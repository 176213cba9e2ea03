"""The task-batched inner loop equals the looped reference."""

from __future__ import annotations

import pytest

from deltameta.meta import batched as B
from deltameta.meta import functional as F
from deltameta.meta.algorithms import InnerLoop, make_algorithm
from meta_helpers import assert_batched_equals_looped, delta_config, make_batch, random_float64_model


@pytest.fixture(scope="module")
def tiny_tarp64(tiny_fp32):
    config = delta_config("tarp", target_modules=["q_proj", "v_proj", "up_proj"])
    return random_float64_model(tiny_fp32[0], config, seed=1, scale=0.2)


def test_concat_batches_pads_and_masks():
    a, b = make_batch(1, n=2, length=5), make_batch(2, n=2, length=8)
    out = B.concat_batches([a, b], pad_token_id=7)
    assert out["input_ids"].shape == (4, 8)
    assert (out["input_ids"][:2, 5:] == 7).all() and (out["attention_mask"][:2, 5:] == 0).all()
    assert (out["labels"][:2, 5:] == -100).all()
    with pytest.raises(Exception, match="same number of examples"):
        B.concat_batches([a, make_batch(3, n=3)])


@pytest.mark.parametrize("name", ["fomaml", "maml", "metasgd", "reptile", "multitask"])
def test_task_batched_equals_looped(tiny_tarp64, name):
    params = F.get_deltas(tiny_tarp64)
    assert_batched_equals_looped(make_algorithm(name, tiny_tarp64, params, InnerLoop(steps=2, lr=0.3, clip=5.0)))
