"""Charts, report page and summary markdown at the end of a tournament run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

if TYPE_CHECKING:
    from evomerge.tournament import TournamentResult, _Tournament

logger = logging.getLogger(__name__)


def mergekit_config_for(tournament: "_Tournament", recipe: dict[str, Any] | None) -> dict[str, Any]:
    """Return the best recipe as a mergekit config with input references replaced by paths."""
    if recipe is None:
        return {}
    from evomerge.merge.spec import spec_to_mergekit
    from evomerge.recipe import Recipe, recipe_to_spec

    def resolve(reference: str) -> str:
        if reference.startswith("candidate:"):
            return str(tournament.store.local_path(reference.split(":", 1)[1]))
        return tournament.model_paths[reference]

    return spec_to_mergekit(recipe_to_spec(Recipe.model_validate(recipe), resolve))


def write_run_report(tournament: "_Tournament", result: "TournamentResult") -> dict[str, Path]:
    """Write the PNG charts and the HTML report of a finished run into its output folder."""
    from evomerge.report import write_report

    ledger = tournament.ledger
    comparison = pd.DataFrame(result.comparison, columns=["name", "key", "split", "metric", "value"])
    heldout = comparison[comparison["split"] == "heldout"] if len(comparison) else comparison
    timings = {
        "wall_seconds": round(result.wall_seconds, 1),
        "generations": result.generations_run,
    }
    generations = ledger.generations(result.run_id)
    if len(generations):
        timings["generation_seconds"] = round(float(generations["wall_seconds"].sum()), 1)
    mergekit_config = mergekit_config_for(tournament, result.best_recipe)
    files = write_report(
        result.output_dir,
        run_id=result.run_id,
        generations=generations,
        candidates=ledger.run_candidates(result.run_id),
        lineage=ledger.lineage(result.run_id),
        comparison=comparison,
        best_recipe=result.best_recipe or {},
        mergekit_config=mergekit_config,
        settings=tournament.config.model_dump(mode="json"),
        timings=timings,
        heldout=heldout,
    )
    if mergekit_config:
        # The best recipe as a config that `python -m evomerge.cli --merge` and mergekit's own CLI read.
        path = Path(result.output_dir) / "best_merge.yaml"
        path.write_text(yaml.safe_dump(mergekit_config, sort_keys=False), encoding="utf-8")
        files["best_merge_config"] = path
    return files


def final_summary_markdown(tournament: "_Tournament", result: "TournamentResult") -> str:
    """Return the markdown of the run's final artifact: best recipe, lineage and held-out scores."""
    from evomerge.charts import final_markdown

    comparison = pd.DataFrame(result.comparison, columns=["name", "key", "split", "metric", "value"])
    heldout = comparison[comparison["split"] == "heldout"] if len(comparison) else comparison
    lineage_keys: list[str] = []
    frontier = [result.best_key] if result.best_key else []
    while frontier:
        key = frontier.pop()
        lineage_keys.append(key)
        recipe = tournament.recipes.get(key)
        if recipe:
            from evomerge.recipe import Recipe

            frontier.extend(parent for parent in Recipe.model_validate(recipe).parent_keys() if parent not in lineage_keys)
    lineage_keys.reverse()  # oldest ancestor first, the best candidate last
    best = {
        "key": result.best_key,
        "path": str(result.best_path) if result.best_path else None,
        "fitness": result.best_fitness,
        "recipe": result.best_recipe,
    }
    return final_markdown(result.run_id, best, lineage_keys, heldout)
