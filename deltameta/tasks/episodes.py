"""Few-shot episodes: a task, a k-shot support set and a disjoint query set.

Episode ``i`` of a sampler is a pure function of ``(seed, i)``: it draws from its own
``random.Random(derive_seed(seed, "episode", i))``. The sampler's state is therefore just the
index of the next episode, so :meth:`EpisodeSampler.state_dict` / ``load_state_dict`` resume a run
on exactly the same episode stream, and a meta-batch can be sharded across ranks without
communication (rank ``r`` of ``w`` takes the batch's episodes ``r, r + w, ...``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any, Iterator, Mapping, Sequence

from deltameta.errors import ConfigError
from deltameta.tasks.collection import TaskCollection
from deltameta.tasks.seeding import derive_seed
from deltameta.tasks.task import Example, Task

#: Named task weightings.
WEIGHTINGS = ("uniform", "family", "examples")


@dataclasses.dataclass
class Episode:
    """One few-shot episode.

    Attributes:
        task: The task sampled.
        support: ``shots`` examples to adapt on.
        query: ``query_size`` other examples to evaluate the adapted model on.
        index: Position of the episode in the sampler's stream.
    """

    task: Task
    support: list[Example]
    query: list[Example]
    index: int = 0


@dataclasses.dataclass(frozen=True)
class TaskBias:
    """Sample from a subset of tasks with a given probability (otherwise from all tasks).

    Attributes:
        names: Task or family names forming the subset.
        probability: Chance that an episode's task is drawn from the subset.
    """

    names: tuple[str, ...]
    probability: float

    @classmethod
    def parse(cls, spec: "TaskBias | Mapping[str, Any] | Sequence[Any]") -> "TaskBias":
        """Build from a ``TaskBias``, ``{"names": [...], "probability": p}`` or ``(names, p)``.

        Raises:
            ConfigError: malformed spec or a probability outside [0, 1].
        """
        if isinstance(spec, TaskBias):
            bias = spec
        elif isinstance(spec, Mapping) and set(spec) == {"names", "probability"}:
            bias = cls(tuple(spec["names"]), float(spec["probability"]))
        elif isinstance(spec, (list, tuple)) and len(spec) == 2:
            bias = cls(tuple(spec[0]), float(spec[1]))
        else:
            raise ConfigError(f"task bias must be {{'names': [...], 'probability': p}} or (names, p), got {spec!r:.80}.")
        if not 0.0 <= bias.probability <= 1.0 or not bias.names:
            raise ConfigError(f"task bias needs at least one name and a probability in [0, 1], got {bias}.")
        return bias


def _select(tasks: Sequence[Task], names: Sequence[str], collection: TaskCollection, what: str) -> list[bool]:
    known = set(collection.names) | set(collection.families)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{what} names {unknown} match no task or family; valid families: {', '.join(collection.families)}.")
    chosen = set(names)
    return [t.name in chosen or t.family in chosen for t in tasks]


class EpisodeSampler:
    """Deterministic stream of k-shot episodes over a task collection.

    Args:
        collection: The tasks; those with fewer than ``shots + query_size`` examples are skipped
            with a warning (an error if none remain).
        shots: Support examples per episode (0 for zero-shot).
        query_size: Query examples per episode (at least 1).
        seed: Seed of the stream.
        task_weights: ``"uniform"`` over tasks (default), ``"family"`` (uniform over families,
            then over their tasks), ``"examples"`` (proportional to task size), or a mapping
            task-or-family name -> weight (unlisted tasks get weight 0); ``None``, ``""`` or ``{}``
            mean uniform.
        bias: Optional :class:`TaskBias` (or its dict / tuple form): with its probability, the
            task is drawn from its subset (with the same weights), else from all tasks.
        balanced: For multiple-choice tasks, spread support and query over the answers as evenly
            as the data allows (classes are target strings).

    Raises:
        ConfigError: bad sizes, unknown weight/bias names, no positive weight.
        DataError: no task has enough examples.
    """

    def __init__(
        self,
        collection: TaskCollection,
        shots: int,
        query_size: int,
        seed: int = 0,
        task_weights: str | Mapping[str, float] | None = None,
        bias: TaskBias | Mapping[str, Any] | Sequence[Any] | None = None,
        balanced: bool = False,
    ) -> None:
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ConfigError(f"shots must be an integer >= 0, got {shots!r}.")
        if isinstance(query_size, bool) or not isinstance(query_size, int) or query_size < 1:
            raise ConfigError(f"query_size must be an integer >= 1, got {query_size!r}.")
        original = collection
        self.collection = collection.filter_min_examples(shots + query_size)
        self.shots, self.query_size, self.seed, self.balanced = shots, query_size, int(seed), bool(balanced)
        self.tasks = self.collection.tasks
        self.weights = self._weights(task_weights, original)
        if sum(self.weights) <= 0:
            raise ConfigError("task weights give every usable task weight 0.")
        self.bias = TaskBias.parse(bias) if bias is not None else None
        self.bias_weights = None
        if self.bias is not None:
            inside = _select(self.tasks, self.bias.names, original, "bias")
            self.bias_weights = [w if keep else 0.0 for w, keep in zip(self.weights, inside)]
            if sum(self.bias_weights) <= 0:
                raise ConfigError(f"task bias {list(self.bias.names)} selects no usable task with positive weight.")
        self.next_index = 0

    def _weights(self, spec: str | Mapping[str, float] | None, original: TaskCollection) -> list[float]:
        if not spec or spec == "uniform":
            return [1.0] * len(self.tasks)
        if spec == "examples":
            return [float(len(t)) for t in self.tasks]
        if spec == "family":
            sizes: dict[str, int] = {}
            for task in self.tasks:
                sizes[task.family] = sizes.get(task.family, 0) + 1
            return [1.0 / sizes[t.family] for t in self.tasks]
        if isinstance(spec, str):
            raise ConfigError(f"unknown task weighting '{spec}'; valid: {', '.join(WEIGHTINGS)} or a name -> weight mapping.")
        for name, weight in spec.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"task weight for '{name}' must be a number >= 0, got {weight!r}.")
        _select(self.tasks, list(spec), original, "task weight")
        return [float(spec.get(t.name, spec.get(t.family, 0.0))) for t in self.tasks]

    # sampling ---------------------------------------------------------------------------------

    def _pick(self, rng: random.Random, examples: list[Example]) -> tuple[list[Example], list[Example]]:
        order = list(range(len(examples)))
        if not (self.balanced and all(e.options is not None for e in examples)):
            chosen = rng.sample(order, self.shots + self.query_size)
            return [examples[i] for i in chosen[: self.shots]], [examples[i] for i in chosen[self.shots :]]
        groups: dict[str, list[int]] = {}
        for i in order:
            groups.setdefault(examples[i].target, []).append(i)
        pools = [groups[key] for key in sorted(groups)]
        for pool in pools:
            rng.shuffle(pool)
        rng.shuffle(pools)

        def take(count: int) -> list[Example]:
            out: list[int] = []
            while len(out) < count and any(pools):
                for pool in pools:
                    if pool and len(out) < count:
                        out.append(pool.pop())
            rng.shuffle(out)
            return [examples[i] for i in out]

        support = take(self.shots)
        return support, take(self.query_size)

    def episode(self, index: int) -> Episode:
        """Return episode ``index`` of the stream (does not move the stream).

        Args:
            index: Any non-negative integer.

        Returns:
            The episode; the same index always gives the same episode.
        """
        rng = random.Random(derive_seed(self.seed, "episode", index))
        weights = self.weights
        if self.bias_weights is not None and rng.random() < self.bias.probability:
            weights = self.bias_weights
        task = rng.choices(self.tasks, weights=weights)[0]
        support, query = self._pick(rng, task.examples)
        return Episode(task=task, support=support, query=query, index=index)

    def sample(self) -> Episode:
        """Return the next episode of the stream."""
        episode = self.episode(self.next_index)
        self.next_index += 1
        return episode

    def sample_batch(self, size: int, rank: int = 0, world_size: int = 1) -> list[Episode]:
        """Return this rank's share of the next meta-batch of ``size`` episodes.

        The stream advances by ``size`` on every rank; rank ``r`` gets the batch's episodes
        ``r, r + world_size, ...``, so the union over ranks is the single-process batch.

        Args:
            size: Meta-batch size.
            rank: This process's rank.
            world_size: Number of processes.

        Returns:
            The episodes of this rank (in stream order).

        Raises:
            ConfigError: bad size, rank or world size.
        """
        if size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need size >= 1 and 0 <= rank < world_size, got size={size}, rank={rank}, world_size={world_size}.")
        start = self.next_index
        self.next_index += size
        return [self.episode(start + i) for i in range(rank, size, world_size)]

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    # resuming ---------------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        text = "\n".join(f"{t.name}:{len(t)}" for t in self.tasks)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Return the resumable state (plain, JSON-serialisable)."""
        return {
            "next_index": self.next_index,
            "seed": self.seed,
            "shots": self.shots,
            "query_size": self.query_size,
            "balanced": self.balanced,
            "tasks": self._fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream where ``state`` left it.

        Raises:
            ConfigError: the state comes from a sampler with another seed, episode size or task
                set (the stream would not continue identically).
        """
        current = self.state_dict()
        for key in ("seed", "shots", "query_size", "balanced", "tasks"):
            if key in state and state[key] != current[key]:
                raise ConfigError(
                    f"episode sampler state has {key}={state[key]!r} but this sampler has {current[key]!r}; "
                    "resume with the same tasks and episode settings."
                )
        index = state.get("next_index")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ConfigError(f"episode sampler state has an invalid next_index {index!r}.")
        self.next_index = index
