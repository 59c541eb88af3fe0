"""Logging set-up shared by the command line, the flows and the benchmarks."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DEFAULT_LOG_FILE = "evomerge.log"
MAX_LOG_BYTES = 10 * 1024 * 1024
LOG_BACKUP_COUNT = 5


class CurrentStderrHandler(logging.StreamHandler):
    """A console handler that writes to ``sys.stderr`` as it is at each record.

    pytest, Prefect and notebooks replace ``sys.stderr``; a handler bound to the
    stream of the moment it was made would later write to a closed file.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(
    verbose: bool = False,
    log_file: str | os.PathLike[str] | None = DEFAULT_LOG_FILE,
) -> logging.Logger:
    """Configure the ``evomerge`` logger with a console and a rotating file handler.

    The console shows INFO, or DEBUG with ``verbose``. The file always records
    DEBUG and rotates at 10 MiB, keeping five old files. Calling it again
    replaces the handlers instead of adding duplicates. ``log_file=None``
    disables the file.
    """
    logger = logging.getLogger("evomerge")
    logger.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        if getattr(handler, "_evomerge_handler", False):
            logger.removeHandler(handler)
            handler.close()

    formatter = logging.Formatter(LOG_FORMAT)
    console = CurrentStderrHandler()
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(formatter)
    console._evomerge_handler = True  # type: ignore[attr-defined]
    logger.addHandler(console)

    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=MAX_LOG_BYTES, backupCount=LOG_BACKUP_COUNT, encoding="utf-8"
        )
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(formatter)
        file_handler._evomerge_handler = True  # type: ignore[attr-defined]
        logger.addHandler(file_handler)

    if not verbose:
        quiet_library_progress_bars()

    # Prefect attaches its own handlers to the root logger; without this the
    # console would print every record twice inside a flow run.
    logger.propagate = False
    return logger


def quiet_library_progress_bars() -> None:
    """Turn off the per-file progress bars of huggingface_hub and transformers (EvoMerge shows its own)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
