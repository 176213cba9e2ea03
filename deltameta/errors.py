"""Exceptions that deltameta raises for bad input.

Every error a user can cause (a wrong path, an unknown key, a malformed file) is raised as a
:class:`DeltametaError` whose message names the file, field or value and says what would be
valid. The command line turns these into a one-paragraph message and exit code 2, never a
traceback.
"""

from __future__ import annotations


class DeltametaError(Exception):
    """Base class for errors caused by user input or the environment (not by bugs)."""


class ConfigError(DeltametaError, ValueError):
    """A recipe, override or argument is invalid."""


class ModelLoadError(DeltametaError):
    """A base model could not be found, prepared or loaded."""


class QuantizationUnavailableError(ModelLoadError):
    """4-bit quantization was asked for but cannot run here."""


class DataError(DeltametaError, ValueError):
    """A task file or collection is malformed."""


class MetaStateError(DeltametaError):
    """A meta-state or run directory is missing, unfinished or malformed."""
