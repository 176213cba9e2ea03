"""Meta-SGD rate gradient: cost and bias of ``metasgd_rate_grad=first_order`` vs ``exact``.

Run:
    python benchmarks/metasgd_rate_grad.py [--model smollm2-135m] [--quantization nf4] [--inner-steps 1 2 5]
        [--steps 2] [--rates tensor]

For each inner step count K and each mode, a fresh :class:`~deltameta.meta.trainer.MetaTrainer`
with the default recipe plus ``algorithm=metasgd inner_steps=K metasgd_rate_grad=MODE`` runs one
warm-up outer step and ``--steps`` timed ones (:meth:`MetaTrainer.train_step`: the whole outer
step, task-batched meta-batch of 4, controller included); the table gives the mean seconds per step.

Bias: on the first episode of the meta-training sampler, with the exact run's deltas and rates
after its steps (controller decisions fixed), the rates' gradient of one task step in both modes:
``relative error = ||g_first_order - g_exact|| / ||g_exact||`` and their cosine. (``exact`` is
checked against float64 finite differences in ``tests/test_meta_sgd.py``.)

With ``--finite-differences``, instead: tiny-random-llama in float64 with random TARP deltas, one
task (random tokens), tensor rates at 0.3 (x U[1, 1.5]); along one random direction of the rates,
the central finite difference of the query loss next to the exact and the first-order rate
gradients, for each K.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rates", default="tensor", choices=["tensor", "element"])
    parser.add_argument("--task-loop", action="store_true", help="task_batched=false (one task's graph at a time)")
    parser.add_argument("--finite-differences", action="store_true")
    args = parser.parse_args()
    if args.finite_differences:
        finite_differences(args.inner_steps)
        return

    from deltameta.config import build_config
    from deltameta.meta.config import MetaTrainConfig
    from deltameta.meta.run_dir import prepare_run_dir
    from deltameta.meta.trainer import MetaTrainer

    rows = []
    for k in args.inner_steps:
        times = {}
        trainer = None
        for mode in ("first_order", "exact"):
            with tempfile.TemporaryDirectory() as tmp:
                config = build_config(MetaTrainConfig, overrides=dict(
                    model=args.model, quantization=args.quantization, algorithm="metasgd", inner_steps=k,
                    metasgd_rates=args.rates, metasgd_rate_grad=mode, outer_steps=args.steps + 1, eval_every=0,
                    task_batched=not args.task_loop,
                    checkpoint_every=0, export=False, plots=False, progress=False, output_dir=tmp + "/run"))
                trainer = MetaTrainer(config, prepare_run_dir(config.output_dir))
                trainer.train_step()  # warm-up
                started = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                times[mode] = (time.perf_counter() - started) / args.steps
                trainer.metrics.close()
        # bias, at the exact run's final parameters
        algo = trainer.algorithm
        support, query = trainer._encode(trainer.sampler.episode(0))
        grads = {}
        with trainer._apply(trainer._decided_weights(support)):
            for mode in ("first_order", "exact"):
                algo.inner.metasgd_rate_grad = mode
                trainer.optimizer.zero_grad(set_to_none=True)
                algo.task_step(support, query, scale=1.0)
                grads[mode] = torch.cat([(r.grad if r.grad is not None else torch.zeros_like(r)).flatten().double()
                                        for r in algo.lrs.values()])
        exact, first = grads["exact"], grads["first_order"]
        rel = float((first - exact).norm() / exact.norm())
        cos = float(torch.dot(first, exact) / (first.norm() * exact.norm()))
        rows.append((k, times["first_order"], times["exact"], rel, cos))
        print(f"K={k}: first_order {times['first_order']:.2f} s/step, exact {times['exact']:.2f} s/step, "
              f"rate-gradient relative error of first_order {rel:.3f}, cosine {cos:.3f}", flush=True)
    print()
    print("| inner steps K | first_order s/step | exact s/step | exact / first_order | first_order rate-grad rel. error | cosine |")
    print("|---|---|---|---|---|---|")
    for k, fo, ex, rel, cos in rows:
        print(f"| {k} | {fo:.2f} | {ex:.2f} | {ex / fo:.2f}x | {rel:.3f} | {cos:.3f} |")


def finite_differences(inner_steps: list[int]) -> None:
    """The ``--finite-differences`` table (see the module docstring)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from meta_helpers import delta_config, make_batch, random_float64_model

    from deltameta.base import load_base
    from deltameta.meta import functional as F
    from deltameta.meta.algorithms import InnerLoop, make_algorithm

    base, _ = load_base("tiny-random-llama", quantization="none", device="cpu")
    model = random_float64_model(base, delta_config("tarp", target_modules=["q_proj", "v_proj"]), seed=2, scale=0.2)
    params = F.get_deltas(model)
    support, query = make_batch(31), make_batch(32)
    loss_fn = F.lm_loss_fn(model)
    print("| inner steps K | finite difference | exact | first_order |")
    print("|---|---|---|---|")
    for k in inner_steps:
        gen = torch.Generator().manual_seed(5)
        values = {}
        for mode in ("exact", "first_order"):
            algo = make_algorithm("metasgd", model, params, InnerLoop(steps=k, lr=0.3, metasgd_rate_grad=mode))
            with torch.no_grad():
                for rate in algo.lrs.values():
                    rate.mul_(1 + 0.5 * torch.rand(rate.shape, generator=torch.Generator().manual_seed(7), dtype=rate.dtype))
            for p in algo.meta_parameters().values():
                p.grad = None
            algo.task_step(support, query, scale=1.0)
            values[mode] = {n: r.grad.clone() for n, r in algo.lrs.items()}
            rates = {n: r.detach() for n, r in algo.lrs.items()}
        direction = {n: torch.randn(r.shape, generator=gen, dtype=r.dtype) for n, r in rates.items()}
        start = {n: v.detach() for n, v in params.items()}

        def objective(lrs):
            fast = F.adapt(start, support, loss_fn, steps=k, lr=lrs, first_order=True)
            return float(loss_fn({n: v.detach() for n, v in fast.items()}, query))

        eps = 1e-6
        fd = (objective({n: r + eps * direction[n] for n, r in rates.items()})
              - objective({n: r - eps * direction[n] for n, r in rates.items()})) / (2 * eps)
        dot = {m: float(sum((g[n] * direction[n]).sum() for n in rates)) for m, g in values.items()}
        print(f"| {k} | {fd:+.6f} | {dot['exact']:+.6f} | {dot['first_order']:+.6f} |")
        for p in params.values():
            p.grad = None


if __name__ == "__main__":
    main()
