"""Hand each concurrent merge or evaluation in this process its own GPU.

Prefect's ``gpu`` tag limit only bounds how many tasks run at once; it does
not choose a CUDA device. The pool below does: a task takes the least busy
device for its duration and gives it back afterwards. Without CUDA every
lease is ``cpu``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_busy: dict[int, int] = {}


def cuda_device_count() -> int:
    """Return the number of visible CUDA devices (0 without CUDA)."""
    override = os.environ.get("EVOMERGE_FAKE_CUDA_DEVICES")
    if override is not None:
        return int(override)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def lease_device(preference: str | None = None) -> Iterator[str]:
    """Yield a device string for one task: ``preference`` when it names one, else the least busy GPU or ``cpu``."""
    if preference and preference != "auto":
        yield preference
        return

    count = cuda_device_count()
    if count == 0:
        yield "cpu"
        return

    with _lock:
        index = min(range(count), key=lambda i: (_busy.get(i, 0), i))
        _busy[index] = _busy.get(index, 0) + 1
    try:
        yield f"cuda:{index}"
    finally:
        with _lock:
            _busy[index] -= 1
