"""Device, dtype and CPU thread selection for evaluation."""

from __future__ import annotations

import logging
import os

import torch

from evomerge.exceptions import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(preference: str = "auto", worker_index: int | None = None) -> torch.device:
    """Pick the torch device for an evaluation worker.

    ``auto`` prefers CUDA, then MPS, then CPU. With several CUDA GPUs, worker ``i`` gets ``cuda:(i % n)``
    for both ``auto`` and ``cuda``; an explicit ``cuda:N`` is used as given.
    """
    preference = preference.strip().lower()
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0

    if preference == "auto":
        if cuda_count:
            preference = "cuda"
        elif _mps_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")

    if preference == "cpu":
        return torch.device("cpu")

    if preference == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' is not available on this machine: set evaluation.device to 'auto' or 'cpu'")
        return torch.device("mps")

    if preference == "cuda" or preference.startswith("cuda:"):
        if not cuda_count:
            raise ConfigError(
                f"device {preference!r} requested but CUDA is not available: install a CUDA build of torch "
                "or set evaluation.device to 'auto' or 'cpu'"
            )
        if preference == "cuda":
            index = (worker_index or 0) % cuda_count
        else:
            index = _parse_cuda_index(preference)
            if index >= cuda_count:
                raise ConfigError(
                    f"device {preference!r} does not exist: this machine has {cuda_count} CUDA device(s), "
                    f"cuda:0 to cuda:{cuda_count - 1}"
                )
        return torch.device("cuda", index)

    raise ConfigError(f"unknown device {preference!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def _parse_cuda_index(preference: str) -> int:
    suffix = preference.split(":", 1)[1]
    if not suffix.isdigit():
        raise ConfigError(f"device {preference!r} is invalid: write 'cuda:N' with N a device number such as cuda:0")
    return int(suffix)


def select_dtype(device: torch.device | str, preference: str = "auto") -> torch.dtype:
    """Pick the dtype that a model is loaded in for evaluation.

    ``auto`` gives bfloat16 on CUDA devices that support it, float16 on older CUDA devices, and float32
    on CPU and MPS, where half precision is slow or numerically fragile.
    """
    if preference != "auto":
        if preference not in _DTYPES:
            raise ConfigError(f"unknown dtype {preference!r}: use 'auto', {', '.join(repr(name) for name in _DTYPES)}")
        return _DTYPES[preference]

    device = torch.device(device)
    if device.type == "cuda":
        # NOTE: checks the current CUDA device; mixed GPU generations in one machine may differ.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def physical_core_count() -> int:
    """Return the physical cores this process may use, falling back to logical CPUs."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1

    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    if physical:
        return max(1, min(physical, available))
    return max(1, available)


def configure_cpu_threads() -> int:
    """Set torch's intra-op thread count for CPU inference and return it.

    Uses ``OMP_NUM_THREADS`` when it is a positive integer, otherwise the physical core count, because
    hyper-threads add little to matrix multiplications and oversubscription slows them down.
    """
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested.isdigit() and int(requested) > 0:
        threads = int(requested)
    else:
        threads = physical_core_count()

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.debug("torch uses %d CPU threads", threads)
    return threads
