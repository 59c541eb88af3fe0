"""Benchmark: evaluation throughput of a local Dask cluster with one worker process against two.

Each worker process is single-threaded (``threads_per_worker=1`` and
``OMP_NUM_THREADS=1``, so torch uses one thread), and the workload is
``evomerge.jobs.evaluate_candidate`` over a few small random Llama models:
the same function the Prefect evaluation task runs on a Dask worker. The flow
reaches the cluster through prefect-dask's DaskTaskRunner. This benchmark
submits to the cluster with ``distributed`` directly, because the library does
not import Prefect. Prefect's per-task overhead is therefore not in the figures.

Run ``python -m evomerge.scaleout_benchmark [--models 4] [--workers 1,2]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evomerge.config import EvaluationSettings, StorageSettings
from evomerge.exceptions import ConfigError

logger = logging.getLogger(__name__)

# Llama shape of the benchmark models: large enough that one evaluation takes
# seconds on one CPU thread, so process start-up and scheduling do not dominate.
MODEL_LAYERS = 4
MODEL_HIDDEN_SIZE = 512
TEXT_REPEATS = 24


@dataclass
class WorkerRun:
    """Timing of one cluster size: wall time of all evaluations and each evaluation's own time."""

    workers: int
    wall_seconds: float
    evaluation_seconds: list[float]
    fitness: list[float]

    def concurrency(self) -> float:
        """Return the mean number of evaluations in progress: their summed time over the wall time."""
        return sum(self.evaluation_seconds) / self.wall_seconds


@dataclass
class ScaleoutResult:
    """Every cluster size measured, with the speed-up of each over the smallest one."""

    models: int
    hidden_size: int
    repeats: int
    runs: list[WorkerRun] = field(default_factory=list)
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cpu_count: int = 0

    def speedups(self) -> dict[int, float]:
        """Return {workers: wall time of the first run / wall time of this run}."""
        baseline = self.runs[0].wall_seconds
        return {run.workers: baseline / run.wall_seconds for run in self.runs}


def write_texts(folder: Path) -> list[str]:
    """Write the evaluation texts (each tiny-corpus line repeated to a few hundred tokens) and return their paths."""
    from evomerge.testing import TINY_CORPUS

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, line in enumerate(TINY_CORPUS):
        path = folder / f"text-{index}.txt"
        path.write_text(" ".join([line] * TEXT_REPEATS))
        paths.append(str(path))
    return paths


def build_models(root: Path, count: int, hidden_size: int) -> list[Path]:
    """Save ``count`` random Llama models with different seeds under ``root``, reusing models already there."""
    from evomerge.testing import make_tiny_llama

    paths = []
    for index in range(count):
        path = root / f"model-{hidden_size}-{index}"
        if not (path / "config.json").is_file():
            make_tiny_llama(path, seed=index, num_layers=MODEL_LAYERS, hidden_size=hidden_size)
        paths.append(path)
    return paths


def warm_up_worker(job) -> int:
    """Evaluate ``job`` once in a worker process, so imports and first-call costs are paid, and return its torch thread count."""
    import torch

    from evomerge.jobs import evaluate_candidate

    evaluate_candidate(job)
    return torch.get_num_threads()


def time_cluster(workers: int, jobs: list, repeats: int) -> WorkerRun:
    """Evaluate ``jobs`` ``repeats`` times on a fresh local cluster of ``workers`` single-threaded processes.

    Only the evaluations are timed, after every worker has evaluated one model
    untimed. The fastest round counts, because other processes on a shared host
    slow some rounds down.
    """
    from distributed import Client, LocalCluster

    from evomerge.jobs import evaluate_candidate

    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        env={"OMP_NUM_THREADS": "1"},
    )
    with cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        threads = client.run(warm_up_worker, jobs[0])
        logger.info("%d workers ready, torch threads per worker: %s", workers, sorted(threads.values()))

        rounds = []
        for _ in range(repeats):
            started = time.perf_counter()
            futures = client.map(evaluate_candidate, jobs, pure=False)
            scores = client.gather(futures)
            rounds.append((time.perf_counter() - started, scores))
        wall_seconds, scores = min(rounds, key=lambda entry: entry[0])

    failed = [score.error for score in scores if score.failed]
    if failed:
        raise RuntimeError(f"{len(failed)} benchmark evaluations failed; first error: {failed[0]}")
    return WorkerRun(
        workers=workers,
        wall_seconds=wall_seconds,
        evaluation_seconds=[score.wall_seconds for score in scores],
        fitness=[score.fitness for score in scores],
    )


