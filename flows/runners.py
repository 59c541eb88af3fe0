"""Distributed Prefect task runners: Dask and Ray."""

from __future__ import annotations

from evomerge.config import RunnerSettings
from evomerge.exceptions import ConfigError


def make_distributed_task_runner(runner: RunnerSettings):
    """Return a DaskTaskRunner or RayTaskRunner for ``runner``."""
    if runner.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError(
                "runner.task_runner 'dask' needs prefect-dask: install it with pip install 'evomerge[dask]'"
            ) from None
        if runner.address:
            return DaskTaskRunner(address=runner.address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": runner.max_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None},
        )
    if runner.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ConfigError(
                "runner.task_runner 'ray' needs prefect-ray: install it with pip install 'evomerge[ray]'"
            ) from None
        return RayTaskRunner(address=runner.address) if runner.address else RayTaskRunner()
    raise ConfigError(f"unknown runner.task_runner {runner.task_runner!r}: use 'thread', 'dask' or 'ray'")
