"""Redraw the charts and report of a past run from the ledger alone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from evomerge.exceptions import LedgerError


def _run_config(ledger, run_id: str) -> dict:
    runs = ledger.runs()
    match = runs[runs["run_id"] == run_id]
    if match.empty:
        known = ", ".join(runs["run_id"].astype(str).tolist()[-5:]) or "none"
        raise LedgerError(f"run {run_id!r} not found in the ledger; recent runs: {known}")
    config = match.iloc[0]["config"]
    return json.loads(config) if isinstance(config, str) else dict(config)


def comparison_from_ledger(ledger, run_id: str, config: dict) -> pd.DataFrame:
    """Rebuild the best-versus-inputs score table of a run from stored evaluations."""
    from evomerge.checkpoint import CheckpointReader
    from evomerge.config import config_from_dict
    from evomerge.tournament import HELDOUT_TOP_K, input_key

    configuration = config_from_dict(config, source=f"run {run_id}")
    settings_hash = configuration.evaluation.canonical_hash()
    targets: dict[str, str] = {}
    for model in configuration.models:
        try:
            with CheckpointReader(model.path, model.revision) as reader:
                targets[input_key(reader.fingerprint())] = model.name
        except Exception:  # noqa: BLE001 - an input that moved away is left out of the table
            continue
    best = ledger.best(run_id, split="search", n=HELDOUT_TOP_K)
    for index, key in enumerate(best["key"] if len(best) else []):
        targets[key] = "best merge" if index == 0 else f"merge #{index + 1}"

    rows = []
    for split in ("search", "heldout"):
        for key, name in targets.items():
            evaluation = ledger.get_evaluation(key, settings_hash, split)
            if evaluation is None:
                continue
            rows.append({"name": name, "key": key, "split": split, "metric": "fitness", "value": None if evaluation["failed"] else evaluation["fitness"]})
            for metric, value in evaluation["metrics"].items():
                rows.append({"name": name, "key": key, "split": split, "metric": metric, "value": value})
    return pd.DataFrame(rows, columns=["name", "key", "split", "metric", "value"])


def redraw_run(run_id: str, *, state_dir: str | Path, ledger_path: str | Path | None = None, output_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the charts and HTML report of ``run_id`` into ``output_dir`` (default: the run's folder)."""
    from evomerge.ledger import Ledger
    from evomerge.report import write_report

    ledger_path = Path(ledger_path) if ledger_path else Path(state_dir) / "ledger.duckdb"
    if not ledger_path.is_file():
        raise LedgerError(f"ledger {str(ledger_path)!r} not found: pass the run's --config or run from its project folder")
    with Ledger(ledger_path, read_only=True) as ledger:
        config = _run_config(ledger, run_id)
        comparison = comparison_from_ledger(ledger, run_id, config)
        candidates = ledger.run_candidates(run_id)
        best = ledger.best(run_id, split="search", n=1)
        best_recipe: dict = {}
        if len(best):
            row = candidates[candidates["key"] == best.iloc[0]["key"]]
            if len(row) and "recipe" in row.columns:
                recipe = row.iloc[0]["recipe"]
                best_recipe = json.loads(recipe) if isinstance(recipe, str) else dict(recipe)
        generations = ledger.generations(run_id)
        destination = Path(output_dir) if output_dir else Path(state_dir) / "runs" / run_id
        return write_report(
            destination,
            run_id=run_id,
            generations=generations,
            candidates=candidates,
            lineage=ledger.lineage(run_id),
            comparison=comparison,
            best_recipe=best_recipe,
            mergekit_config={},
            settings=config,
            timings={"generation_seconds": round(float(generations["wall_seconds"].sum()), 1) if len(generations) else 0.0},
            heldout=comparison[comparison["split"] == "heldout"],
        )
