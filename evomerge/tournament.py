"""The generation loop of a tournament, independent of any orchestrator.

``run_tournament`` owns the loop: the strategy proposes recipes, the executor
builds and scores them, the ledger records everything, and the executor
publishes each generation. The Prefect flow passes an executor that maps
Prefect tasks; tests and library users can pass ``ThreadExecutor``.

A run with an existing run id replays the loop from the first generation.
The strategies are deterministic given their observations. Every built
checkpoint is found in the store by its key and every score in the ledger.
So a resumed run rebuilds and rescores nothing that finished, and it ends
with the same best candidate as an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import math
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from evomerge.config import Configuration, config_hash
from evomerge.jobs import BuildJob, BuildResult, EvaluationJob, build_candidate, evaluate_candidate, open_store
from evomerge.progress import show_progress

logger = logging.getLogger(__name__)

HELDOUT_TOP_K = 3


@dataclass
class GenerationReport:
    """The candidates and scores of one finished generation, for artifacts and progress."""

    run_id: str
    generation: int
    total_generations: int
    rows: list[dict[str, Any]]
    best_key: str | None
    best_fitness: float | None
    wall_seconds: float
    generations: Any  # pandas DataFrame from Ledger.generations
    candidates: Any  # pandas DataFrame from Ledger.run_candidates


@dataclass
class TournamentResult:
    """The outcome of a whole tournament."""

    run_id: str
    best_key: str | None
    best_path: Path | None
    best_fitness: float | None
    best_recipe: dict[str, Any] | None
    comparison: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    generations_run: int = 0
    wall_seconds: float = 0.0
    pareto_keys: list[str] = field(default_factory=list)


class Executor(Protocol):
    """Runs the units of work of a generation; the Prefect flow supplies one backed by tasks."""

    def build(self, jobs: list[BuildJob]) -> list[BuildResult]: ...

    def evaluate(self, jobs: list[EvaluationJob]) -> list[Any]: ...

    def publish_generation(self, report: GenerationReport) -> None: ...

    def publish_final(self, result: TournamentResult, markdown: str) -> None: ...


class ThreadExecutor:
    """Run jobs in a bounded thread pool in this process, without Prefect."""

    def __init__(self, max_workers: int = 1):
        self.max_workers = max_workers

    def _map(self, function, jobs, description: str):
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            futures = [pool.submit(function, job) for job in jobs]
            for _ in show_progress(concurrent.futures.as_completed(futures), len(futures), description):
                pass
            return [future.result() for future in futures]

    def build(self, jobs: list[BuildJob]) -> list[BuildResult]:
        return self._map(build_candidate, jobs, "merges")

    def evaluate(self, jobs: list[EvaluationJob]) -> list[Any]:
        return self._map(evaluate_candidate, jobs, "evaluations")

    def publish_generation(self, report: GenerationReport) -> None:
        logger.info(
            "run %s generation %d/%d: best %s fitness %s",
            report.run_id,
            report.generation + 1,
            report.total_generations,
            report.best_key,
            report.best_fitness,
        )

    def publish_final(self, result: TournamentResult, markdown: str) -> None:
        logger.info("run %s finished: best %s at %s", result.run_id, result.best_key, result.best_path)


SECRET_OPTION_WORDS = ("key", "secret", "token", "password", "credential")


def redacted_config(config: Configuration) -> dict[str, Any]:
    """Return the configuration as JSON data with secret-looking storage options replaced by ``***``."""
    data = config.model_dump(mode="json")
    options = data["storage"]["storage_options"]
    for name in list(options):
        if any(word in name.lower() for word in SECRET_OPTION_WORDS):
            options[name] = "***"
    return data


def new_run_id() -> str:
    """Return a sortable run id such as ``20261204-201500-1a2b3c``."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def input_key(fingerprint: str) -> str:
    """Return the ledger key under which an input model's scores are stored."""
    return f"input-{fingerprint[:20]}"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class _Tournament:
    """One tournament run; split into steps so each stays short."""

    def __init__(self, config: Configuration, executor: Executor, run_id: str | None):
        from evomerge.ledger import Ledger

        self.config = config
        self.executor = executor
        self.run_id = run_id or config.run_id or new_run_id()
        self.settings_hash = config.evaluation.canonical_hash()
        self.store = open_store(config.storage)
        state_dir = Path(config.storage.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(config.storage.resolved_ledger_path())
        self.output_dir = Path(config.output_dir) if config.output_dir else state_dir / "runs" / self.run_id
        self.model_paths: dict[str, str] = {}
        self.fingerprints: dict[str, str] = {}
        self.recipes: dict[str, dict[str, Any]] = {}
        self.history: list[Any] = []

    # -- set-up -------------------------------------------------------------

    def inspect_models(self):
        """Resolve every input model and read its fingerprint and layer count from the headers."""
        from evomerge.checkpoint import CheckpointReader
        from evomerge.evolution import ModelInfo

        model_info = {}
        for model in self.config.models:
            with CheckpointReader(model.path, model.revision, allow_pickle=self.config.merge.allow_pickle) as reader:
                fingerprint = reader.fingerprint()
                num_layers = int(reader.config.get("num_hidden_layers", 0))
                self.model_paths[f"model:{model.name}"] = str(reader.path)
            self.fingerprints[f"model:{model.name}"] = fingerprint
            model_info[model.name] = ModelInfo(num_layers=num_layers, fingerprint=fingerprint)
            logger.info("input model %s: %s (%d layers, fingerprint %s)", model.name, self.model_paths[f"model:{model.name}"], num_layers, fingerprint[:12])
        return model_info

    # -- one generation -------------------------------------------------------

    def key_recipes(self, recipes, model_info):
        """Give each recipe its content key, or a validation error."""
        from evomerge.recipe import candidate_key, validate_recipe

        keyed = []
        for recipe in recipes:
            fingerprints = dict(self.fingerprints)
            for parent in recipe.parent_keys():
                fingerprints[f"candidate:{parent}"] = parent
            key = candidate_key(recipe, fingerprints)
            try:
                validate_recipe(recipe, model_info)
                error = None
            except Exception as exc:  # noqa: BLE001 - recorded as a failed candidate, the run goes on
                error = str(exc)
            keyed.append((recipe, key, error))
        return keyed

    def build_generation(self, generation: int, keyed) -> dict[str, BuildResult]:
        results: dict[str, BuildResult] = {}
        jobs = []
        for recipe, key, error in keyed:
            recipe_json = recipe.model_dump(mode="json")
            self.recipes[key] = recipe_json
            if error is not None:
                results[key] = BuildResult(key=key, failed=True, error=f"invalid recipe: {error}")
            elif key not in results and not any(job.key == key for job in jobs):
                jobs.append(
                    BuildJob(
                        key=key,
                        recipe=recipe_json,
                        model_paths=self.model_paths,
                        storage=self.config.storage,
                        max_shard_bytes=self.config.merge.max_shard_bytes,
                        allow_pickle=self.config.merge.allow_pickle,
                        out_dtype=self.config.merge.dtype,
                    )
                )
        for result in self.executor.build(jobs):
            results[result.key] = result

        for recipe, key, _ in keyed:
            result = results[key]
            self.ledger.record_candidate(
                self.run_id,
                generation,
                key,
                self.recipes[key],
                recipe.parent_keys(),
                status="failed" if result.failed else "built",
                error=result.error,
                checkpoint_uri=result.ref.uri if result.ref else None,
                build_seconds=result.seconds,
            )
        return results

    def evaluate_keys(self, refs: dict[str, Any], split: str) -> dict[str, Any]:
        """Score the given candidates on ``split``, reusing every score the ledger already has."""
        from evomerge.evaluation import Scores

        scores: dict[str, Any] = {}
        jobs = []
        for key, ref in refs.items():
            cached = self.ledger.get_evaluation(key, self.settings_hash, split)
            if cached is not None:
                scores[key] = Scores(
                    metrics=cached["metrics"],
                    fitness=cached["fitness"],
                    split=split,
                    settings_hash=self.settings_hash,
                    failed=cached["failed"],
                    error=cached.get("error"),
                    wall_seconds=cached.get("wall_seconds") or 0.0,
                    device=cached.get("device") or "",
                )
                continue
            is_input = isinstance(ref, str)
            jobs.append(
                EvaluationJob(
                    key=key,
                    ref=None if is_input else ref,
                    model_path=ref if is_input else None,
                    settings=self.config.evaluation,
                    settings_hash=self.settings_hash,
                    split=split,
                    storage=self.config.storage,
                    device=None if self.config.evaluation.device == "auto" else self.config.evaluation.device,
                )
            )
        for job, result in zip(jobs, self.executor.evaluate(jobs)):
            self.ledger.record_evaluation(
                job.key,
                self.settings_hash,
                split,
                result.metrics,
                result.fitness,
                result.failed,
                result.error,
                result.wall_seconds,
                result.device,
                tokens=result.tokens,
            )
            scores[job.key] = result
        return scores

    def run_generation(self, strategy, model_info, total_generations: int):
        from evomerge.evaluation import WORST_FITNESS
        from evomerge.evolution import Observation

        started = time.perf_counter()
        generation = strategy.generation
        recipes = strategy.propose()
        keyed = self.key_recipes(recipes, model_info)
        builds = self.build_generation(generation, keyed)
        built = {key: result.ref for key, result in builds.items() if not result.failed}
        scores = self.evaluate_keys(built, "search")

        observations, rows = [], []
        for recipe, key, _ in keyed:
            build = builds[key]
            score = scores.get(key)
            failed = build.failed or score is None or score.failed
            if build.failed:
                error = build.error
            elif score is None:
                error = "no score was returned"
            else:
                error = score.error
            fitness = WORST_FITNESS if failed else score.fitness
            metrics = dict(score.metrics) if score is not None else {}
            observations.append(Observation(recipe=recipe, key=key, fitness=fitness, metrics=metrics, failed=failed, error=error))
            rows.append({"key": key, "method": recipe.method, "fitness": None if failed else fitness, "failed": failed, "error": error, **metrics})
            if failed:
                logger.warning("run %s generation %d: candidate %s failed: %s", self.run_id, generation, key, error)
        strategy.observe(observations)
        self.history.extend(observations)

        valid = [row["fitness"] for row in rows if _finite(row["fitness"])]
        best = max((row for row in rows if _finite(row["fitness"])), key=lambda row: row["fitness"], default=None)
        wall_seconds = time.perf_counter() - started
        spread = statistics.pstdev(valid) if len(valid) > 1 else 0.0
        self.ledger.record_generation(
            self.run_id,
            generation,
            best_key=best["key"] if best else None,
            best_fitness=best["fitness"] if best else None,
            mean_fitness=statistics.fmean(valid) if valid else None,
            std_fitness=spread if valid else None,
            candidates=len(rows),
            failed=sum(1 for row in rows if row["failed"]),
            wall_seconds=wall_seconds,
            strategy_state=strategy.state_dict(),
        )
        overall_best = strategy.best()
        self.executor.publish_generation(
            GenerationReport(
                run_id=self.run_id,
                generation=generation,
                total_generations=total_generations,
                rows=rows,
                best_key=overall_best.key if overall_best else None,
                best_fitness=overall_best.fitness if overall_best else None,
                wall_seconds=wall_seconds,
                generations=self.ledger.generations(self.run_id),
                candidates=self.ledger.run_candidates(self.run_id),
            )
        )

    # -- the end of a run ----------------------------------------------------

    def compare_on_heldout(self, strategy) -> list[dict[str, Any]]:
        """Score the best candidates and every input model on both splits."""
        ranked = sorted(
            (obs for obs in self.history if not obs.failed),
            key=lambda obs: obs.fitness,
            reverse=True,
        )
        top: dict[str, Any] = {}
        for obs in ranked:
            if obs.key not in top:
                top[obs.key] = self.store.get(obs.key)
            if len(top) >= HELDOUT_TOP_K:
                break
        inputs = {input_key(self.fingerprints[f"model:{m.name}"]): self.model_paths[f"model:{m.name}"] for m in self.config.models}
        names = {input_key(self.fingerprints[f"model:{m.name}"]): m.name for m in self.config.models}
        for index, key in enumerate(top):
            names[key] = "best merge" if index == 0 else f"merge #{index + 1}"

        splits = ["search"]
        evaluation = self.config.evaluation
        if evaluation.heldout_texts or evaluation.heldout_task_files:
            splits.append("heldout")
        targets = {**inputs, **{key: ref for key, ref in top.items() if ref is not None}}
        comparison = []
        for split in splits:
            scores = self.evaluate_keys(targets, split)
            for key, score in scores.items():
                comparison.append({"name": names[key], "key": key, "split": split, "metric": "fitness", "value": None if score.failed else score.fitness})
                for metric, value in score.metrics.items():
                    comparison.append({"name": names[key], "key": key, "split": split, "metric": metric, "value": value})
        return comparison

    def finish(self, strategy, started: float) -> TournamentResult:
        from evomerge import run_report as report_module

        best = strategy.best()
        comparison = self.compare_on_heldout(strategy)
        result = TournamentResult(
            run_id=self.run_id,
            best_key=best.key if best else None,
            best_path=self.store.local_path(best.key) if best else None,
            best_fitness=best.fitness if best else None,
            best_recipe=self.recipes.get(best.key) if best else None,
            comparison=comparison,
            output_dir=self.output_dir,
            generations_run=strategy.generation,
            pareto_keys=[obs.key for obs in strategy.pareto_front()],
        )
        result.wall_seconds = time.perf_counter() - started
        result.files = report_module.write_run_report(self, result)
        if self.config.storage.keep_top_k:
            self.apply_retention()
        if self.config.storage.export_ledger:
            destination = self.config.storage.resolved_store_url().rstrip("/") + "/ledger"
            written = self.ledger.export_parquet(destination, storage_options=self.config.storage.storage_options)
            logger.info("run %s: ledger exported to %d Parquet files under %s", self.run_id, len(written), destination)
        self.ledger.finish_run(self.run_id, "completed", result.best_key)
        self.executor.publish_final(result, report_module.final_summary_markdown(self, result))
        return result

    def apply_retention(self) -> None:
        """Delete every checkpoint of this run except the top k and their ancestors."""
        ranked = self.ledger.best(self.run_id, split="search", n=self.config.storage.keep_top_k)
        keep = set(ranked["key"]) if len(ranked) else set()
        frontier = list(keep)
        while frontier:
            recipe = self.recipes.get(frontier.pop())
            if recipe is None:
                continue
            from evomerge.recipe import Recipe

            for parent in Recipe.model_validate(recipe).parent_keys():
                if parent not in keep:
                    keep.add(parent)
                    frontier.append(parent)
        run_keys = set(self.ledger.run_candidates(self.run_id)["key"])
        for key in sorted(run_keys - keep):
            if self.store.exists(key):
                self.store.delete(key)
        logger.info("run %s: retention kept %d checkpoints", self.run_id, len(keep))


def run_tournament(config: Configuration, executor: Executor | None = None, *, run_id: str | None = None) -> TournamentResult:
    """Run a whole tournament with ``executor`` (a plain thread pool by default)."""
    from evomerge.evolution import make_strategy

    from evomerge.evaluation import check_settings

    # Missing text or task files fail every candidate alike: report them before any work.
    check_settings(config.evaluation, "search")
    if config.evaluation.heldout_texts or config.evaluation.heldout_task_files:
        check_settings(config.evaluation, "heldout")

    started = time.perf_counter()
    executor = executor or ThreadExecutor(config.runner.max_workers)
    tournament = _Tournament(config, executor, run_id)
    try:
        model_info = tournament.inspect_models()
        new_run = tournament.ledger.start_run(
            tournament.run_id,
            redacted_config(config),
            strategy=config.evolution.strategy,
            seed=config.evolution.seed,
        )
        logger.info(
            "run %s %s (config %s, strategy %s, seed %d)",
            tournament.run_id,
            "started" if new_run else "resumed",
            config_hash(config),
            config.evolution.strategy,
            config.evolution.seed,
        )
        # Baseline scores of the inputs come first so every generation's chart can show them.
        inputs = {input_key(tournament.fingerprints[f"model:{m.name}"]): tournament.model_paths[f"model:{m.name}"] for m in config.models}
        tournament.evaluate_keys(inputs, "search")

        strategy = make_strategy(config, model_info)
        total = config.evolution.generations
        while not strategy.finished():
            tournament.run_generation(strategy, model_info, total)
        return tournament.finish(strategy, started)
    finally:
        tournament.ledger.close()
