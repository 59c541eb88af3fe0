"""Measure what Prefect adds to a tournament, and what a fully cached re-run costs.

Three runs of one tournament on small random Llama models, each in a fresh
project state folder except the last:

1. the generation loop with the plain thread executor (no Prefect),
2. the same tournament as the ``evomerge`` Prefect flow,
3. the flow again with the same configuration and a new run id, so every
   merge and evaluation is found in the store, the task cache and the ledger.

Prefect's share is (2 - 1) / 2, and the cached ratio is 3 / 2. A trivial flow
runs first, so the one-off start of Prefect's temporary API server is timed
on its own and left out of both.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from evomerge.config import Configuration, StorageSettings


def benchmark_config(root: Path, *, hidden_size: int, num_layers: int, generations: int, population_size: int) -> Configuration:
    """Return a tournament over a base and two noisy fine-tunes of the given size."""
    from evomerge.defaults import create_tiny_config
    from evomerge.testing import make_tiny_family

    config = create_tiny_config(root / "tiny", generations=generations, population_size=population_size, seed=3)
    paths = make_tiny_family(root / "models", count=2, hidden_size=hidden_size, num_layers=num_layers)
    data = config.model_dump(mode="json")
    for model, path in zip(data["models"], paths):
        model["path"] = str(path)
    data["evaluation"]["max_length"] = 64
    data["evaluation"]["stride"] = 32
    return Configuration.model_validate(data)


def measure_orchestration(
    *, hidden_size: int = 256, num_layers: int = 8, generations: int = 3, population_size: int = 6
) -> dict[str, Any]:
    """Run the three tournaments and return their wall times and the two ratios."""
    from evomerge.tournament import ThreadExecutor, run_tournament
    from flows.tournament import run_flow

    from prefect import flow

    @flow(name="evomerge-warm-up")
    def warm_up() -> None:
        """Do nothing: the first flow run of a process starts Prefect's temporary API server."""

    started = time.perf_counter()
    warm_up()
    startup_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="evomerge-orchestration-") as scratch:
        root = Path(scratch)
        config = benchmark_config(
            root, hidden_size=hidden_size, num_layers=num_layers, generations=generations, population_size=population_size
        )

        plain_config = config.model_copy(update={"storage": StorageSettings(state_dir=str(root / "plain"))})
        started = time.perf_counter()
        plain = run_tournament(plain_config, ThreadExecutor(config.runner.max_workers), run_id="plain")
        plain_seconds = time.perf_counter() - started

        flow_config = config.model_copy(update={"storage": StorageSettings(state_dir=str(root / "flow"))})
        started = time.perf_counter()
        first = run_flow(flow_config, run_id="first")
        flow_seconds = time.perf_counter() - started

        started = time.perf_counter()
        cached = run_flow(flow_config, run_id="cached")
        cached_seconds = time.perf_counter() - started

    return {
        "model": f"Llama, hidden {hidden_size}, {num_layers} layers, 3 inputs",
        "tournament": f"{generations} generations x {population_size} candidates",
        "startup_seconds": startup_seconds,
        "plain_seconds": plain_seconds,
        "flow_seconds": flow_seconds,
        "cached_seconds": cached_seconds,
        "prefect_share": (flow_seconds - plain_seconds) / flow_seconds,
        "cached_ratio": cached_seconds / flow_seconds,
        "same_best": plain.best_key == first["best_key"] == cached["best_key"],
    }


def format_orchestration(result: dict[str, Any]) -> str:
    """Return the measurement as a markdown table."""
    rows = [
        ("tournament without Prefect (thread executor)", f"{result['plain_seconds']:.1f} s", "1.00 (baseline)"),
        ("tournament as the Prefect flow, first run", f"{result['flow_seconds']:.1f} s", f"{result['flow_seconds'] / result['plain_seconds']:.2f}"),
        ("the flow again, fully cached", f"{result['cached_seconds']:.1f} s", f"{result['cached_seconds'] / result['plain_seconds']:.2f}"),
    ]
    lines = [
        f"Models: {result['model']}; {result['tournament']}.",
        "",
        "| run | wall time | ratio to the plain loop |",
        "| --- | --- | --- |",
        *[f"| {name} | {seconds} | {ratio} |" for name, seconds, ratio in rows],
        "",
        f"Prefect's share of the first flow run: {100 * result['prefect_share']:.0f}%.",
        f"Starting Prefect's temporary API server, once per process before these runs: {result['startup_seconds']:.1f} s.",
        f"Cached re-run / first flow run: {100 * result['cached_ratio']:.0f}% (target: under 10%).",
        f"Same best candidate in all three runs: {result['same_best']}.",
    ]
    return "\n".join(lines)
