"""Build and score one candidate: the units of work that tasks and executors run.

Both functions take small, picklable job descriptions and return small
results, so they run the same in a thread, a Dask worker or another host.
They never write the ledger: only the process that runs the generation loop
does.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evomerge.checkpoint import DEFAULT_MAX_SHARD_BYTES
from evomerge.config import EvaluationSettings, StorageSettings
from evomerge.exceptions import EvoMergeException
from evomerge.store import CheckpointRef, CheckpointStore

logger = logging.getLogger(__name__)

_import_lock = threading.Lock()


def import_model_libraries() -> None:
    """Import the transformers classes the jobs use, one thread at a time.

    transformers resolves its top-level names lazily, and two threads doing
    the first import at once can see a half-initialised module
    ("cannot import name 'AutoModelForCausalLM'").
    """
    with _import_lock:
        import transformers

        transformers.AutoModelForCausalLM  # noqa: B018 - forces the lazy import
        transformers.AutoTokenizer  # noqa: B018


class BuildJob(BaseModel):
    """Everything a worker needs to build one candidate."""

    model_config = ConfigDict(frozen=True)

    key: str
    recipe: dict[str, Any]
    # "model:NAME" -> local folder or Hub id; "candidate:KEY" inputs resolve through the store.
    model_paths: dict[str, str]
    storage: StorageSettings
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    allow_pickle: bool = False
    out_dtype: str | None = None
    device: str = "cpu"


class BuildResult(BaseModel):
    """The outcome of a build: a reference, or the reason it failed."""

    model_config = ConfigDict(frozen=True)

    key: str
    ref: CheckpointRef | None = None
    failed: bool = False
    error: str | None = None
    seconds: float = 0.0
    reused: bool = Field(default=False, description="True when the store already held the checkpoint.")


class EvaluationJob(BaseModel):
    """Everything a worker needs to score one built candidate or input model."""

    model_config = ConfigDict(frozen=True)

    key: str
    ref: CheckpointRef | None = None
    # An input model is scored from its folder rather than from the store.
    model_path: str | None = None
    settings: EvaluationSettings
    settings_hash: str
    split: str = "search"
    storage: StorageSettings
    device: str | None = None


def open_store(storage: StorageSettings) -> CheckpointStore:
    """Open the checkpoint store described by ``storage``."""
    return CheckpointStore(
        storage.resolved_store_url(),
        storage_options=storage.storage_options,
        cache_dir=storage.resolved_cache_dir(),
    )


def build_candidate(job: BuildJob) -> BuildResult:
    """Merge one recipe into the store, or reuse the checkpoint already there.

    Invalid recipes and failed merges become a failed result with the error
    message. Transient store errors are raised so the caller can retry them.
    """
    from evomerge.exceptions import TransientStoreError
    from evomerge.merge.engine import MergeOptions, run_merge
    from evomerge.recipe import Recipe, recipe_to_spec

    import_model_libraries()
    started = time.perf_counter()
    store = open_store(job.storage)
    existing = store.get(job.key)
    if existing is not None:
        logger.info("candidate %s: reused from %s", job.key, existing.uri)
        return BuildResult(key=job.key, ref=existing, reused=True, seconds=time.perf_counter() - started)

    try:
        recipe = Recipe.model_validate(job.recipe)

        def resolve(reference: str) -> str:
            if reference.startswith("candidate:"):
                return str(store.local_path(reference.split(":", 1)[1]))
            return job.model_paths[reference]

        spec = recipe_to_spec(recipe, resolve)
        options = MergeOptions(
            max_shard_bytes=job.max_shard_bytes,
            allow_pickle=job.allow_pickle,
            out_dtype=job.out_dtype,
            device=job.device,
        )
        with store.staging_dir(job.key) as staging:
            output = run_merge(spec, staging / "model", options)
            ref = store.publish(job.key, output, recipe=job.recipe)
    except TransientStoreError:
        raise
    except EvoMergeException as error:
        seconds = time.perf_counter() - started
        logger.warning("candidate %s: build failed after %.1f s: %s", job.key, seconds, error)
        return BuildResult(key=job.key, failed=True, error=str(error), seconds=seconds)

    seconds = time.perf_counter() - started
    logger.info(
        "candidate %s: built %s in %.1f s on %s (%d bytes)", job.key, recipe.method, seconds, job.device, ref.size_bytes
    )
    return BuildResult(key=job.key, ref=ref, seconds=seconds)


def evaluate_candidate(job: EvaluationJob):
    """Score one checkpoint; a broken model returns failed ``Scores`` instead of raising."""
    from evomerge.evaluation import WORST_FITNESS, Scores, evaluate_model

    import_model_libraries()
    if job.model_path is not None:
        path = job.model_path
    elif job.ref is not None:
        try:
            path = str(open_store(job.storage).local_path(job.ref))
        except EvoMergeException as error:
            logger.warning("candidate %s: checkpoint unavailable: %s", job.key, error)
            return Scores(
                metrics={},
                fitness=WORST_FITNESS,
                split=job.split,
                settings_hash=job.settings_hash,
                failed=True,
                error=str(error),
            )
    else:
        raise ValueError(f"evaluation job {job.key} has neither a checkpoint reference nor a model path")

    scores = evaluate_model(path, job.settings, split=job.split, device=job.device)
    logger.info(
        "candidate %s: %s fitness %.4f in %.1f s on %s%s",
        job.key,
        job.split,
        scores.fitness,
        scores.wall_seconds,
        scores.device,
        f" (failed: {scores.error})" if scores.failed else "",
    )
    return scores
