"""The evaluation task: score one checkpoint on one split."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from evomerge.device_pool import lease_device
from evomerge.jobs import EvaluationJob, evaluate_candidate
from tasks.common import retry_on_transient_error


def evaluation_cache_key(context: TaskRunContext, parameters: dict) -> str:
    """Key the cache on the candidate, the evaluation settings hash and the split."""
    job: EvaluationJob = parameters["job"]
    return f"evomerge-eval-{job.key}-{job.settings_hash}-{job.split}"


@task(
    name="evaluate-candidate",
    tags=["gpu"],
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_on_transient_error,
    cache_key_fn=evaluation_cache_key,
    persist_result=True,
    task_run_name="evaluate-{job.key}-{job.split}",
)
def evaluate_candidate_task(job: EvaluationJob):
    """Score the checkpoint of ``job`` on its own device lease; a broken model returns failed scores."""
    logger = get_run_logger()
    with lease_device(job.device) as device:
        scores = evaluate_candidate(job.model_copy(update={"device": device}))
    if scores.failed:
        logger.warning("candidate %s scored as failed: %s", job.key, scores.error)
    else:
        logger.info("candidate %s %s fitness %.4f on %s in %.1f s", job.key, job.split, scores.fitness, scores.device, scores.wall_seconds)
    return scores
