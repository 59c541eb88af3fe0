"""Tests of the DuckDB fitness ledger against real database files."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from evomerge.exceptions import LedgerError
from evomerge.ledger import TABLES, Ledger


LINEAR = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}
TIES = {"merge_method": "ties", "parameters": {"density": 0.5}}
SLERP = {"method": "slerp", "parameters": {"t": 0.3}}


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.duckdb") as opened:
        yield opened


def count(ledger: Ledger, table: str) -> int:
    return ledger._connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def record_family(ledger: Ledger) -> None:
    """Record a two-generation run: a and b in generation 0, c = a x b and the elite a in generation 1.

    Search fitness: a -1.5, b -2.0 (evaluation failed), c -1.25. Held-out fitness: a -1.0.
    """
    ledger.start_run("run1", {"population_size": 2}, "tournament", 7)
    ledger.record_candidate("run1", 0, "a", LINEAR, [], "built", checkpoint_uri="file:///store/a/", build_seconds=2.5)
    ledger.record_candidate("run1", 0, "b", TIES, [], "built")
    ledger.record_candidate("run1", 1, "c", SLERP, ["a", "b"], "built")
    ledger.record_candidate("run1", 1, "a", LINEAR, [], "built")
    ledger.record_candidate("run1", 1, "d", TIES, ["a"], "failed", error="shapes differ")

    ledger.record_evaluation("a", "h1", "search", {"perplexity": 4.5, "coherence": 0.75}, -1.5, False, None, 3.0, "cpu", 640)
    ledger.record_evaluation("b", "h1", "search", {"perplexity": 7.0}, -2.0, True, "NaN logits", 1.0, "cpu", 64)
    ledger.record_evaluation("c", "h1", "search", {"perplexity": 3.5, "coherence": 0.5}, -1.25, False, None, 3.0, "cpu", 640)
    ledger.record_evaluation("a", "h1", "heldout", {"perplexity": 5.0}, -1.0, False, None, 2.0, "cpu", 320)

    ledger.record_generation("run1", 0, "a", -1.5, -1.75, 0.25, 2, 0, 10.0, {"sigma": 0.5})
    ledger.record_generation("run1", 1, "c", -1.25, -1.375, 0.125, 3, 1, 12.5, {"sigma": 0.25})


# ----- opening


def test_open_creates_schema(tmp_path):
    path = tmp_path / "sub" / "ledger.duckdb"
    with Ledger(path):
        pass

    connection = duckdb.connect(str(path), read_only=True)
    tables = {row[0] for row in connection.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    version = connection.execute("SELECT value FROM schema_info WHERE name = 'schema_version'").fetchone()[0]
    connection.close()
    assert tables == set(TABLES) | {"schema_info"}
    assert version == "1"


def test_locked_file_error(tmp_path):
    path = tmp_path / "ledger.duckdb"
    Ledger(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LedgerError, match="is held by another process") as caught:
            Ledger(path)
        with pytest.raises(LedgerError, match="is held by another process"):
            Ledger(path, read_only=True)
    finally:
        holder.kill()
        holder.wait()
    assert str(path) in str(caught.value)


def test_corrupt_file_error(tmp_path):
    path = tmp_path / "ledger.duckdb"
    path.write_bytes(b"not a database " * 512)
    with pytest.raises(LedgerError, match="is not a readable DuckDB database"):
        Ledger(path)


def test_read_only_rejects_writes(tmp_path):
    path = tmp_path / "ledger.duckdb"
    with pytest.raises(LedgerError, match="not found"):
        Ledger(path, read_only=True)
    Ledger(path).close()
    with Ledger(path, read_only=True) as reader:
        with pytest.raises(LedgerError, match="opened read-only"):
            reader.start_run("r", {}, "tournament", 0)
        assert reader.runs().empty


def test_closed_ledger_rejects_calls(tmp_path):
    ledger = Ledger(tmp_path / "ledger.duckdb")
    ledger.close()
    with pytest.raises(LedgerError, match="is closed"):
        ledger.runs()


# ----- runs


def test_start_run_resume_false(ledger):
    assert ledger.start_run("r1", {"seed": 1}, "cmaes", 1) is True
    assert ledger.start_run("r1", {"seed": 1}, "cmaes", 1) is False

    runs = ledger.runs()
    assert len(runs) == 1
    assert runs.loc[0, "resume_count"] == 1
    assert runs.loc[0, "config"] == {"seed": 1}
    assert runs.loc[0, "status"] == "running"


def test_finish_run_records_status(ledger):
    ledger.start_run("r1", {}, "tournament", 0)
    ledger.finish_run("r1", "completed", "best-key")

    runs = ledger.runs()
    assert runs.loc[0, "status"] == "completed"
    assert runs.loc[0, "best_key"] == "best-key"
    assert not pd.isna(runs.loc[0, "finished_at"])
    with pytest.raises(LedgerError, match="run 'nope' is not in ledger"):
        ledger.finish_run("nope", "completed", None)


# ----- writes


def test_candidate_recorded_twice_one_row(ledger):
    ledger.record_candidate("r1", 0, "k", LINEAR, [], "built", checkpoint_uri="s3://b/k/", build_seconds=1.25)
    ledger.record_candidate("r1", 0, "k", LINEAR, [], "built")

    row = ledger._connection.execute("SELECT checkpoint_uri, build_seconds, method FROM candidates").fetchone()
    assert count(ledger, "candidates") == 1
    assert count(ledger, "run_candidates") == 1
    assert row == ("s3://b/k/", 1.25, "linear")


def test_evaluation_recorded_twice_one_row(ledger):
    for _ in range(2):
        ledger.record_evaluation("k", "h", "search", {"perplexity": 3.0, "coherence": 0.5}, -1.0, False, None, 1.0, "cpu")
    assert count(ledger, "evaluations") == 1
    assert count(ledger, "metrics") == 2

    ledger.record_evaluation("k", "h", "search", {"perplexity": 2.0}, -0.5, False, None, 1.0, "cpu")
    stored = ledger.get_evaluation("k", "h", "search")
    assert count(ledger, "metrics") == 1
    assert stored["metrics"] == {"perplexity": 2.0}
    assert stored["fitness"] == -0.5


def test_evaluation_floats_not_rounded(ledger):
    value = 0.1 + 0.2  # 0.30000000000000004
    ledger.record_evaluation("k", "h", "search", {"accuracy": value}, value, False, None, 1e-9, "cuda:0", 12)

    stored = ledger.get_evaluation("k", "h", "search")
    assert stored["fitness"] == value
    assert stored["metrics"]["accuracy"] == value
    assert stored["wall_seconds"] == 1e-9
    assert stored["tokens"] == 12
    assert stored["device"] == "cuda:0"
    assert ledger.get_evaluation("k", "h", "heldout") is None


def test_nonfinite_fitness_stored_null(ledger):
    ledger.record_evaluation("k", "h", "search", {"perplexity": math.inf}, math.nan, True, "overflow", 1.0, "cpu")

    stored = ledger.get_evaluation("k", "h", "search")
    value = ledger._connection.execute("SELECT value FROM metrics").fetchone()[0]
    assert stored["fitness"] is None
    assert stored["metrics"] == {"perplexity": None}
    assert value is None
    assert stored["failed"] is True
    assert stored["error"] == "overflow"


def test_generation_recorded_twice_one_row(ledger):
    state = {"mean": np.array([0.25, 0.5]), "sigma": np.float64(0.1), "generation": np.int64(3)}
    ledger.record_generation("r1", 0, "k", -1.0, -2.0, 0.5, 4, 1, 8.0, state)
    ledger.record_generation("r1", 0, "k", -1.0, -2.0, 0.5, 4, 1, 8.0, state)

    assert count(ledger, "generations") == 1
    assert ledger.get_strategy_state("r1", 0) == {"mean": [0.25, 0.5], "sigma": 0.1, "generation": 3}
    assert ledger.get_strategy_state("r1", 1) is None


def test_failed_write_rolled_back(ledger):
    with pytest.raises(LedgerError, match="rolled back"):
        ledger.record_candidate("r1", 2**40, "k", LINEAR, [], "built")
    assert count(ledger, "candidates") == 0
    assert count(ledger, "run_candidates") == 0


def test_bad_inputs_rejected(ledger):
    with pytest.raises(LedgerError, match="metric 'perplexity' of candidate 'k' has value 'low'"):
        ledger.record_evaluation("k", "h", "search", {"perplexity": "low"}, 1.0, False, None, 1.0, "cpu")
    with pytest.raises(LedgerError, match="recipe of candidate 'k' cannot be stored as JSON"):
        ledger.record_candidate("r1", 0, "k", {"weight": math.nan}, [], "built")
    with pytest.raises(LedgerError, match="must be a list of keys"):
        ledger.record_candidate("r1", 0, "k", LINEAR, "a", "built")
    with pytest.raises(LedgerError, match="generation -1 of candidate 'k' is negative"):
        ledger.record_candidate("r1", -1, "k", LINEAR, [], "built")
    assert count(ledger, "evaluations") == 0
    assert count(ledger, "candidates") == 0


def test_threads_share_one_ledger(ledger):
    def write(worker: int) -> None:
        for index in range(10):
            key = f"w{worker}-{index}"
            ledger.record_candidate("r1", 0, key, LINEAR, [], "built")
            ledger.record_evaluation(key, "h", "search", {"perplexity": float(index)}, -index, False, None, 0.1, "cpu")

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert count(ledger, "candidates") == 40
    assert count(ledger, "metrics") == 40


# ----- queries


def test_generations_frame_values(ledger):
    record_family(ledger)
    frame = ledger.generations("run1")
    assert list(frame.columns) == [
        "run_id", "generation", "best_key", "best_fitness", "mean_fitness", "std_fitness", "candidates", "failed",
        "wall_seconds",
    ]
    assert frame["generation"].tolist() == [0, 1]
    assert frame["best_key"].tolist() == ["a", "c"]
    assert frame["mean_fitness"].tolist() == [-1.75, -1.375]
    assert frame["failed"].tolist() == [0, 1]
    assert ledger.generations("other").empty


def test_run_candidates_frame_values(ledger):
    record_family(ledger)
    frame = ledger.run_candidates("run1")

    rows = {(row.key, row.generation): row for row in frame.itertuples()}
    assert list(frame.columns[:8]) == ["run_id", "key", "generation", "method", "parents", "status", "error", "fitness"]
    assert sorted(rows) == [("a", 0), ("a", 1), ("b", 0), ("c", 1), ("d", 1)]
    assert rows[("c", 1)].parents == ["a", "b"]
    assert rows[("c", 1)].method == "slerp"
    assert rows[("c", 1)].fitness == -1.25
    assert rows[("c", 1)].coherence == 0.5
    assert rows[("a", 1)].perplexity == 4.5
    assert rows[("a", 0)].build_seconds == 2.5
    assert math.isnan(rows[("b", 0)].coherence)
    assert rows[("b", 0)].evaluation_error == "NaN logits"
    assert math.isnan(rows[("d", 1)].fitness)
    assert rows[("d", 1)].error == "shapes differ"


def test_run_candidates_heldout_split(ledger):
    record_family(ledger)
    frame = ledger.run_candidates("run1", split="heldout")
    evaluated = frame[frame["fitness"].notna()]
    assert evaluated["key"].unique().tolist() == ["a"]
    assert evaluated["perplexity"].tolist() == [5.0, 5.0]
    assert "coherence" not in frame.columns


def test_run_candidates_settings_hash(ledger):
    record_family(ledger)
    ledger.record_evaluation("a", "h2", "search", {"perplexity": 9.0}, -9.0, False, None, 1.0, "cpu")

    latest = ledger.run_candidates("run1")
    pinned = ledger.run_candidates("run1", settings_hash="h1")

    assert latest.loc[latest["key"] == "a", "fitness"].tolist() == [-9.0, -9.0]
    assert pinned.loc[pinned["key"] == "a", "fitness"].tolist() == [-1.5, -1.5]
    assert pinned.loc[pinned["key"] == "a", "perplexity"].tolist() == [4.5, 4.5]


def test_best_skips_failed_evaluations(ledger):
    record_family(ledger)
    best = ledger.best("run1", n=5)
    assert best["key"].tolist() == ["c", "a"]
    assert best["fitness"].tolist() == [-1.25, -1.5]
    assert best["generation"].tolist() == [1, 0]
    assert ledger.best("run1")["key"].tolist() == ["c"]


def test_lineage_edges(ledger):
    record_family(ledger)
    ledger.record_candidate("run1", 2, "e", LINEAR, ["c", "a"], "built")

    edges = ledger.lineage("run1")

    assert list(edges.columns) == ["parent_key", "child_key", "generation", "child_fitness", "parent_fitness"]
    assert list(zip(edges["parent_key"], edges["child_key"], edges["generation"])) == [
        ("a", "c", 1),
        ("b", "c", 1),
        ("a", "d", 1),
        ("a", "e", 2),
        ("c", "e", 2),
    ]
    assert edges["child_fitness"].tolist()[:2] == [-1.25, -1.25]
    assert edges["parent_fitness"].tolist()[:2] == [-1.5, -2.0]
    assert ledger.lineage("none").empty


# ----- export


def test_export_parquet_row_counts(ledger, tmp_path):
    record_family(ledger)
    written = ledger.export_parquet(tmp_path / "export")

    assert [os.path.basename(path) for path in written] == [f"{table}.parquet" for table in TABLES]
    for table in TABLES:
        path = tmp_path / "export" / f"{table}.parquet"
        assert pq.read_table(path).num_rows == count(ledger, table), table
    reader = duckdb.connect()
    via_duckdb = reader.execute(f"SELECT count(*) FROM read_parquet('{tmp_path}/export/metrics.parquet')").fetchone()[0]
    reader.close()
    assert via_duckdb == 6
    parents = pq.read_table(tmp_path / "export" / "run_candidates.parquet").column("parents").to_pylist()
    assert ["a", "b"] in parents


def test_export_parquet_to_s3(ledger, s3_bucket):
    record_family(ledger)
    written = ledger.export_parquet(f"{s3_bucket.url}/ledger", storage_options=s3_bucket.storage_options)

    listed = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.name, Prefix="ledger/")
    names = sorted(item["Key"] for item in listed["Contents"])
    assert written[0] == f"s3://{s3_bucket.name}/ledger/runs.parquet"
    assert names == sorted(f"ledger/{table}.parquet" for table in TABLES)
