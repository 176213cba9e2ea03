"""The data side of meta-training: task splits, episode samplers and encoded batches.

A thin layer over :mod:`deltameta.tasks` that turns a :class:`~deltameta.meta.config.MetaTrainConfig`
into train / validation samplers and an episode's examples into token batches.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Sequence

import torch

from deltameta.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TaskSplits:
    """The meta-train and held-out task collections.

    Attributes:
        train: Meta-training tasks.
        validation: Held-out tasks (other families, or other tasks of the same families with
            ``val_holdout_unit=task``), or ``None`` when no split holds any.
        names: Split name -> number of tasks (for the run's record).
    """

    train: Any
    validation: Any | None
    names: dict[str, int]


def load_splits(config: Any) -> TaskSplits:
    """Read ``config.tasks`` and split it into meta-train and validation (by family, or by task within families).

    Args:
        config: A :class:`~deltameta.meta.config.MetaTrainConfig`.

    Returns:
        The splits.

    Raises:
        ConfigError: the train or validation split named in the config does not exist.
        DataError: the source cannot be read or has too few examples per task.
    """
    from deltameta.tasks.loader import data_options, load_tasks

    result = load_tasks(config.tasks, splits=config.splits, **data_options(config))
    if not isinstance(result, dict):
        result = {config.train_split: result}
    names = {name: len(collection) for name, collection in result.items()}
    if config.train_split not in result:
        raise ConfigError(
            f"train_split='{config.train_split}' is not a split of tasks='{config.tasks}' with splits='{config.splits}'; "
            f"the splits are: {', '.join(result)}."
        )
    validation = None
    train = result[config.train_split]
    if config.val_holdout > 0:
        if config.val_holdout_unit == "task":
            try:
                train, validation = train.hold_out_tasks(config.val_holdout, seed=config.seed)
            except DataError as error:
                raise ConfigError(f"val_holdout={config.val_holdout} val_holdout_unit=task: {error} "
                                  "Set val_holdout_unit=family to hold out whole families.") from None
            whole = len(set(train.families) - set(validation.families))
            logger.info("validation: %d tasks of %d families held out of %s (families of one task, kept whole: %d)",
                        len(validation), len(validation.families), config.train_split, whole)
        else:
            held = train.split_by_ratio({"train": 1 - config.val_holdout, "holdout": config.val_holdout}, seed=config.seed)
            train, validation = held["train"], held["holdout"]
        names.update({config.train_split: len(train), f"{config.train_split}-holdout": len(validation)})
        return TaskSplits(train, validation, names)
    if config.val_split:
        if config.val_split not in result:
            raise ConfigError(
                f"val_split='{config.val_split}' is not a split of tasks='{config.tasks}' with splits='{config.splits}'; "
                f"the splits are: {', '.join(result)} (or set val_split='' to skip validation)."
            )
        validation = result[config.val_split]
        if len(validation) == 0:
            validation = None
    return TaskSplits(train, validation, names)


def make_sampler(collection: Any, config: Any, seed: int, what: str) -> Any:
    """Build an :class:`~deltameta.tasks.episodes.EpisodeSampler`, with a clear error for k too large.

    Args:
        collection: Tasks to sample from.
        config: The meta-train config (``shots``, ``query_size``, ``task_weights``, ``balanced``).
        seed: Seed of the episode stream.
        what: ``meta-train`` or ``validation`` (for messages).

    Raises:
        ConfigError: ``shots + query_size`` exceeds every task's number of examples.
    """
    from deltameta.tasks.episodes import EpisodeSampler

    needed = config.shots + config.query_size
    sizes = [len(task) for task in collection]
    too_small = [task.name for task in collection if len(task) < needed]
    if sizes and len(too_small) == len(sizes):
        raise ConfigError(
            f"shots={config.shots} + query_size={config.query_size} = {needed} examples per episode, but every "
            f"{what} task has fewer (largest: {max(sizes)} examples); lower shots/query_size"
            + (" or raise builtin_examples_per_task." if str(config.tasks).startswith("builtin") else ".")
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sampler = EpisodeSampler(collection, config.shots, config.query_size, seed=seed,
                                     task_weights=config.task_weights, balanced=config.balanced)
        except DataError as error:
            raise ConfigError(f"{what} tasks: {error}") from error
    for warning in caught:
        logger.warning("%s tasks: %s", what, warning.message)
    return sampler


def encode(tokenizer: Any, task: Any, examples: Sequence[Any], max_length: int,
           in_context: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
    """Encode examples of ``task`` with the loss on the target only (see :func:`deltameta.tasks.encode_examples`).

    Args:
        tokenizer: The base model's tokenizer.
        task: The episode's task (its template is used).
        examples: The examples to encode.
        max_length: Maximum sequence length in tokens.
        in_context: Demonstrations put before every prompt (``query_context=support``).

    Returns:
        ``{input_ids, attention_mask, labels}`` as ``[n, L]`` tensors.
    """
    from deltameta.tasks.encoding import encode_examples

    out = encode_examples(tokenizer, list(examples), template=getattr(task, "template", None), max_length=max_length,
                          in_context=in_context)
    return {k: out[k] for k in ("input_ids", "attention_mask", "labels")}
