"""The ``evomerge`` Prefect flow: an evolutionary merge tournament.

Run it locally with ``python flows/tournament.py [--config FILE]``; deployed
from ``prefect.yaml`` it is ``evomerge/tournament``. Each generation maps merge
and evaluation tasks over the candidates; the generation loop itself lives in
``evomerge.tournament``.
"""

from __future__ import annotations

import os

# Prefect reads these when it is imported: no telemetry, and the library's
# loggers forwarded to the Prefect UI.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "evomerge")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.context import FlowRunContext  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from evomerge.config import Configuration, RunnerSettings, config_from_dict, load_config  # noqa: E402
from evomerge.jobs import BuildJob, BuildResult, EvaluationJob, open_store  # noqa: E402
from evomerge.progress import show_progress  # noqa: E402
from evomerge.tournament import GenerationReport, TournamentResult, run_tournament  # noqa: E402
from flows.runners import (  # noqa: E402
    TASK_RUNNERS,
    apply_runner_overrides,
    gpu_request,
    make_distributed_task_runner,
    task_runner_matches,
)
from tasks.evaluate import evaluate_candidate_task  # noqa: E402
from tasks.merge import merge_candidate  # noqa: E402


def artifact_key(*parts: str) -> str:
    """Return a Prefect artifact key (lowercase letters, digits and dashes) built from ``parts``."""
    text = "-".join(parts).lower()
    return re.sub(r"[^a-z0-9-]+", "-", text).strip("-")[:100]


class PrefectExecutor:
    """Map the generation's jobs onto Prefect tasks and publish artifacts.

    ``task_runner`` is a started task runner to submit to. With ``None`` the
    executor submits to the flow's own task runner.
    """

    def __init__(self, config: Configuration, task_runner=None):
        self.config = config
        self.task_runner = task_runner
        self.store = open_store(config.storage)
        self.progress_id = None
        runner = config.runner
        self.merge_task = merge_candidate.with_options(retries=runner.retries, timeout_seconds=runner.merge_timeout_seconds)
        self.evaluate_task = evaluate_candidate_task.with_options(
            retries=runner.retries, timeout_seconds=runner.evaluation_timeout_seconds
        )

    def build(self, jobs: list[BuildJob]) -> list[BuildResult]:
        futures = []
        for job in jobs:
            task = self.merge_task
            # A cached reference can outlive its checkpoint (manual clean-up,
            # bucket lifecycle rules): rebuild instead of trusting the cache.
            if not self.store.exists(job.key):
                task = task.with_options(refresh_cache=True)
            futures.append(self._submit(task, job))
        return _results(futures, "merges")

    def evaluate(self, jobs: list[EvaluationJob]) -> list[Any]:
        if not jobs:
            return []
        futures = [self._submit(self.evaluate_task, job) for job in jobs]
        return _results(futures, "evaluations")

    def _submit(self, task, job):
        """Submit ``task(job)`` with the configured GPU request and return its future."""
        with gpu_request(self.config.runner):
            if self.task_runner is None:
                return task.submit(job)
            return self.task_runner.submit(task, {"job": job})

    def publish_generation(self, report: GenerationReport) -> None:
        from evomerge.charts import generation_markdown

        logger = get_run_logger()
        logger.info(
            "generation %d/%d done in %.1f s: best %s (fitness %s)",
            report.generation + 1,
            report.total_generations,
            report.wall_seconds,
            report.best_key,
            report.best_fitness,
        )
        create_markdown_artifact(
            key=artifact_key("evomerge-fitness", report.run_id),
            markdown=generation_markdown(report.run_id, report.generation, report.generations, report.candidates),
            description=f"Fitness up to generation {report.generation} (numbered from 0) of run {report.run_id}",
        )
        create_table_artifact(
            key=artifact_key("evomerge-generation", report.run_id),
            table=[_rounded_row(row) for row in report.rows],
            description=f"Candidates of generation {report.generation} (numbered from 0) of run {report.run_id}",
        )
        progress = 100.0 * (report.generation + 1) / max(report.total_generations, 1)
        if self.progress_id is None:
            self.progress_id = create_progress_artifact(
                progress=progress,
                key=artifact_key("evomerge-progress", report.run_id),
                description=f"Generations finished in run {report.run_id}",
            )
        else:
            update_progress_artifact(self.progress_id, progress=progress)

    def publish_final(self, result: TournamentResult, markdown: str) -> None:
        if self.progress_id is not None:
            update_progress_artifact(self.progress_id, progress=100.0)
        create_markdown_artifact(
            key=artifact_key("evomerge-result", result.run_id),
            markdown=markdown,
            description=f"Best candidate of run {result.run_id}",
        )


