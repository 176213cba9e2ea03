"""Shared helpers of the meta-learning tests (tiny configs, synthetic batches)."""

from __future__ import annotations

import types

import torch

#: A run small enough for tiny-random-llama on 2 CPU cores (a few seconds).
TINY_RUN = dict(
    model="tiny-random-llama",
    quantization="none",
    tasks="builtin:caesar,string_op,kv_lookup,linear",
    splits="train=0.5,validation=0.5",
    builtin_tasks_per_family=3,
    builtin_examples_per_task=8,
    shots=2,
    query_size=2,
    max_length=96,
    rank=2,
    ops=["tarp-2", "lora-2", "skip"],
    target_modules=["q_proj", "v_proj"],
    outer_steps=4,
    meta_batch_size=2,
    eval_every=2,
    eval_tasks=2,
    checkpoint_every=2,
    progress=False,
    plots=False,
    export=False,
)


def tiny_config(tmp_path, **overrides):
    """Return a validated MetaTrainConfig for a tiny run in ``tmp_path / 'run'``."""
    from deltameta.config import build_config
    from deltameta.meta.config import MetaTrainConfig

    values = dict(TINY_RUN, output_dir=str(tmp_path / "run"))
    values.update(overrides)
    return build_config(MetaTrainConfig, overrides=values)


def make_batch(seed: int, n: int = 2, length: int = 12, vocab: int = 250) -> dict[str, torch.Tensor]:
    """Random tokens; the loss is on the second half of each sequence."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def rmsnorm_in_input_dtype(model) -> None:
    """Llama's RMSNorm computes in float32 even for a float64 model; keep it in float64 here."""

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(forward, module)
