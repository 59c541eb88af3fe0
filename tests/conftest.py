"""Session-wide test set-up: an isolated Prefect home, no telemetry, no Hub access."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="evomerge-tests-"))

# Set before anything imports Prefect or huggingface_hub.
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = "evomerge"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ.pop("PREFECT_API_URL", None)

# Prefect binds its console handler to sys.stderr when it is first imported.
# Importing it here binds the session's stream, not one test's captured
# stream that is closed when that test ends.
import prefect  # noqa: E402,F401

# One moto S3 server on 127.0.0.1 for the whole session; see tests/s3_server.py.
from s3_server import s3_bucket, s3_server  # noqa: E402,F401


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs about 12 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> list[Path]:
    """A tiny base model and three noisy fine-tunes of it, built once per session."""
    from evomerge.testing import make_tiny_family

    return make_tiny_family(tmp_path_factory.mktemp("family"), count=3)


@pytest.fixture(autouse=True)
def restore_evomerge_logger():
    """Undo what an in-process ``main()`` call's ``setup_logging`` did to the ``evomerge`` logger."""
    import logging

    logger = logging.getLogger("evomerge")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = propagate, level