def _results(futures, description: str) -> list[Any]:
    """Wait for every future, showing progress as they finish, and return the results in submission order."""
    for _ in show_progress(as_completed(futures), len(futures), description):
        pass
    return [future.result() for future in futures]


def _rounded_row(row: dict[str, Any]) -> dict[str, Any]:
    rounded = {}
    for name, value in row.items():
        if isinstance(value, float):
            rounded[name] = float(f"{value:.4g}")
        else:
            rounded[name] = value
    return rounded


def resolve_config(config: str | dict | Configuration | None) -> Configuration:
    """Accept a YAML path, a mapping, a ``Configuration`` or ``None`` (the default configuration)."""
    if config is None:
        from evomerge.defaults import create_default_config

        return create_default_config()
    if isinstance(config, Configuration):
        return config
    if isinstance(config, dict):
        return config_from_dict(config, source="flow parameter 'config'")
    return load_config(config)


def apply_overrides(config: Configuration, overrides: dict[str, Any] | None) -> Configuration:
    """Return ``config`` with the nested mapping ``overrides`` merged over it, validated again."""
    if not overrides:
        return config

    def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
        merged = dict(base)
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = value
        return merged

    return config_from_dict(merge(config.model_dump(mode="json"), overrides), source="flow parameter 'overrides'")


def make_task_runner(runner: RunnerSettings):
    """Return the Prefect task runner that ``runner`` selects."""
    if runner.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    return make_distributed_task_runner(runner)


@flow(name="evomerge", task_runner=ThreadPoolTaskRunner(max_workers=2))
def tournament(
    config: str | dict[str, Any] | None = None,
    run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run an evolutionary merge tournament and return a summary of the best candidate.

    ``config`` is a YAML path, a configuration mapping, or empty for the
    default configuration. ``overrides`` is a nested mapping merged over it,
    such as ``{"evolution": {"generations": 8}}``; a schedule in prefect.yaml
    uses it to run a larger search than manual runs. A ``run_id`` that
    already exists resumes that run.
    """
    configuration = apply_overrides(resolve_config(config), overrides)
    with contextlib.ExitStack() as stack:
        # A deployed flow starts with the decorator's task runner, so the configured one is opened here.
        task_runner = None
        if not task_runner_matches(FlowRunContext.get().task_runner, configuration.runner):
            task_runner = stack.enter_context(make_task_runner(configuration.runner))
        result = run_tournament(configuration, PrefectExecutor(configuration, task_runner), run_id=run_id)
    return {
        "run_id": result.run_id,
        "best_key": result.best_key,
        "best_path": str(result.best_path) if result.best_path else None,
        "best_fitness": result.best_fitness,
        "output_dir": str(result.output_dir) if result.output_dir else None,
        "files": {name: str(path) for name, path in result.files.items()},
        "comparison": result.comparison,
    }


def run_flow(config: str | dict | Configuration | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Run the flow in this process. Its tasks run on the task runner that the configuration selects."""
    configuration = resolve_config(config)
    return tournament(config=configuration.model_dump(mode="json"), run_id=run_id)


def prepare_default_family() -> str:
    """Prepare the default SmolLM2 family with its own flow (cached after the first run); return its config path."""
    from evomerge.defaults import DEFAULT_STATE_DIR
    from evomerge.exceptions import ConfigError
    from flows.prepare_models import prepare_models

    work_dir = Path(DEFAULT_STATE_DIR).absolute() / "family"
    summary = prepare_models(work_dir=str(work_dir))
    if "config" not in summary:
        raise ConfigError(
            f"no specialist in {work_dir} beat the base model on its own domain, so there is nothing to merge: "
            "see family.json there, or run a tournament with --config"
        )
    return summary["config"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run an EvoMerge tournament as a local Prefect flow.")
    parser.add_argument("--config", help="YAML configuration file (default: the built-in configuration)")
    parser.add_argument("--run-id", help="run id; an existing id resumes that run")
    parser.add_argument(
        "--task-runner", choices=TASK_RUNNERS, help="where tasks run: threads here, a Dask or a Ray cluster (default: runner.task_runner)"
    )
    parser.add_argument("--address", help="scheduler address of an existing Dask or Ray cluster (default: runner.address)")
    parser.add_argument("--verbose", action="store_true", help="log DEBUG messages on the console")
    args = parser.parse_args(argv)

    from evomerge.exceptions import EvoMergeException
    from evomerge.logging_config import setup_logging
    from evomerge.summary import print_summary

    setup_logging(verbose=args.verbose)
    try:
        config_source = args.config or prepare_default_family()
        configuration = apply_runner_overrides(resolve_config(config_source), args.task_runner, args.address)
        summary = run_flow(configuration, run_id=args.run_id)
    except EvoMergeException as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
