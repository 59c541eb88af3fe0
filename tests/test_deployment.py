"""The deployment path: a real Prefect server on 127.0.0.1, prefect.yaml, a worker, a run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from evomerge.config import save_config
from evomerge.defaults import create_tiny_config

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_health(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {url} did not become healthy within {timeout} s")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A persistent Prefect server bound to 127.0.0.1 with its own database."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_for_health(api_url, timeout=120)
        yield {**env, "PREFECT_API_URL": api_url}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _run(command: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed


def test_deployment_run_completes(prefect_server, tmp_path):
    env = {**prefect_server, "EVOMERGE_PROJECT_DIR": str(REPO_ROOT)}
    config = create_tiny_config(tmp_path / "tiny", generations=1, population_size=2)
    config_path = save_config(config, tmp_path / "tiny.yaml")

    _run(["bash", "deployments/setup.sh", "1"], env)
    _run([*PREFECT, "--no-prompt", "deploy", "--all"], env)

    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [*PREFECT, "worker", "start", "--pool", "evomerge", "--work-queue", "gpu"],
        env=env,
        cwd=REPO_ROOT,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
    )
    try:
        completed = _run(
            [
                *PREFECT,
                "deployment",
                "run",
                "evomerge/tournament",
                "--param",
                f"config={json.dumps(str(config_path))}",
                "--watch",
                "--watch-timeout",
                "400",
            ],
            env,
            timeout=450,
        )
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
        worker_log.close()

    output = completed.stdout + completed.stderr
    assert "Completed" in output, output + (tmp_path / "worker.log").read_text()
    ledger = config.storage.resolved_ledger_path()
    assert ledger.is_file()

    import duckdb

    with duckdb.connect(str(ledger), read_only=True) as connection:
        runs = connection.execute("select count(*) from runs").fetchone()[0]
    assert runs == 1
