"""The tournament as a Prefect flow on tiny models, under a real (ephemeral) Prefect API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest

from evomerge.config import save_config
from evomerge.defaults import create_tiny_config


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return create_tiny_config(tmp_path_factory.mktemp("flow"), generations=2, population_size=4)


def _ledger_counts(path: Path) -> dict[str, int]:
    with duckdb.connect(str(path), read_only=True) as connection:
        return {
            table: connection.execute(f"select count(*) from {table}").fetchone()[0]
            for table in ("runs", "candidates", "evaluations", "generations")
        }


def _manifests(store_root: Path) -> dict[str, float]:
    return {path.parent.name: path.stat().st_mtime for path in (store_root / "checkpoints").glob("*/manifest.json")}


async def _artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        artifacts = await client.read_artifacts()
    return {artifact.key for artifact in artifacts if artifact.key}


def test_flow_first_run_records_everything(prefect_harness, tiny_config):
    import asyncio

    from flows.tournament import run_flow

    summary = run_flow(tiny_config, run_id="flow-first")

    assert summary["best_key"] is not None
    assert Path(summary["best_path"]).is_dir()
    assert (Path(summary["best_path"]) / "config.json").is_file()

    counts = _ledger_counts(tiny_config.storage.resolved_ledger_path())
    assert counts["runs"] == 1
    assert counts["generations"] == 2
    assert counts["candidates"] >= 4

    store_root = Path(tiny_config.storage.resolved_store_url())
    manifests = _manifests(store_root)
    assert summary["best_key"] in manifests
    manifest = json.loads((store_root / "checkpoints" / summary["best_key"] / "manifest.json").read_text())
    assert manifest["key"] == summary["best_key"]

    assert Path(summary["files"]["fitness_plot"]).is_file()
    keys = asyncio.run(_artifact_keys())
    assert "evomerge-fitness-flow-first" in keys
    assert "evomerge-progress-flow-first" in keys
    assert "evomerge-result-flow-first" in keys


def test_flow_second_run_fully_cached(prefect_harness, tiny_config, caplog):
    from flows.tournament import run_flow

    store_root = Path(tiny_config.storage.resolved_store_url())
    before_manifests = _manifests(store_root)
    before = _ledger_counts(tiny_config.storage.resolved_ledger_path())

    caplog.set_level("INFO", logger="evomerge")
    summary = run_flow(tiny_config, run_id="flow-second")

    after = _ledger_counts(tiny_config.storage.resolved_ledger_path())
    assert _manifests(store_root) == before_manifests
    assert after["evaluations"] == before["evaluations"]
    assert after["candidates"] == before["candidates"]
    assert after["runs"] == before["runs"] + 1
    messages = [record.getMessage() for record in caplog.records]
    assert any("run flow-second started" in message for message in messages)
    assert [message for message in messages if ": built " in message] == []
    assert summary["best_key"] is not None


def test_flow_rebuilds_vanished_checkpoint(prefect_harness, tiny_config, caplog):
    from flows.tournament import run_flow

    store_root = Path(tiny_config.storage.resolved_store_url())
    victim = sorted(_manifests(store_root))[0]
    shutil.rmtree(store_root / "checkpoints" / victim)

    caplog.set_level("INFO", logger="evomerge")
    run_flow(tiny_config, run_id="flow-third")

    assert any("run flow-third started" in record.getMessage() for record in caplog.records)
    assert (store_root / "checkpoints" / victim / "manifest.json").is_file()
    rebuilt = [record for record in caplog.records if f"candidate {victim}: built" in record.getMessage()]
    assert len(rebuilt) == 1


def test_flow_rejects_bad_config_path(prefect_harness, tmp_path):
    from evomerge.exceptions import ConfigError
    from flows.tournament import run_flow

    with pytest.raises(ConfigError, match="not found"):
        run_flow(str(tmp_path / "missing.yaml"))


def test_config_yaml_accepted_by_flow(prefect_harness, tiny_config, tmp_path):
    from flows.tournament import resolve_config

    path = save_config(tiny_config, tmp_path / "tiny.yaml")
    assert resolve_config(str(path)) == tiny_config


def test_overrides_merge_into_config(tiny_config):
    from evomerge.exceptions import ConfigError
    from flows.tournament import apply_overrides

    changed = apply_overrides(tiny_config, {"evolution": {"generations": 7}, "runner": {"max_workers": 1}})
    assert changed.evolution.generations == 7
    assert changed.runner.max_workers == 1
    assert changed.evolution.population_size == tiny_config.evolution.population_size
    with pytest.raises(ConfigError, match="generatons"):
        apply_overrides(tiny_config, {"evolution": {"generatons": 7}})
