"""A :class:`TaskCollection`: merged tasks, filtering, and splits by family."""

from __future__ import annotations

import difflib
import math
import random
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from deltameta.errors import ConfigError, DataError
from deltameta.tasks.bigbench import load_json_file
from deltameta.tasks.seeding import derive_seed
from deltameta.tasks.task import Task


class TaskCollection:
    """An ordered set of tasks with unique names.

    Args:
        tasks: The tasks.

    Raises:
        DataError: two tasks with the same name (both sources are named).
    """

    def __init__(self, tasks: Iterable[Task] = ()) -> None:
        self._tasks: OrderedDict[str, Task] = OrderedDict()
        for task in tasks:
            if task.name in self._tasks:
                other = self._tasks[task.name]
                raise DataError(
                    f"task name '{task.name}' appears twice (sources '{other.source}' and '{task.source}'); "
                    "task names must be unique within a collection."
                )
            self._tasks[task.name] = task

    # container protocol -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __getitem__(self, name: str) -> Task:
        """Return the task called ``name``.

        Raises:
            DataError: unknown name (close matches are suggested).
        """
        try:
            return self._tasks[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._tasks), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise DataError(f"no task named '{name}' in the collection ({len(self)} tasks).{hint}") from None

    def __repr__(self) -> str:
        return f"TaskCollection({len(self)} tasks, {len(self.families)} families)"

    @property
    def names(self) -> list[str]:
        """Task names in order."""
        return list(self._tasks)

    @property
    def tasks(self) -> list[Task]:
        """Tasks in order."""
        return list(self._tasks.values())

    @property
    def families(self) -> list[str]:
        """Distinct families, sorted."""
        return sorted({t.family for t in self})

    def by_family(self) -> dict[str, list[Task]]:
        """Return family -> its tasks (families sorted)."""
        groups: dict[str, list[Task]] = {}
        for task in self:
            groups.setdefault(task.family, []).append(task)
        return dict(sorted(groups.items()))

    # building ---------------------------------------------------------------------------------

    @classmethod
    def merge(cls, *collections: "TaskCollection | Iterable[Task]") -> "TaskCollection":
        """Merge collections (or task lists) into one.

        Raises:
            DataError: a task name present in two of them.
        """
        return cls(task for collection in collections for task in collection)

    def subset(self, names: Iterable[str]) -> "TaskCollection":
        """Return the tasks or whole families named in ``names`` (unknown names are an error).

        Raises:
            DataError: a name that is neither a task nor a family.
        """
        wanted = list(names)
        families = set(self.families)
        for name in wanted:
            if name not in self._tasks and name not in families:
                self[name]  # raises with suggestions
        chosen = set(wanted)
        return TaskCollection(t for t in self if t.name in chosen or t.family in chosen)

    def filter_min_examples(self, count: int) -> "TaskCollection":
        """Drop tasks with fewer than ``count`` examples, warning with the list of dropped tasks.

        Args:
            count: Minimum examples per task (``shots + query_size`` for episodes).

        Returns:
            The remaining tasks.

        Raises:
            DataError: no task has enough examples.
        """
        keep = [t for t in self if len(t) >= count]
        dropped = [t for t in self if len(t) < count]
        if dropped:
            listing = ", ".join(f"{t.name} ({len(t)})" for t in dropped)
            if not keep:
                raise DataError(
                    f"no task has at least {count} examples (needed for the requested episode size); "
                    f"all {len(dropped)} have fewer: {listing}."
                )
            warnings.warn(
                f"skipping {len(dropped)} of {len(self)} tasks with fewer than {count} examples: {listing}", stacklevel=2
            )
        return TaskCollection(keep)

    # splits -----------------------------------------------------------------------------------

    def split_from_file(self, path: str | Path) -> dict[str, "TaskCollection"]:
        """Split by a ``splits.json`` mapping split name -> list of task (or family) names.

        Keys whose values are not lists (e.g. ``description``) are ignored. Families are derived
        from the listed tasks: a task of the collection that is not listed goes to the split of
        its family, and is left out with a warning when its family is not listed at all.

        Args:
            path: The JSON file.

        Returns:
            Split name -> collection, in the file's order.

        Raises:
            DataError: malformed file, a family in two splits, or a listed name that is neither a
                task nor a family of the collection (all such names are listed).
        """
        path = Path(path)
        data = load_json_file(path)
        if not isinstance(data, dict):
            raise DataError(f"'{path}': a splits file must be a JSON object mapping split name -> list of task names.")
        splits = {key: value for key, value in data.items() if isinstance(value, list)}
        if not splits:
            raise DataError(f"'{path}': no split lists found (expected e.g. {{\"meta_train\": [...], \"dev\": [...]}}).")
        families = set(self.families)
        family_split: dict[str, str] = {}
        unknown = []
        for split, names in splits.items():
            for name in names:
                if not isinstance(name, str):
                    raise DataError(f"'{path}': split '{split}' holds {name!r:.40}; entries must be task names.")
                if name in self._tasks:
                    family = self._tasks[name].family
                elif name in families:
                    family = name
                else:
                    unknown.append(name)
                    continue
                previous = family_split.setdefault(family, split)
                if previous != split:
                    raise DataError(
                        f"'{path}': family '{family}' appears in splits '{previous}' and '{split}' (via '{name}'); "
                        "a family must stay on one side of a split."
                    )
        if unknown:
            raise DataError(f"'{path}': {len(unknown)} listed name(s) match no task or family of the collection: {', '.join(unknown[:20])}.")
        left_out = [t.name for t in self if t.family not in family_split]
        if left_out:
            warnings.warn(f"{len(left_out)} task(s) belong to no split in '{path}' and are left out: {', '.join(left_out)}", stacklevel=2)
        return {
            split: TaskCollection(t for t in self if family_split.get(t.family) == split) for split in splits
        }

    def split_by_ratio(self, ratios: Mapping[str, float], seed: int = 0) -> dict[str, "TaskCollection"]:
        """Split families (shuffled with ``seed``) into splits of the given sizes.

        Every split with a positive ratio gets at least one family.

        Args:
            ratios: Split name -> fraction of the families (normalised to sum to 1).
            seed: Shuffle seed.

        Returns:
            Split name -> collection.

        Raises:
            ConfigError: negative or all-zero ratios.
            DataError: fewer families than splits with a positive ratio.
        """
        if not ratios or any(r < 0 for r in ratios.values()) or sum(ratios.values()) <= 0:
            raise ConfigError(f"split ratios must be non-negative and not all zero, got {dict(ratios)}.")
        families = self.families
        random.Random(derive_seed(seed, "split")).shuffle(families)
        names = list(ratios)
        positive = [n for n in names if ratios[n] > 0]
        if len(families) < len(positive):
            raise DataError(
                f"cannot split {len(families)} famil{'y' if len(families) == 1 else 'ies'} into {len(positive)} "
                f"non-empty splits ({', '.join(positive)}); families are the split unit."
            )
        total = sum(ratios.values())
        counts = {n: int(round(ratios[n] / total * len(families))) for n in names}
        for n in positive:  # at least one family per positive split
            counts[n] = max(counts[n], 1)
        while sum(counts.values()) > len(families):
            largest = max(positive, key=lambda n: counts[n])
            counts[largest] -= 1
        while sum(counts.values()) < len(families):
            counts[max(positive, key=lambda n: ratios[n])] += 1
        assignment: dict[str, str] = {}
        start = 0
        for n in names:
            for family in families[start : start + counts[n]]:
                assignment[family] = n
            start += counts[n]
        return {n: TaskCollection(t for t in self if assignment.get(t.family) == n) for n in names}

    def hold_out_tasks(self, fraction: float, seed: int = 0) -> tuple["TaskCollection", "TaskCollection"]:
        """Hold out a fraction of every family's tasks (new tasks of seen families), not whole families.

        Each family of ``n >= 2`` tasks gives ``fraction * n`` of its tasks rounded half up, at least 1
        and at most ``n - 1``, drawn with ``seed`` and the family's name (so a family loses the same
        tasks whichever other families are present); a family of one task stays whole in the kept part.

        Args:
            fraction: Share of each family's tasks to hold out, in (0, 1).
            seed: Shuffle seed.

        Returns:
            ``(kept, held_out)``, both in the collection's order.

        Raises:
            ConfigError: ``fraction`` outside (0, 1).
            DataError: no family has two tasks, so nothing can be held out.
        """
        if not 0 < fraction < 1:
            raise ConfigError(f"hold-out fraction {fraction}: expected a fraction in (0, 1).")
        held: set[str] = set()
        for family, tasks in self.by_family().items():
            if len(tasks) < 2:
                continue
            count = min(max(math.floor(fraction * len(tasks) + 0.5), 1), len(tasks) - 1)
            rng = random.Random(derive_seed(seed, "hold-out-tasks", family))
            held.update(task.name for task in rng.sample(tasks, count))
        if not held:
            reason = "the collection is empty" if not len(self) else \
                f"every one of the {len(self.families)} families has a single task"
            raise DataError(f"cannot hold out tasks of seen families: {reason}.")
        return TaskCollection(t for t in self if t.name not in held), TaskCollection(t for t in self if t.name in held)


