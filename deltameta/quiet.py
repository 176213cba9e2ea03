"""Quiet by default: third-party warnings, log messages and loading bars are hidden unless asked for.

A normal ``deltameta`` run prints one line per fact a user needs, plus deltameta's own progress
bars on long work. Libraries underneath print much more: bitsandbytes kernel notices,
transformers' ``Loading weights`` / ``Writing model shards`` bars and advisory logs, deprecation
``FutureWarning``s (``is_gradient_checkpointing``), PEFT deprecations. :func:`configure` hides
them for the command line (``deltameta --verbose`` shows them again, with deltameta's debug
messages). The library API (``import deltameta``) leaves the caller's settings alone.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: Loggers of the libraries deltameta runs on; above ERROR only when quiet.
THIRD_PARTY_LOGGERS = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface_hub",
                       "torch", "httpx", "urllib3", "filelock", "fsspec", "matplotlib")
#: Modules whose warnings are hidden when quiet (a regex matched against the warning's module).
THIRD_PARTY_MODULES = r"(transformers|peft|bitsandbytes|accelerate|datasets|huggingface_hub|torch|tqdm)(\..*)?$"
#: Environment read by the libraries at import time (also by deltameta's child processes).
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "DATASETS_VERBOSITY": "error",
    "BITSANDBYTES_NOWELCOME": "1",
}


def configure(verbose: bool = False) -> None:
    """Set up logging for the command line: quiet third parties unless ``verbose``.

    Args:
        verbose: Show deltameta's debug messages and every third-party warning, log message and
            loading bar.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=THIRD_PARTY_MODULES)
    # deprecations raised by a library but attributed (stacklevel) to the caller's frame
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(deprecated|will be removed).*")
    # libraries imported before this call read their environment already: tell them directly
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        from datasets.utils import logging as datasets_logging

        datasets_logging.set_verbosity_error()
        datasets_logging.disable_progress_bar()
