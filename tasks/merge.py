"""The merge task: build one candidate into the checkpoint store."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from evomerge.device_pool import lease_device
from evomerge.jobs import BuildJob, BuildResult, build_candidate
from evomerge.recipe import MERGE_CODE_VERSION
from tasks.common import retry_on_transient_error


def merge_cache_key(context: TaskRunContext, parameters: dict) -> str:
    """Key the cache on the candidate key and the merge-code version, not on the task's source."""
    job: BuildJob = parameters["job"]
    return f"evomerge-merge-v{MERGE_CODE_VERSION}-{job.key}"


@task(
    name="merge-candidate",
    tags=["gpu"],
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_on_transient_error,
    cache_key_fn=merge_cache_key,
    persist_result=True,
    task_run_name="merge-{job.key}",
)
def merge_candidate(job: BuildJob) -> BuildResult:
    """Merge ``job.recipe`` into the store and return its reference (or the failure reason)."""
    with lease_device(None) as device:
        result = build_candidate(job.model_copy(update={"device": device}))
    logger = get_run_logger()
    if result.failed:
        logger.warning("candidate %s failed to build: %s", job.key, result.error)
    else:
        action = "reused" if result.reused else "built"
        logger.info("candidate %s %s in %.1f s: %s", job.key, action, result.seconds, result.ref.uri)
    return result
