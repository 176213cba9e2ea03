"""Experiment trackers: the ``report_to`` key of ``meta-train``, ``finetune`` and ``evaluate``.

As in Hugging Face ``TrainingArguments.report_to``: ``none`` (the default, as in transformers
5), ``tensorboard``, ``wandb``, ``all`` (every one of them that is installed) or a list. A tracker
that is asked for by name but not installed is a :class:`~deltameta.errors.ConfigError` when the
config is built, before anything runs; nothing is skipped silently.

Every command writes its own ``metrics.jsonl`` whatever ``report_to`` says; a :class:`Reporter`
sends the same rows to the trackers: each number of a row becomes the scalar ``KIND/KEY`` at the
row's ``step`` (``train/loss``, ``validation/val_loss``, ...). TensorBoard events go to
``OUTPUT/tensorboard``; wandb runs go to the project ``$WANDB_PROJECT`` (default ``deltameta``)
with the resolved config attached and their files under ``OUTPUT/wandb``.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

from deltameta.errors import ConfigError

#: Trackers ``report_to`` may name -> the module that must be importable, and how to install it.
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard  (or: pip install 'deltameta[tensorboard]')"),
    "wandb": ("wandb", "pip install wandb"),
}
#: Words that are not trackers.
SPECIAL = ("none", "all")


def installed(tracker: str) -> bool:
    """Whether the package behind ``tracker`` can be imported."""
    module = TRACKERS[tracker][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_report_to(value: str | Sequence[str] | None) -> list[str]:
    """Turn a ``report_to`` value into the list of trackers to use.

    Args:
        value: ``none``, ``all``, a tracker name, or a list of names (``None`` = ``none``).

    Returns:
        The trackers, without duplicates, in the given order (``[]`` for ``none``).

    Raises:
        ConfigError: an unknown name (the closest is suggested), ``none``/``all`` mixed with
            trackers, or a named tracker that is not installed (with the install command).
    """
    names = [value] if isinstance(value, str) else list(value or ["none"])
    names = [str(n).strip() for item in names for n in str(item).split(",") if str(n).strip()] or ["none"]
    valid = list(TRACKERS) + list(SPECIAL)
    for name in names:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"report_to: unknown tracker '{name}'.{hint} Valid: {', '.join(valid)}.")
    if len(names) > 1 and any(n in SPECIAL for n in names):
        raise ConfigError(f"report_to={names}: 'none' and 'all' stand alone; give one of them or a list of trackers.")
    if names == ["none"]:
        return []
    if names == ["all"]:
        return [t for t in TRACKERS if installed(t)]
    missing = [n for n in dict.fromkeys(names) if not installed(n)]
    if missing:
        how = "; ".join(TRACKERS[n][1] for n in missing)
        raise ConfigError(f"report_to asks for {', '.join(missing)}, which is not installed: {how}; or drop it "
                          "from report_to (report_to=none writes only metrics.jsonl).")
    return list(dict.fromkeys(names))


def report_to_field() -> Any:
    """The ``report_to`` key (one definition for every command)."""
    from deltameta.config import field

    return field(["none"], "experiment trackers, as in HF Trainer: none, tensorboard, wandb, all (installed ones) or a list")


class Reporter:
    """Sends metric rows to the trackers of ``report_to``.

    Args:
        report_to: The config's ``report_to`` value.
        out: The run's output directory.
        config: The resolved config (for wandb's run config).
        job: ``meta-train``, ``finetune`` or ``evaluate`` (wandb's job type).
        resume: The run continues an earlier one (wandb resumes the same run id).

    Raises:
        ConfigError: see :func:`resolve_report_to`.
    """

    def __init__(self, report_to: str | Sequence[str] | None, out: Path, config: dict[str, Any] | None = None,
                 job: str = "", resume: bool = False) -> None:
        self.trackers = resolve_report_to(report_to)
        self.out = Path(out)
        self.tensorboard = None
        self.wandb = None
        if "tensorboard" in self.trackers:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
        if "wandb" in self.trackers:
            import wandb

            run_id = self._wandb_id(resume)
            (self.out / "wandb").mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "deltameta"), name=self.out.name,
                                    dir=str(self.out), config=config or {}, job_type=job or None, id=run_id,
                                    resume="allow" if resume else None)

    def _wandb_id(self, resume: bool) -> str | None:
        path = self.out / "wandb" / "run_id"
        if resume and path.is_file():
            return path.read_text(encoding="utf-8").strip() or None
        import secrets

        run_id = secrets.token_hex(4)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id, encoding="utf-8")
        return run_id

    def log(self, row: dict[str, Any]) -> None:
        """Send the numbers of one metrics row (``step``, ``kind`` and values) as ``KIND/KEY`` scalars."""
        kind = row.get("kind", "train")
        self.log_scalars({f"{kind}/{key}": value for key, value in row.items() if key != "step"}, int(row.get("step", 0) or 0))

    def log_scalars(self, scalars: dict[str, Any], step: int) -> None:
        """Send named scalars at ``step`` (entries that are not numbers are left out)."""
        if self.tensorboard is None and self.wandb is None:
            return
        scalars = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close the trackers."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
