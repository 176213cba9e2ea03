"""TARP static fold: the mean fold vs the least-squares fold, measured on held-out inputs.

Run:
    python benchmarks/tarp_fold.py RUN_DIR [--val-episodes 8] [--device cpu]
    python benchmarks/tarp_fold.py --model tiny-random-llama      # smoke: trains a tiny TARP run first

``RUN_DIR`` is a finished meta-training run with TARP deltas (its ``final/`` meta-state holds the
fold statistics of 8 meta-training support sets). Both folds are fitted on those statistics and
measured (:func:`deltameta.deltas.fold.fold_error`) against the dynamic model, with the exported
structure (controller decisions as in ``deltameta export`` without task examples), on

* ``train-family queries``: the query sets of the same 8 episodes (stored in the meta-state, never
  used for the fold statistics);
* ``validation families``: support and query sets of ``--val-episodes`` episodes of the run's
  validation split (task families the fold statistics never saw).

Columns: relative logit error ``||static - dynamic|| / ||dynamic - base||`` over the non-pad
tokens, and the share of the adapter's loss gain the static model keeps,
``(loss base - loss static) / (loss base - loss dynamic)`` on the answer tokens.
"""

from __future__ import annotations

import argparse
import contextlib

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", default=None, help="a finished TARP meta-train run directory")
    parser.add_argument("--model", default=None, help="tiny-random-llama: train a tiny TARP run first (smoke mode)")
    parser.add_argument("--val-episodes", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.run_dir is None:
        if args.model != "tiny-random-llama":
            parser.error("give RUN_DIR, or --model tiny-random-llama for the smoke mode")
        import sys
        import tempfile
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from inner_loop_fidelity import train_tiny_run

        with tempfile.TemporaryDirectory() as tmp:
            args.run_dir = str(train_tiny_run(Path(tmp) / "run"))
            _report(args)
        return
    _report(args)


def _report(args: argparse.Namespace) -> None:
    """Print the fold-error table of ``args.run_dir``."""

    from deltameta.commands.meta_train import resolve_config
    from deltameta.deltas import build_from_meta_state, load_meta_state
    from deltameta.deltas.fold import fold_error, fold_points
    from deltameta.meta import data
    from deltameta.meta.batched import concat_batches

    state = load_meta_state(args.run_dir)
    if not state.fold_moments or state.fold_heldout is None:
        raise SystemExit(f"{args.run_dir}: the meta-state has no least-squares fold statistics (meta-train it again).")
    model, tokenizer, controller = build_from_meta_state(state, device=args.device)
    op_context = contextlib.nullcontext
    if controller is not None:
        emb = state.task_embedding_mean if controller.mode == "task" else None
        weights = controller.decision_weights(controller.decide(emb))
        op_context = lambda: controller.apply(model, weights)  # noqa: E731
    folds = {
        "mean": fold_points(state.fold_stats, None, "mean"),
        "least squares": fold_points(state.fold_stats, state.fold_moments, "least_squares"),
    }
    config = resolve_config(None, [], args.run_dir)
    splits = data.load_splits(config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampler = data.make_sampler(splits.validation, config, config.seed + 7919, "validation")
    batches = []
    for index in range(args.val_episodes):
        episode = sampler.episode(index)
        for examples in (episode.support, episode.query):
            batches.append(data.encode(tokenizer, episode.task, examples, config.max_length))
    sizes = {}
    for batch in batches:
        sizes.setdefault(int(batch["input_ids"].shape[0]), []).append(batch)
    validation = concat_batches([b for group in sizes.values() for b in data_split(group)], pad)
    heldouts = {"train-family queries": state.fold_heldout, "validation families": validation}
    print("| held-out inputs | examples | answer tokens | loss base | loss dynamic | fold | relative logit error | loss gain kept |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for name, heldout in heldouts.items():
            result = fold_error(model, heldout, folds, op_context)
            for method, numbers in result["folds"].items():
                print(f"| {name} | {result['examples']} | {result['answer_tokens']} | {result['loss_base']:.4f} | "
                      f"{result['loss_dynamic']:.4f} | {method} | {100 * numbers['relative_logit_error']:.1f}% | "
                      f"{100 * numbers['loss_gain_kept']:.1f}% |")


def data_split(group):
    """Split batches into single examples (so batches of different sizes can be concatenated)."""
    for batch in group:
        for i in range(int(batch["input_ids"].shape[0])):
            yield {k: v[i : i + 1] for k, v in batch.items()}


if __name__ == "__main__":
    main()