def parse_ratios(spec: str) -> dict[str, float]:
    """Parse ``"train=0.8,dev=0.1,test=0.1"`` into a dict.

    Raises:
        ConfigError: malformed entry or a non-numeric ratio.
    """
    ratios: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            ratios[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"bad split ratio '{part}' in '{spec}'; expected NAME=FRACTION, e.g. train=0.8,dev=0.2.") from None
    return ratios


def split_collection(
    collection: TaskCollection, splits: str | Path | Mapping[str, float], seed: int = 0
) -> dict[str, TaskCollection]:
    """Split by a splits.json path, a ratio string (``train=0.8,dev=0.2``) or a ratio mapping.

    Raises:
        ConfigError, DataError: see :meth:`TaskCollection.split_from_file` / ``split_by_ratio``.
    """
    if isinstance(splits, Mapping):
        return collection.split_by_ratio(splits, seed)
    text = str(splits)
    if "=" in text and not Path(text).exists():
        return collection.split_by_ratio(parse_ratios(text), seed)
    if not Path(text).is_file():
        raise ConfigError(f"splits '{text}' is neither an existing splits.json file nor ratios like train=0.8,dev=0.2.")
    return collection.split_from_file(text)


def check_no_family_leak(splits: Mapping[str, TaskCollection]) -> None:
    """Raise if any family appears in two splits.

    Raises:
        DataError: naming the family and both splits.
    """
    owner: dict[str, str] = {}
    for name, collection in splits.items():
        for family in collection.families:
            if owner.setdefault(family, name) != name:
                raise DataError(f"family '{family}' is in splits '{owner[family]}' and '{name}'.")


def task_split_names(splits: Mapping[str, TaskCollection]) -> dict[str, str]:
    """Return task name -> split name."""
    return {task.name: name for name, collection in splits.items() for task in collection}


def as_names(values: Sequence[str] | str) -> list[str]:
    """Return a list of names from a list or a comma-separated string."""
    return [v.strip() for v in values.split(",") if v.strip()] if isinstance(values, str) else list(values)
