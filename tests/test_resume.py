"""Killing the flow process mid-run and running it again finishes the run without redoing work."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from evomerge.config import StorageSettings, save_config
from evomerge.defaults import create_tiny_config

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _flow_command(config_path: Path, run_id: str) -> list[str]:
    return [sys.executable, "flows/tournament.py", "--config", str(config_path), "--run-id", run_id]


def _run_to_completion(config_path: Path, run_id: str) -> str:
    completed = subprocess.run(
        _flow_command(config_path, run_id), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout + completed.stderr


def _best_key(output: str) -> str:
    match = re.search(r"key (\w+), search fitness", output)
    assert match, output
    return match.group(1)


def test_killed_run_resumes_without_rework(tmp_path):
    config = create_tiny_config(tmp_path / "tiny", generations=3, population_size=4, seed=11)
    interrupted = config.model_copy(update={"storage": StorageSettings(state_dir=str(tmp_path / "interrupted"))})
    reference = config.model_copy(update={"storage": StorageSettings(state_dir=str(tmp_path / "reference"))})
    interrupted_path = save_config(interrupted, tmp_path / "interrupted.yaml")
    reference_path = save_config(reference, tmp_path / "reference.yaml")

    expected_best = _best_key(_run_to_completion(reference_path, "reference"))

    # Start the run, and kill it once some candidates of the first generations exist.
    checkpoints = tmp_path / "interrupted" / "store" / "checkpoints"
    process = subprocess.Popen(
        _flow_command(interrupted_path, "resume-me"),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(checkpoints.glob("*/manifest.json"))) < 5:
        assert process.poll() is None, "the flow ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    built_before = {path.parent.name for path in checkpoints.glob("*/manifest.json")}
    assert len(built_before) >= 5
    with duckdb.connect(str(tmp_path / "interrupted" / "ledger.duckdb"), read_only=True) as connection:
        scored_before = {row[0] for row in connection.execute("select key from evaluations").fetchall()}

    output = _run_to_completion(interrupted_path, "resume-me")

    rebuilt = [key for key in built_before if f"candidate {key}: built" in output]
    assert rebuilt == []
    rescored = [key for key in scored_before if re.search(rf"candidate {key}: \w+ fitness", output)]
    assert rescored == []
    assert _best_key(output) == expected_best