def run_scaleout_benchmark(
    root: str | os.PathLike,
    *,
    models: int = 4,
    worker_counts: tuple[int, ...] = (1, 2),
    hidden_size: int = MODEL_HIDDEN_SIZE,
    repeats: int = 3,
) -> ScaleoutResult:
    """Evaluate ``models`` random models on local Dask clusters of each size in ``worker_counts``."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ConfigError("the scale-out benchmark needs dask.distributed: install it with pip install 'evomerge[dask]'") from None
    if models < 1:
        raise ConfigError(f"models is {models}: give at least 1 model to evaluate")
    if repeats < 1:
        raise ConfigError(f"repeats is {repeats}: give at least 1 timed round")
    if not worker_counts or min(worker_counts) < 1:
        raise ConfigError(f"worker counts {list(worker_counts)} are invalid: give positive integers such as 1,2")

    from evomerge.jobs import EvaluationJob

    root = Path(root)
    paths = build_models(root / "models", models, hidden_size)
    settings = EvaluationSettings(search_texts=write_texts(root / "texts"), max_length=128, stride=64, batch_size=4, device="cpu")
    storage = StorageSettings(state_dir=str(root / "state"))
    jobs = [
        EvaluationJob(key=path.name, model_path=str(path), settings=settings, settings_hash=settings.canonical_hash(), storage=storage)
        for path in paths
    ]

    result = ScaleoutResult(models=models, hidden_size=hidden_size, repeats=repeats, cpu_count=os.cpu_count() or 0)
    for workers in worker_counts:
        run = time_cluster(workers, jobs, repeats)
        logger.info("%d workers: %.2f s for %d evaluations", workers, run.wall_seconds, len(jobs))
        result.runs.append(run)
    result.load_average = os.getloadavg()
    return result


def markdown_section(result: ScaleoutResult, command: str) -> str:
    """Return a Markdown table of the result with the command and machine it ran on."""
    speedups = result.speedups()
    lines = [
        f"Command: `{command}`. {result.models} random Llama models ({MODEL_LAYERS} layers, hidden size "
        f"{result.hidden_size}), each evaluated once with `evomerge.jobs.evaluate_candidate` on a local Dask "
        f"cluster of single-threaded worker processes; fastest of {result.repeats} rounds. Host: {result.cpu_count} CPUs, load average after the "
        f"run {result.load_average[0]:.2f}.",
        "",
        "| workers | wall time (s) | mean time per evaluation (s) | concurrency | speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    for run in result.runs:
        mean = sum(run.evaluation_seconds) / len(run.evaluation_seconds)
        lines.append(
            f"| {run.workers} | {run.wall_seconds:.2f} | {mean:.2f} | {run.concurrency():.2f} | {speedups[run.workers]:.2f}x |"
        )
    lines += [
        "",
        "Concurrency is the sum of the evaluation times over the wall time: how many evaluations ran at once "
        "on average. Speed-up is the wall time of the first row over the wall time of each row.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time evaluations on local Dask clusters of different sizes.")
    parser.add_argument("--models", type=int, default=4, help="number of models to evaluate (default 4)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker process counts (default 1,2)")
    parser.add_argument("--hidden-size", type=int, default=MODEL_HIDDEN_SIZE, help="hidden size of the models")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per cluster size; the fastest counts (default 3)")
    parser.add_argument("--root", help="folder for the models (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of Markdown")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        worker_counts = tuple(int(part) for part in args.workers.split(","))
    except ValueError:
        parser.error(f"--workers {args.workers!r} is invalid: give comma-separated integers such as 1,2")

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="evomerge-scaleout-"))
    result = run_scaleout_benchmark(root, models=args.models, worker_counts=worker_counts, hidden_size=args.hidden_size, repeats=args.repeats)
    if args.json:
        print(json.dumps({**asdict(result), "speedups": result.speedups()}, indent=2))
    else:
        command = "python -m evomerge.scaleout_benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
        print(markdown_section(result, command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
