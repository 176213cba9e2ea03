"""Task collections, few-shot episodes, encoding and scoring.

Typical use by the meta-training engine::

    from deltameta.tasks import EpisodeSampler, encode_episode, lm_loss, load_tasks

    splits = load_tasks("builtin", splits="train=0.75,dev=0.125,test=0.125", seed=0)
    sampler = EpisodeSampler(splits["train"], shots=8, query_size=8, seed=0)
    for episode in sampler.sample_batch(4):
        support, query = encode_episode(tokenizer, episode, max_length=256)
        logits = model(input_ids=query["input_ids"], attention_mask=query["attention_mask"]).logits
        loss = lm_loss(logits, query["labels"])
"""

from deltameta.tasks.collection import TaskCollection, check_no_family_leak, split_collection, task_split_names
from deltameta.tasks.encoding import IGNORE_INDEX, TruncationWarning, encode_episode, encode_examples, render_row
from deltameta.tasks.episodes import Episode, EpisodeSampler, TaskBias
from deltameta.tasks.loader import load_tasks, read_source
from deltameta.tasks.scoring import (
    FreeFormResult,
    MultipleChoiceResult,
    evaluate_examples,
    greedy_generate,
    lm_loss,
    normalize_answer,
    score_free_form,
    score_multiple_choice,
    sequence_logprobs,
)
from deltameta.tasks.task import DEFAULT_TEMPLATE, Example, PromptTemplate, Task, family_of

__all__ = [
    "DEFAULT_TEMPLATE",
    "Episode",
    "EpisodeSampler",
    "Example",
    "FreeFormResult",
    "IGNORE_INDEX",
    "MultipleChoiceResult",
    "PromptTemplate",
    "Task",
    "TaskBias",
    "TaskCollection",
    "TruncationWarning",
    "check_no_family_leak",
    "encode_episode",
    "encode_examples",
    "evaluate_examples",
    "family_of",
    "greedy_generate",
    "lm_loss",
    "load_tasks",
    "normalize_answer",
    "read_source",
    "render_row",
    "score_free_form",
    "score_multiple_choice",
    "sequence_logprobs",
    "split_collection",
    "task_split_names",
]
