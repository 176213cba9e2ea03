"""Paired differences between columns of committed per-task tables (``results.md`` / ``benchmarks/study/*.md``).

An evaluation's ``results.md`` ends with a per-task table (accuracy % after the trained steps, mean
over episodes). When two evaluations scored the same tasks on the same episodes, their columns
pair task by task, even after the run directories are gone: this script computes, per seed, the
mean difference ± 95% CI over tasks (Student t), and pooled over seeds with the task as the unit
(each task's difference averaged over the seeds, then the t interval over tasks).

Run (one ``--pair`` per seed: ``A_FILE:COLUMN B_FILE:COLUMN``, the difference is A − B):

    python benchmarks/pair_tables.py \
        --pair runs/study/NEW/eval-dev/results.md:meta benchmarks/study/OLD-on-dev.md:multitask \
        --pair runs/study/NEW-seed1/eval-dev/results.md:meta benchmarks/study/OLD-seed1-on-dev.md:multitask

The tables hold scores rounded to 0.1, so a difference can read 0.1 away from the unrounded one.
Every pair must name the same tasks; a missing task or column is an error naming the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deltameta.evaluate.report import mean_ci, with_verdict

#: The heading of the per-task table in ``results.md``.
HEADING = "## Per task"


def read_column(spec: str) -> dict[str, float]:
    """``FILE:COLUMN`` -> ``{task: score}`` from the file's per-task table.

    Raises:
        ValueError: no per-task table, no such column, or a cell that is not a number.
    """
    path_text, sep, column = spec.rpartition(":")
    if not sep or not path_text or not column:
        raise ValueError(f"{spec!r}: expected FILE:COLUMN, e.g. results.md:meta")
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(HEADING)]
    if not starts:
        raise ValueError(f"{path}: no '{HEADING}' table")
    rows = [line for line in lines[starts[-1] + 1:] if line.startswith("|")]
    if len(rows) < 3:
        raise ValueError(f"{path}: the '{HEADING}' table has no task rows")
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    if column not in header[1:]:
        raise ValueError(f"{path}: no column {column!r}; the per-task table has {', '.join(header[1:])}")
    index = header.index(column)
    scores: dict[str, float] = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        try:
            scores[cells[0]] = float(cells[index])
        except (IndexError, ValueError):
            raise ValueError(f"{path}: task {cells[0]!r} has no number in column {column!r}: {row}") from None
    return scores


def differences(a: dict[str, float], b: dict[str, float], where: str) -> dict[str, float]:
    """Per-task ``a - b`` (percentage points); the two must name the same tasks."""
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())
        raise ValueError(f"{where}: the tables name different tasks ({', '.join(only[:5])}"
                         f"{'...' if len(only) > 5 else ''}); they did not score the same episodes")
    return {task: a[task] - b[task] for task in a}


def _cell(stats: dict) -> str:
    if stats["ci95"] is None:
        return f"{stats['mean']:+.1f}, no CI (n={stats['n']})".replace("-", "−")
    mark = "*" if stats["excludes_zero"] else ""
    return f"{stats['mean']:+.1f} ± {stats['ci95']:.1f}{mark} (n={stats['n']})".replace("-", "−")


def main(argv: list[str] | None = None) -> int:
    """Print the per-seed and pooled paired differences; exit 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A_FILE:COLUMN", "B_FILE:COLUMN"),
                        help="the two columns of one seed (repeat per seed); the difference is A - B")
    args = parser.parse_args(argv)
    try:
        seeds = [differences(read_column(a), read_column(b), f"--pair {a} {b}") for a, b in args.pair]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tasks = seeds[0].keys()
    if any(d.keys() != tasks for d in seeds[1:]):
        print("error: the seeds' tables name different tasks; pooling by task needs the same tasks", file=sys.stderr)
        return 2
    lines = ["| seed | A − B, points ± 95% CI (* excludes 0) |", "|---|---|"]
    for i, diffs in enumerate(seeds):
        lines.append(f"| {i} | {_cell(with_verdict(mean_ci([diffs[t] for t in tasks])))} |")
    if len(seeds) > 1:
        pooled = with_verdict(mean_ci([sum(d[t] for d in seeds) / len(seeds) for t in tasks]))
        lines.append(f"| pooled ({len(seeds)} seeds, by task) | {_cell(pooled)} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
