"""Distributed Prefect task runners (Dask and Ray) and the GPU request of each task.

With Dask or Ray the merge and evaluation tasks run in other processes, and
possibly on other hosts. They share only what their job carries: checkpoints
go through the fsspec store named in ``job.storage``, and results come back
through Prefect, which also persists them to its result storage. The ledger
stays in the flow process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from evomerge.config import Configuration, RunnerSettings
from evomerge.exceptions import ConfigError

logger = logging.getLogger(__name__)

TASK_RUNNERS = ("thread", "dask", "ray")
# Dask resource name that GPU workers declare (`dask worker --resources GPU=1`) and tasks request.
GPU_RESOURCE = "GPU"


def apply_runner_overrides(config: Configuration, task_runner: str | None = None, address: str | None = None) -> Configuration:
    """Return ``config`` with ``runner.task_runner`` and ``runner.address`` set from command-line values.

    A ``None`` value keeps the configured one.
    """
    runner = config.runner
    updates = {}
    if task_runner is not None:
        if task_runner not in TASK_RUNNERS:
            raise ConfigError(f"unknown task runner {task_runner!r}: use one of {', '.join(TASK_RUNNERS)}")
        updates["task_runner"] = task_runner
    if address is not None:
        updates["address"] = address
    runner = runner.model_copy(update=updates)

    if runner.address and runner.task_runner == "thread":
        raise ConfigError(
            f"address {runner.address!r} needs a distributed task runner: "
            "add --task-runner dask or --task-runner ray (runner.task_runner in the configuration)"
        )
    return config.model_copy(update={"runner": RunnerSettings.model_validate(runner.model_dump())})


def visible_gpu_ids() -> list[str]:
    """Return the CUDA device ids this host offers, honouring an existing CUDA_VISIBLE_DEVICES."""
    from evomerge.device_pool import cuda_device_count

    count = cuda_device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return [entry.strip() for entry in visible.split(",") if entry.strip()][:count]
    return [str(index) for index in range(count)]


def gpu_cluster_spec(gpu_ids: list[str], gpus_per_task: float) -> dict:
    """Build ``SpecCluster`` arguments for one Dask worker process per GPU, bound to 127.0.0.1.

    Each worker's CUDA_VISIBLE_DEVICES names only its own GPU, so inside the
    worker that GPU is ``cuda:0``. Each worker declares the resource ``GPU=1``
    and runs as many tasks at once as fit on its GPU at ``gpus_per_task`` each.
    """
    from distributed import Nanny, Scheduler

    slots = max(1, int(1.0 / gpus_per_task)) if gpus_per_task > 0 else 1
    workers = {
        f"gpu-{gpu_id}": {
            "cls": Nanny,
            "options": {
                "host": "127.0.0.1",
                "nthreads": slots,
                "resources": {GPU_RESOURCE: 1},
                "env": {"CUDA_VISIBLE_DEVICES": gpu_id},
            },
        }
        for gpu_id in gpu_ids
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    return {"workers": workers, "scheduler": scheduler}


def make_dask_task_runner(runner: RunnerSettings):
    """Return a DaskTaskRunner for an existing scheduler (``runner.address``) or a temporary local cluster.

    The local cluster runs ``max_workers`` single-threaded worker processes on
    127.0.0.1. With ``gpus_per_task > 0`` it runs one worker process per visible
    GPU instead, each pinned to its GPU.
    """
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            "runner.task_runner 'dask' needs prefect-dask: install it with pip install 'evomerge[dask]'"
        ) from None

    if runner.address:
        return DaskTaskRunner(address=runner.address)

    if runner.gpus_per_task > 0:
        gpu_ids = visible_gpu_ids()
        if not gpu_ids:
            raise ConfigError(
                f"runner.gpus_per_task is {runner.gpus_per_task} but this host has no CUDA device for a local "
                "Dask cluster: set gpus_per_task to 0, or set runner.address to a scheduler whose workers "
                f"declare '--resources {GPU_RESOURCE}=1'"
            )
        if runner.gpus_per_task > 1:
            raise ConfigError(
                f"runner.gpus_per_task is {runner.gpus_per_task}, but a local Dask cluster pins one GPU to each "
                "worker, so no worker could run such a task: set gpus_per_task to 1 or less, or start workers "
                f"with '--resources {GPU_RESOURCE}=N' yourself and set runner.address"
            )
        logger.info("starting a local Dask cluster with one worker per GPU: %s", ", ".join(gpu_ids))
        return DaskTaskRunner(
            cluster_class="distributed.SpecCluster",
            cluster_kwargs=gpu_cluster_spec(gpu_ids, runner.gpus_per_task),
        )

    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": runner.max_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        },
    )


def make_ray_task_runner(runner: RunnerSettings):
    """Return a RayTaskRunner for an existing Ray cluster (``runner.address``) or a temporary local one."""
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise ConfigError(
            "runner.task_runner 'ray' needs prefect-ray: install it with pip install 'evomerge[ray]'"
        ) from None

    if runner.address:
        return RayTaskRunner(address=runner.address)
    # One CPU per task bounds a local Ray instance to max_workers concurrent tasks.
    return RayTaskRunner(init_kwargs={"num_cpus": runner.max_workers, "include_dashboard": False})


def make_distributed_task_runner(runner: RunnerSettings):
    """Return a DaskTaskRunner or RayTaskRunner for ``runner``."""
    if runner.task_runner == "dask":
        return make_dask_task_runner(runner)
    if runner.task_runner == "ray":
        return make_ray_task_runner(runner)
    raise ConfigError(f"unknown runner.task_runner {runner.task_runner!r}: use 'thread', 'dask' or 'ray'")


@contextlib.contextmanager
def gpu_request(runner: RunnerSettings) -> Iterator[None]:
    """Request ``runner.gpus_per_task`` GPUs for every task submitted inside the block.

    Dask gets a resource annotation (only workers that declare ``GPU`` run the
    task), Ray gets ``num_gpus``. The thread runner and ``gpus_per_task: 0``
    request nothing.
    """
    if runner.gpus_per_task <= 0 or runner.task_runner == "thread":
        yield
        return

    if runner.task_runner == "dask":
        import dask

        with dask.annotate(resources={GPU_RESOURCE: runner.gpus_per_task}):
            yield
        return

    from prefect_ray.context import remote_options

    with remote_options(num_gpus=runner.gpus_per_task):
        yield


def task_runner_matches(task_runner, runner: RunnerSettings) -> bool:
    """Check whether a flow's task runner is the kind ``runner`` selects (and, for threads, the same size)."""
    kind = type(task_runner).__name__
    if runner.task_runner == "thread":
        return kind == "ThreadPoolTaskRunner" and getattr(task_runner, "_max_workers", None) == runner.max_workers
    if runner.task_runner == "dask":
        return kind == "DaskTaskRunner" and task_runner.address == runner.address
    return kind == "RayTaskRunner" and task_runner.address == runner.address
