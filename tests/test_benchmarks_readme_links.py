"""The intra-file links of benchmarks/README.md resolve, and the study table links every row.

The compute-matched study's summary table (one row per configuration and evaluation) names in its
last column the subsection that holds the row's commands and per-seed tables, as a Markdown link to
that heading's anchor. These tests compute GitHub's heading anchors (slugs) and check that every
such link, and every other ``](#...)`` link in the file, points at a heading that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"

#: the ``##`` heading of the study section whose summary table is checked
STUDY_HEADING = "## The compute-matched study (issue 11, part 3): meta-learner vs its multitask twin"

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_LINK = re.compile(r"^\[[^\]]+\]\(#([^)\s]+)\)$")
_INTRA_LINK = re.compile(r"\]\(#([^)\s]*)\)")


def read_lines(path: Path = README) -> list[str]:
    """Read a Markdown file as a list of lines.

    Args:
        path: The file to read.

    Returns:
        The file's lines, without line endings.
    """
    return path.read_text(encoding="utf-8").splitlines()


def prose_lines(lines: list[str]) -> list[tuple[int, str]]:
    """Drop the lines inside fenced code blocks (a ``# comment`` there is no heading).

    Args:
        lines: The lines of a Markdown file.

    Returns:
        ``(index, line)`` pairs of the lines outside fenced code blocks, fence lines excluded.
    """
    kept: list[tuple[int, str]] = []
    fence: str | None = None
    for index, line in enumerate(lines):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            continue
        if fence is not None:
            stripped = line.strip()
            if stripped.startswith(fence) and set(stripped) == {fence[0]}:
                fence = None
            continue
        kept.append((index, line))
    return kept


def headings(lines: list[str]) -> list[tuple[int, str]]:
    """Find the ATX headings outside code blocks.

    Args:
        lines: The lines of a Markdown file.

    Returns:
        ``(index, heading text)`` pairs in document order, the ``#`` marks stripped.
    """
    found: list[tuple[int, str]] = []
    for index, line in prose_lines(lines):
        match = _HEADING.match(line)
        if match:
            found.append((index, match.group(2)))
    return found


def github_slug(text: str) -> str:
    """Compute GitHub's anchor for a heading, before the duplicate suffix.

    Inline code marks are dropped (their text kept), the text lowercased, every character that is
    not a Unicode word character, hyphen or space removed (so ``−``, ``→``, ``±``, ``=`` go,
    ``é`` stays), and each space replaced by a hyphen, without collapsing runs.

    Args:
        text: The heading text, without its ``#`` marks.

    Returns:
        The slug.
    """
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_slugs(lines: list[str]) -> list[str]:
    """Compute the anchors of every heading, with GitHub's ``-1``, ``-2`` suffixes for repeats.

    Args:
        lines: The lines of a Markdown file.

    Returns:
        The anchors in document order.
    """
    counts: dict[str, int] = {}
    slugs: list[str] = []
    for _, text in headings(lines):
        base = github_slug(text)
        slug = base
        while slug in counts:
            counts[base] += 1
            slug = f"{base}-{counts[base]}"
        counts[slug] = 0
        slugs.append(slug)
    return slugs


def table_cells(line: str) -> list[str]:
    """Split a Markdown table row into its stripped cells.

    Args:
        line: A row such as ``| 0 | a | b |``.

    Returns:
        The cells, without the outer pipes.
    """
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def study_rows(lines: list[str]) -> list[list[str]]:
    """Collect the rows of the study's summary table.

    The table is the first one in the study section whose rows start with an integer; it ends at the
    first line that is not a table row.

    Args:
        lines: The lines of benchmarks/README.md.

    Returns:
        The cells of each numbered row, in order.
    """
    start = lines.index(STUDY_HEADING)
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if rows and not line.startswith("|"):
            break
        if line.startswith("|"):
            cells = table_cells(line)
            if cells[0].isdigit():
                rows.append(cells)
    return rows


def link_anchor(cell: str) -> str | None:
    """Read the anchor of a cell that is exactly one intra-file Markdown link.

    Args:
        cell: A table cell.

    Returns:
        The anchor after ``#``, or None when the cell is not such a link.
    """
    match = _LINK.match(cell)
    return match.group(1) if match else None


def intra_links(lines: list[str]) -> list[tuple[int, str]]:
    """Find every ``](#anchor)`` link outside fenced code blocks.

    Args:
        lines: The lines of a Markdown file.

    Returns:
        ``(line number, anchor)`` pairs, line numbers 1-based.
    """
    return [(index + 1, match.group(1)) for index, line in prose_lines(lines)
            for match in _INTRA_LINK.finditer(line)]


@pytest.fixture(scope="module")
def lines() -> list[str]:
    """The lines of benchmarks/README.md."""
    return read_lines()


@pytest.fixture(scope="module")
def slugs(lines: list[str]) -> set[str]:
    """The anchors of every heading of benchmarks/README.md."""
    return set(heading_slugs(lines))


def test_slug_rules() -> None:
    """The slug function follows GitHub on code, punctuation, symbols, accents and repeats."""
    assert github_slug("Installing: `pip install -e .` without compiling (issue 12)") == (
        "installing-pip-install--e--without-compiling-issue-12")
    assert github_slug("Seven families at k = 2, `number_pick` (2026-12-04)") == (
        "seven-families-at-k--2-number_pick-2026-12-04")
    assert github_slug("meta − twin → ±3, the meta-adapter's step, Café") == (
        "meta--twin--3-the-meta-adapters-step-café")
    assert heading_slugs(["# A", "```", "# A", "```", "## A", "### A-1", "#### A"]) == [
        "a", "a-1", "a-1-1", "a-2"]


def test_study_table_links_every_row(lines: list[str], slugs: set[str]) -> None:
    """Each study row links a heading of the file, and the rows are numbered 0..N without gaps."""
    rows = study_rows(lines)
    assert rows, "the study table was not found"
    assert [int(row[0]) for row in rows] == list(range(len(rows)))
    for row in rows:
        anchor = link_anchor(row[-1])
        assert anchor is not None, f"row {row[0]}: last cell is not a link to #anchor: {row[-1]!r}"
        assert anchor in slugs, f"row {row[0]}: #{anchor} is no heading of benchmarks/README.md"


def test_every_intra_file_link_resolves(lines: list[str], slugs: set[str]) -> None:
    """Every ``](#anchor)`` link anywhere in benchmarks/README.md points at one of its headings."""
    broken = [(number, anchor) for number, anchor in intra_links(lines) if anchor not in slugs]
    assert not broken, f"links to no heading (line, anchor): {broken}"
