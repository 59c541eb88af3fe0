"""Progress display: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")

logger = logging.getLogger(__name__)


def show_progress(items: Iterable[Item], total: int, description: str) -> Iterator[Item]:
    """Yield ``items``, showing ``description`` and the count done.

    On a terminal this is a tqdm bar on standard error. In a pipe, a file or
    a Prefect worker it logs one INFO line per finished item instead.
    """
    if total == 0:
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=description, unit="job", leave=False)
        return
    for done, item in enumerate(items, start=1):
        logger.info("%s: %d/%d done", description, done, total)
        yield item
