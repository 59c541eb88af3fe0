"""The generation loop in-process, without Prefect: results, failures, retention, export, redraw."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import pytest

from evomerge import run_evolutionary_tournament
from evomerge.config import ModelReference, StorageSettings
from evomerge.defaults import create_tiny_config
from evomerge.device_pool import lease_device
from evomerge.testing import make_tiny_llama
from evomerge.tournament import ThreadExecutor, run_tournament


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tournament")


def _config(root: Path, state: str, **kwargs):
    config = create_tiny_config(root, **kwargs)
    return config.model_copy(update={"storage": StorageSettings(state_dir=str(root / state))})


def test_library_entry_returns_best_path(tiny_root):
    config = _config(tiny_root, "entry")
    best = run_evolutionary_tournament(config, use_prefect=False)

    assert best is not None
    assert (best / "config.json").is_file()
    assert (best / "manifest.json").is_file()
    ledger = config.storage.resolved_ledger_path()
    with duckdb.connect(str(ledger), read_only=True) as connection:
        finished = connection.execute("select status, best_key from runs").fetchall()
    assert len(finished) == 1
    assert finished[0][0] == "completed"
    assert finished[0][1] == best.name


def test_same_seed_same_best(tiny_root):
    first = run_tournament(_config(tiny_root, "seed-a"), run_id="a")
    second = run_tournament(_config(tiny_root, "seed-b"), run_id="b")
    assert first.best_key == second.best_key
    assert first.best_fitness == second.best_fitness


def test_incompatible_input_fails_candidates_not_run(tiny_root):
    config = _config(tiny_root, "broken", generations=2, population_size=6)
    odd = make_tiny_llama(tiny_root / "odd-shape", seed=9, hidden_size=48)
    models = [*config.models, ModelReference(name="odd", path=str(odd))]
    config = config.model_copy(update={"models": models})

    result = run_tournament(config, ThreadExecutor(2), run_id="broken")

    with duckdb.connect(str(config.storage.resolved_ledger_path()), read_only=True) as connection:
        statuses = dict(connection.execute("select status, count(*) from candidates group by status").fetchall())
        errors = [row[0] for row in connection.execute("select error from candidates where status = 'failed'").fetchall()]
    assert statuses.get("failed", 0) >= 1
    assert statuses.get("built", 0) >= 1
    assert all(error for error in errors)
    assert result.best_key is not None


def test_retention_keeps_top_and_ancestors(tiny_root):
    config = _config(tiny_root, "retain", generations=2, population_size=4)
    config.storage.keep_top_k = 1
    result = run_tournament(config, run_id="retain")

    checkpoints = Path(config.storage.resolved_store_url()) / "checkpoints"
    kept = {path.parent.name for path in checkpoints.glob("*/manifest.json")}
    from evomerge.recipe import Recipe

    ancestors = set(Recipe.model_validate(result.best_recipe).parent_keys())
    assert result.best_key in kept
    assert ancestors <= kept
    assert kept == {result.best_key} | ancestors


def test_ledger_exported_as_parquet(tiny_root):
    config = _config(tiny_root, "export", generations=1, population_size=2)
    config.storage.export_ledger = True
    run_tournament(config, run_id="export")

    exported = Path(config.storage.resolved_store_url()) / "ledger"
    with duckdb.connect() as connection:
        runs = connection.execute(f"select count(*) from '{exported / 'runs.parquet'}'").fetchone()[0]
        evaluations = connection.execute(f"select count(*) from '{exported / 'evaluations.parquet'}'").fetchone()[0]
    assert runs == 1
    assert evaluations >= 3


def test_report_redrawn_from_ledger(tiny_root, tmp_path):
    from evomerge.cli import main

    config = _config(tiny_root, "redraw", generations=2, population_size=4)
    run_tournament(config, run_id="redraw-me")
    from evomerge.config import save_config

    config_path = save_config(config, tmp_path / "redraw.yaml")
    output = tmp_path / "again"

    code = main(["--report", "redraw-me", "--config", str(config_path), "--output-dir", str(output), "--log-file", str(tmp_path / "log")])

    assert code == 0
    assert (output / "fitness_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "benchmark_report.html").is_file()
    assert "redraw-me" in (output / "benchmark_report.html").read_text()


def test_report_unknown_run_id(tiny_root, tmp_path, capsys):
    from evomerge.cli import EXIT_FAILED, main
    from evomerge.config import save_config

    config = _config(tiny_root, "redraw", generations=2, population_size=4)
    config_path = save_config(config, tmp_path / "redraw.yaml")
    code = main(["--report", "no-such-run", "--config", str(config_path), "--log-file", str(tmp_path / "log")])
    assert code == EXIT_FAILED
    assert "no-such-run" in capsys.readouterr().err


def test_device_leases_distinct_gpus(monkeypatch):
    monkeypatch.setenv("EVOMERGE_FAKE_CUDA_DEVICES", "2")
    barrier = threading.Barrier(2)
    leased: list[str] = []

    def hold():
        with lease_device(None) as device:
            leased.append(device)
            barrier.wait(timeout=10)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(leased) == ["cuda:0", "cuda:1"]


def test_device_lease_without_cuda(monkeypatch):
    monkeypatch.setenv("EVOMERGE_FAKE_CUDA_DEVICES", "0")
    with lease_device(None) as device:
        assert device == "cpu"
    with lease_device("cuda:3") as device:
        assert device == "cuda:3"


def test_best_merge_config_reproduces_best(tiny_root, tmp_path):
    from safetensors.torch import load_file

    from evomerge.merge.engine import merge_from_config

    config = _config(tiny_root, "reproduce", generations=1, population_size=3)
    result = run_tournament(config, run_id="reproduce")
    config_path = result.files["best_merge_config"]

    rebuilt = merge_from_config(config_path, tmp_path / "rebuilt")

    original = load_file(result.best_path / "model.safetensors")
    again = load_file(rebuilt / "model.safetensors")
    assert original.keys() == again.keys()
    for name in original:
        assert (original[name] - again[name]).abs().max().item() == 0.0, name


def test_use_cli_downloads_hub_models(tmp_path, monkeypatch, tiny_family):
    from evomerge.cli import download_with_hf_cli

    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "hf"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    config = create_tiny_config(tmp_path / "tiny")
    models = [config.models[0], ModelReference(name="hub", path="HuggingFaceTB/SmolLM2-135M", revision="main")]
    config = config.model_copy(update={"models": models})

    download_with_hf_cli(config)

    assert calls.read_text().splitlines() == ["download HuggingFaceTB/SmolLM2-135M --revision main"]


def test_ledger_config_hides_store_secrets(tiny_root):
    import json as json_module

    config = _config(tiny_root, "secrets", generations=1, population_size=2)
    config.storage.storage_options = {"key": "AKIA-EXAMPLE", "secret": "hunter2", "client_kwargs": {"region_name": "x"}}
    store_root = Path(config.storage.state_dir) / "store"
    config.storage.store_url = str(store_root)
    run_tournament(config, run_id="secrets")

    with duckdb.connect(str(config.storage.resolved_ledger_path()), read_only=True) as connection:
        stored = connection.execute("select config from runs").fetchone()[0]
    options = json_module.loads(stored)["storage"]["storage_options"]
    assert options["key"] == "***"
    assert options["secret"] == "***"
    assert "hunter2" not in stored


def test_missing_text_file_rejected_before_work(tiny_root):
    from evomerge.exceptions import EvoMergeException

    config = _config(tiny_root, "missing-text", generations=1, population_size=2)
    config.evaluation.search_texts = [str(tiny_root / "absent.jsonl")]
    with pytest.raises(EvoMergeException, match="absent.jsonl"):
        run_tournament(config, run_id="missing-text")
    assert not config.storage.resolved_ledger_path().exists()
