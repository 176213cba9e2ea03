"""The run directory: resolved config, metrics (JSONL, plus the ``report_to`` trackers), plots and status.

Layout of ``RUN_DIR``::

    run.json             status (running / finished / failed), versions, times
    config.yaml          the resolved config (recipe + overrides + defaults)
    metrics.jsonl        one JSON object per outer step and per validation
    tensorboard/         TensorBoard events (report_to=tensorboard; see :mod:`deltameta.reporting`)
    plots/*.png          training and validation curves, controller decisions
    checkpoints/step-*/  the last N training checkpoints (see :mod:`deltameta.meta.checkpoint`)
    best/                meta-state with the best held-out query loss after adaptation (with the
                         fold statistics and mean task embedding of a TARP or controller run, as final/)
    final/               the final meta-state (see :mod:`deltameta.deltas.state`)
    peft/                the PEFT export of the final meta-adapter
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any, Iterable

from deltameta import output_dir
from deltameta.atomic import append_line, atomic_write_json, atomic_write_text, clean_stale, dumps_json
from deltameta.config import config_to_yaml
from deltameta.errors import ConfigError, MetaStateError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
#: Files or folders whose presence marks a directory as (part of) a deltameta run.
RUN_MARKERS = (RUN_FILE, CONFIG_FILE, METRICS_FILE, "checkpoints", "final")


def holds_run(path: Path) -> bool:
    """Return whether ``path`` holds a deltameta run."""
    return output_dir.holds_run(path, RUN_MARKERS)


def prepare_run_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Check the output directory of a new run (deleting nothing), or of a resumed one.

    With ``overwrite`` a previous run stays until the new run has been set up (see
    :meth:`deltameta.meta.trainer.MetaTrainer.train`). Temporary folders a killed run left are
    removed when it is resumed.

    Args:
        path: ``output_dir``.
        overwrite: A previous run found there may be replaced.
        resume: The caller resumes the run there (the directory must hold a run).

    Returns:
        The directory (created).

    Raises:
        ConfigError: it holds another run (and neither ``overwrite`` nor ``resume``), or holds
            files that are not a deltameta run, or ``resume`` finds no run.
    """
    path = Path(path).expanduser()
    if resume:
        if not holds_run(path):
            raise ConfigError(f"--resume {path}: no deltameta run there (expected {CONFIG_FILE} and checkpoints/).")
        for stale in clean_stale(path):
            logger.info("removed %s, left by an interrupted write", stale)
        return path
    return output_dir.prepare_output_dir(path, RUN_MARKERS, overwrite, resumable=True)


def write_config(run_dir: Path, config: Any) -> None:
    """Write the resolved config as ``config.yaml``."""
    atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(config))


def read_status(run_dir: Path) -> dict[str, Any]:
    """Return ``run.json`` (``{}`` when missing or unreadable)."""
    try:
        data = json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_status(run_dir: Path, status: str, **extra: Any) -> None:
    """Write ``run.json`` (status, time, versions, plus ``extra``), keeping earlier fields."""
    import torch

    path = run_dir / RUN_FILE
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            data = {}
    data.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    data.update(status=status, updated=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=torch.__version__,
                python=platform.python_version())
    try:
        from importlib.metadata import version

        data["deltameta"] = version("deltameta")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        pass
    data.update(extra)
    atomic_write_json(path, data)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class MetricsLog:
    """Append-only metrics: ``metrics.jsonl``, each row also sent to the ``report_to`` trackers.

    On resume, rows after the resumed step are dropped first so the file matches an
    uninterrupted run; a last line cut short by a kill is dropped with a warning. Each row is
    synced to disk as it is appended.

    Args:
        run_dir: The run directory.
        truncate_after: Drop existing rows with ``step`` greater than this (resume).
        reporter: The trackers (:class:`deltameta.reporting.Reporter`), or ``None`` for none.
    """

    def __init__(self, run_dir: Path, truncate_after: int | None = None, reporter: Any = None) -> None:
        self.path = run_dir / METRICS_FILE
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            lines = [(n, line) for n, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace")
                                                           .splitlines(), 1) if line.strip()]
            for position, (number, line) in enumerate(lines):
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("not a JSON object")
                except ValueError as error:
                    if position == len(lines) - 1:
                        logger.warning("%s: dropped its last line %d, cut short by an interrupted write", self.path, number)
                        break
                    raise MetaStateError(f"{self.path} line {number} is not a JSON object ({error}); "
                                         "the metrics file is damaged.") from None
                if truncate_after is None or row.get("step", 0) <= truncate_after:
                    self.rows.append(row)
            atomic_write_text(self.path, "".join(dumps_json(r) + "\n" for r in self.rows))
        self.reporter = reporter

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (``step`` and ``kind`` plus numbers)."""
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        append_line(self.path, dumps_json(row))
        if self.reporter is not None:
            self.reporter.log(row)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Return the rows of one kind (``train`` or ``validation``)."""
        return [r for r in self.rows if r.get("kind") == kind]

    def close(self) -> None:
        """Flush and close the trackers."""
        if self.reporter is not None:
            self.reporter.close()


def write_plots(run_dir: Path, rows: Iterable[dict[str, Any]]) -> list[Path]:
    """Write PNG plots of the training and validation curves into ``RUN_DIR/plots``.

    Returns:
        The files written.
    """
    from deltameta.plots import write_curve_plots

    rows = list(rows)
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "validation"]

    def curves(data: list[dict[str, Any]], keys: list[tuple[str, str]]) -> list[tuple[str, list[tuple[Any, Any]]]]:
        return [(label, [(r["step"], r[key]) for r in data if isinstance(r.get(key), (int, float))]) for key, label in keys]

    panels = [
        ("losses.png", "meta-training losses", curves(train, [("support_before", "support loss (before)"),
                                                               ("query_after", "query loss (after adaptation)")])),
        ("validation.png", "held-out tasks: query loss", curves(val, [("query_before", "before adaptation"),
                                                                       ("query_after", "after adaptation")])),
        ("controller.png", "controller", curves(train, [("controller_entropy", "entropy (nats)"),
                                                         ("controller_budget", "expected params / max")])),
        ("throughput.png", "throughput", curves(train, [("tokens_per_s", "tokens/s")])),
    ]
    return write_curve_plots(run_dir / PLOTS_DIR, panels, "outer step")
