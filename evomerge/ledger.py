"""The fitness ledger: runs, candidates, evaluations and generations in one DuckDB file.

DuckDB lets one process open a database file for writing, and while that
process has it open no other process can open it, not even read-only. So the
flow process is the only one that opens the ledger. Other processes read the
Parquet export (``export_parquet``) or open the file after the run ends.
Threads of the owning process share one ``Ledger``, which serialises calls
with a lock.

Every write runs in one transaction and is an upsert, so recording the same
row twice leaves one row. Floats are stored as DOUBLE without rounding. A
non-finite number (NaN, +inf, -inf) is stored as NULL, because DuckDB orders
NaN above every number and would rank a NaN fitness as the best. The table
layout is described in docs/ledger-schema.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb
import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem

from evomerge.exceptions import LedgerError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TABLES = ("runs", "candidates", "run_candidates", "evaluations", "metrics", "generations")

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS schema_info (
    name VARCHAR PRIMARY KEY,
    value VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    config JSON NOT NULL,
    strategy VARCHAR NOT NULL,
    seed BIGINT NOT NULL,
    status VARCHAR NOT NULL,
    best_key VARCHAR,
    started_at TIMESTAMP NOT NULL,
    resumed_at TIMESTAMP,
    resume_count INTEGER NOT NULL,
    finished_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS candidates (
    key VARCHAR PRIMARY KEY,
    method VARCHAR,
    recipe JSON NOT NULL,
    status VARCHAR NOT NULL,
    error VARCHAR,
    checkpoint_uri VARCHAR,
    build_seconds DOUBLE,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS run_candidates (
    run_id VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    generation INTEGER NOT NULL,
    parents VARCHAR[] NOT NULL,
    recorded_at TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, key, generation)
);
CREATE TABLE IF NOT EXISTS evaluations (
    key VARCHAR NOT NULL,
    settings_hash VARCHAR NOT NULL,
    split VARCHAR NOT NULL,
    fitness DOUBLE,
    failed BOOLEAN NOT NULL,
    error VARCHAR,
    metrics JSON NOT NULL,
    wall_seconds DOUBLE,
    device VARCHAR,
    tokens BIGINT NOT NULL,
    recorded_at TIMESTAMP NOT NULL,
    PRIMARY KEY (key, settings_hash, split)
);
CREATE TABLE IF NOT EXISTS metrics (
    key VARCHAR NOT NULL,
    settings_hash VARCHAR NOT NULL,
    split VARCHAR NOT NULL,
    metric VARCHAR NOT NULL,
    value DOUBLE,
    PRIMARY KEY (key, settings_hash, split, metric)
);
CREATE TABLE IF NOT EXISTS generations (
    run_id VARCHAR NOT NULL,
    generation INTEGER NOT NULL,
    best_key VARCHAR,
    best_fitness DOUBLE,
    mean_fitness DOUBLE,
    std_fitness DOUBLE,
    candidates INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    wall_seconds DOUBLE,
    strategy_state JSON,
    recorded_at TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, generation)
);
"""

# Columns of run_candidates() before the per-metric columns; a metric with one of these names gets a "metric_" prefix.
CANDIDATE_COLUMNS = [
    "run_id",
    "key",
    "generation",
    "method",
    "parents",
    "status",
    "error",
    "fitness",
    "evaluation_failed",
    "evaluation_error",
    "checkpoint_uri",
    "build_seconds",
]


def _utc_now() -> datetime:
    """Return the current UTC time without a zone, the form stored in TIMESTAMP columns."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _json_default(value: Any) -> Any:
    """Convert numpy values, paths and pydantic models for ``json.dumps``."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def _to_json(value: Any, description: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise LedgerError(
            f"{description} cannot be stored as JSON ({error}): use str, int, finite float, bool, None, lists and dicts"
        ) from None


def _from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _check_metrics(metrics: dict[str, float], key: str) -> dict[str, float | None]:
    """Validate metric names and values; return them with non-finite values as None."""
    if not isinstance(metrics, dict):
        raise LedgerError(f"metrics of candidate {key!r} must be a dict of name -> number, got {type(metrics).__name__}")
    checked = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise LedgerError(f"metric name {name!r} of candidate {key!r} is invalid: use a non-empty string")
        if value is not None and not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise LedgerError(
                f"metric {name!r} of candidate {key!r} has value {value!r} of type {type(value).__name__}: give a number"
            )
        checked[name] = _finite_or_none(value)
    return checked


class Ledger:
    """The DuckDB fitness ledger of one project; use as a context manager or call ``close``."""

    def __init__(self, path: str | os.PathLike, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._lock = threading.RLock()

        if read_only and not self.path.is_file():
            raise LedgerError(f"ledger {str(self.path)!r} not found: check the path or run a tournament to create it")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)

        try:
            self._connection = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.Error as error:
            raise self._open_error(error) from None

        try:
            if not read_only:
                with self._transaction() as connection:
                    connection.execute(SCHEMA_SQL)
                    connection.execute(
                        "INSERT INTO schema_info VALUES ('schema_version', ?) ON CONFLICT (name) DO NOTHING",
                        [str(SCHEMA_VERSION)],
                    )
            self._check_schema_version()
        except LedgerError:
            # Release the file lock so the caller can retry or open another ledger.
            self.close()
            raise

    def _open_error(self, error: duckdb.Error) -> LedgerError:
        message = str(error)
        if "lock" in message.lower():
            return LedgerError(
                f"ledger {str(self.path)!r} is held by another process ({message}): DuckDB allows one process "
                "to open a database file for writing; stop that process or point storage.ledger_path at another file"
            )
        if "not a valid DuckDB database" in message or "Corrupt" in message or "checksum" in message.lower():
            return LedgerError(
                f"ledger {str(self.path)!r} is not a readable DuckDB database ({message}): "
                "move the file away or point storage.ledger_path at a new file"
            )
        return LedgerError(f"ledger {str(self.path)!r} could not be opened: {message}")

    def _check_schema_version(self) -> None:
        try:
            row = self._connection.execute("SELECT value FROM schema_info WHERE name = 'schema_version'").fetchone()
        except duckdb.CatalogException:
            raise LedgerError(
                f"ledger {str(self.path)!r} is a DuckDB file without the ledger schema: point storage.ledger_path "
                "at a ledger file, or open it once without read_only to create the tables"
            ) from None
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {str(self.path)!r} has schema version {version}, newer than {SCHEMA_VERSION} that this "
                "EvoMerge reads: upgrade EvoMerge"
            )

    # ----- plumbing

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Run the body in one transaction; roll back and raise ``LedgerError`` on failure."""
        with self._lock:
            connection = self._require_open()
            connection.execute("BEGIN TRANSACTION")
            try:
                yield connection
            except BaseException as error:
                connection.execute("ROLLBACK")
                if isinstance(error, duckdb.Error):
                    raise LedgerError(f"write to ledger {str(self.path)!r} failed and was rolled back: {error}") from error
                raise
            else:
                connection.execute("COMMIT")

    def _require_open(self) -> duckdb.DuckDBPyConnection:
        if self._connection is None:
            raise LedgerError(f"ledger {str(self.path)!r} is closed: open a new Ledger")
        return self._connection

    def _writable(self) -> None:
        if self.read_only:
            raise LedgerError(f"ledger {str(self.path)!r} was opened read-only: open it with read_only=False to write")

    def _query(self, sql: str, parameters: list | None = None) -> pd.DataFrame:
        with self._lock:
            connection = self._require_open()
            try:
                return connection.execute(sql, parameters or []).df()
            except duckdb.Error as error:
                raise LedgerError(f"query on ledger {str(self.path)!r} failed: {error}") from error

    def _fetchone(self, sql: str, parameters: list) -> tuple | None:
        with self._lock:
            connection = self._require_open()
            try:
                return connection.execute(sql, parameters).fetchone()
            except duckdb.Error as error:
                raise LedgerError(f"query on ledger {str(self.path)!r} failed: {error}") from error

    # ----- runs

    def start_run(self, run_id: str, config: dict, strategy: str, seed: int) -> bool:
        """Record the start of ``run_id``; return True for a new run and False when it resumes one."""
        self._writable()
        if not run_id:
            raise LedgerError("run_id is empty: give a non-empty run id")
        config_json = _to_json(config, f"config of run {run_id!r}")
        now = _utc_now()

        with self._transaction() as connection:
            row = connection.execute(
                "SELECT config, strategy, seed FROM runs WHERE run_id = ?", [run_id]
            ).fetchone()
            if row is None:
                connection.execute(
                    "INSERT INTO runs (run_id, config, strategy, seed, status, started_at, resume_count) "
                    "VALUES (?, ?, ?, ?, 'running', ?, 0)",
                    [run_id, config_json, strategy, int(seed), now],
                )
                logger.info("ledger: started run %s (strategy %s, seed %d)", run_id, strategy, seed)
                return True

            connection.execute(
                "UPDATE runs SET status = 'running', resumed_at = ?, resume_count = resume_count + 1, "
                "finished_at = NULL WHERE run_id = ?",
                [now, run_id],
            )
        if json.loads(row[0]) != json.loads(config_json) or row[1] != strategy or row[2] != int(seed):
            logger.warning(
                "ledger: run %s resumes with a different config, strategy or seed than it started with; "
                "the ledger keeps the original",
                run_id,
            )
        logger.info("ledger: resumed run %s", run_id)
        return False

    def finish_run(self, run_id: str, status: str, best_key: str | None) -> None:
        """Record the end state of ``run_id`` (e.g. 'completed', 'failed', 'cancelled') and its best key."""
        self._writable()
        with self._transaction() as connection:
            updated = connection.execute(
                "UPDATE runs SET status = ?, best_key = ?, finished_at = ? WHERE run_id = ? RETURNING run_id",
                [status, best_key, _utc_now(), run_id],
            ).fetchall()
        if not updated:
            raise LedgerError(f"run {run_id!r} is not in ledger {str(self.path)!r}: call start_run first")
        logger.info("ledger: run %s finished with status %s, best %s", run_id, status, best_key)

    def runs(self) -> pd.DataFrame:
        """Return every run, oldest first; ``config`` is a parsed dict."""
        frame = self._query("SELECT * FROM runs ORDER BY started_at, run_id")
        frame["config"] = frame["config"].map(_from_json)
        return frame

    # ----- candidates and evaluations

    def record_candidate(
        self,
        run_id: str,
        generation: int,
        key: str,
        recipe: dict,
        parents: list[str],
        status: str,
        error: str | None = None,
        checkpoint_uri: str | None = None,
        build_seconds: float | None = None,
    ) -> None:
        """Upsert candidate ``key`` and its membership in ``generation`` of ``run_id``.

        The candidate row is global across runs. Status and error take the new
        values. A None checkpoint_uri or build_seconds keeps the stored value,
        so a run that reuses a checkpoint keeps the build time of the run that built it.
        """
        self._writable()
        if generation < 0:
            raise LedgerError(f"generation {generation} of candidate {key!r} is negative: generations count from 0")
        if isinstance(parents, str):
            raise LedgerError(f"parents of candidate {key!r} must be a list of keys, got the string {parents!r}")
        recipe_json = _to_json(recipe, f"recipe of candidate {key!r}")
        method = (recipe.get("merge_method") or recipe.get("method")) if isinstance(recipe, dict) else None
        now = _utc_now()

        with self._transaction() as connection:
            connection.execute(
                """
                INSERT INTO candidates (key, method, recipe, status, error, checkpoint_uri, build_seconds,
                                        created_at, updated_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (key) DO UPDATE SET
                    method = excluded.method,
                    recipe = excluded.recipe,
                    status = excluded.status,
                    error = excluded.error,
                    checkpoint_uri = COALESCE(excluded.checkpoint_uri, candidates.checkpoint_uri),
                    build_seconds = COALESCE(excluded.build_seconds, candidates.build_seconds),
                    updated_at = excluded.updated_at
                """,
                [key, method, recipe_json, status, error, checkpoint_uri, _finite_or_none(build_seconds), now, now],
            )
            connection.execute(
                """
                INSERT INTO run_candidates (run_id, key, generation, parents, recorded_at)
                VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (run_id, key, generation) DO UPDATE SET parents = excluded.parents
                """,
                [run_id, key, int(generation), [str(parent) for parent in parents], now],
            )

    def record_evaluation(
        self,
        key: str,
        settings_hash: str,
        split: str,
        metrics: dict[str, float],
        fitness: float,
        failed: bool,
        error: str | None,
        wall_seconds: float,
        device: str,
        tokens: int = 0,
    ) -> None:
        """Upsert the evaluation of ``key`` under ``settings_hash`` on ``split``, with one metrics row per metric."""
        self._writable()
        checked = _check_metrics(metrics, key)
        metrics_json = _to_json(checked, f"metrics of candidate {key!r}")
        fitness_value = _finite_or_none(fitness)
        if fitness is not None and fitness_value is None:
            logger.info("ledger: fitness %r of %s on %s is not finite; stored as NULL", fitness, key, split)

        with self._transaction() as connection:
            connection.execute(
                """
                INSERT INTO evaluations (key, settings_hash, split, fitness, failed, error, metrics,
                                         wall_seconds, device, tokens, recorded_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (key, settings_hash, split) DO UPDATE SET
                    fitness = excluded.fitness,
                    failed = excluded.failed,
                    error = excluded.error,
                    metrics = excluded.metrics,
                    wall_seconds = excluded.wall_seconds,
                    device = excluded.device,
                    tokens = excluded.tokens,
                    recorded_at = excluded.recorded_at
                """,
                [
                    key,
                    settings_hash,
                    split,
                    fitness_value,
                    bool(failed),
                    error,
                    metrics_json,
                    _finite_or_none(wall_seconds),
                    device,
                    int(tokens),
                    _utc_now(),
                ],
            )
            connection.execute(
                "DELETE FROM metrics WHERE key = ? AND settings_hash = ? AND split = ?", [key, settings_hash, split]
            )
            if checked:
                connection.executemany(
                    "INSERT INTO metrics VALUES (?, ?, ?, ?, ?)",
                    [[key, settings_hash, split, name, value] for name, value in checked.items()],
                )

    def get_evaluation(self, key: str, settings_hash: str, split: str) -> dict | None:
        """Return the stored evaluation as a dict, or None; a NULL fitness comes back as None."""
        row = self._fetchone(
            "SELECT key, settings_hash, split, fitness, failed, error, metrics, wall_seconds, device, tokens, "
            "recorded_at FROM evaluations WHERE key = ? AND settings_hash = ? AND split = ?",
            [key, settings_hash, split],
        )
        if row is None:
            return None
        names = ["key", "settings_hash", "split", "fitness", "failed", "error", "metrics", "wall_seconds", "device",
                 "tokens", "recorded_at"]
        result = dict(zip(names, row))
        result["metrics"] = _from_json(result["metrics"])
        return result

    # ----- generations

    def record_generation(
        self,
        run_id: str,
        generation: int,
        best_key: str | None,
        best_fitness: float | None,
        mean_fitness: float | None,
        std_fitness: float | None,
        candidates: int,
        failed: int,
        wall_seconds: float,
        strategy_state: dict | None = None,
    ) -> None:
        """Upsert the summary of ``generation`` of ``run_id`` and the strategy state needed to resume after it."""
        self._writable()
        state_json = None if strategy_state is None else _to_json(strategy_state, f"strategy state of run {run_id!r}")
        with self._transaction() as connection:
            connection.execute(
                """
                INSERT INTO generations (run_id, generation, best_key, best_fitness, mean_fitness, std_fitness,
                                         candidates, failed, wall_seconds, strategy_state, recorded_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (run_id, generation) DO UPDATE SET
                    best_key = excluded.best_key,
                    best_fitness = excluded.best_fitness,
                    mean_fitness = excluded.mean_fitness,
                    std_fitness = excluded.std_fitness,
                    candidates = excluded.candidates,
                    failed = excluded.failed,
                    wall_seconds = excluded.wall_seconds,
                    strategy_state = excluded.strategy_state,
                    recorded_at = excluded.recorded_at
                """,
                [
                    run_id,
                    int(generation),
                    best_key,
                    _finite_or_none(best_fitness),
                    _finite_or_none(mean_fitness),
                    _finite_or_none(std_fitness),
                    int(candidates),
                    int(failed),
                    _finite_or_none(wall_seconds),
                    state_json,
                    _utc_now(),
                ],
            )

    def get_strategy_state(self, run_id: str, generation: int) -> dict | None:
        """Return the strategy state stored with ``generation`` of ``run_id``, or None."""
        row = self._fetchone(
            "SELECT strategy_state FROM generations WHERE run_id = ? AND generation = ?", [run_id, int(generation)]
        )
        return None if row is None else _from_json(row[0])

    def generations(self, run_id: str) -> pd.DataFrame:
        """Return one row per recorded generation of ``run_id``, in order."""
        return self._query(
            "SELECT run_id, generation, best_key, best_fitness, mean_fitness, std_fitness, candidates, failed, "
            "wall_seconds FROM generations WHERE run_id = ? ORDER BY generation",
            [run_id],
        )

    # ----- candidate queries

    def run_candidates(self, run_id: str, split: str = "search", settings_hash: str | None = None) -> pd.DataFrame:
        """Return one row per (candidate, generation) of ``run_id`` with its evaluation on ``split``.

        Columns: run_id, key, generation, method, parents (list of keys),
        status, error, fitness, evaluation_failed, evaluation_error,
        checkpoint_uri, build_seconds, then one float column per metric
        (NaN where a candidate lacks it). Without ``settings_hash`` the latest
        evaluation of each key on ``split`` is used.
        """
        hash_filter = "" if settings_hash is None else "AND settings_hash = ?"
        parameters = [split] + ([] if settings_hash is None else [settings_hash]) + [run_id]
        frame = self._query(
            f"""
            WITH chosen AS (
                SELECT key, settings_hash, fitness, failed, error
                FROM evaluations
                WHERE split = ? {hash_filter}
                QUALIFY row_number() OVER (PARTITION BY key ORDER BY recorded_at DESC, settings_hash) = 1
            )
            SELECT rc.run_id, rc.key, rc.generation, c.method, rc.parents, c.status, c.error,
                   e.fitness, e.failed AS evaluation_failed, e.error AS evaluation_error,
                   c.checkpoint_uri, c.build_seconds, e.settings_hash AS _settings_hash
            FROM run_candidates rc
            JOIN candidates c USING (key)
            LEFT JOIN chosen e USING (key)
            WHERE rc.run_id = ?
            ORDER BY rc.generation, rc.key
            """,
            parameters,
        )
        frame["parents"] = frame["parents"].map(list)
        frame["fitness"] = frame["fitness"].astype("float64")
        return self._add_metric_columns(frame, split)

    def _add_metric_columns(self, frame: pd.DataFrame, split: str) -> pd.DataFrame:
        """Join one float column per metric onto ``frame`` using its ``_settings_hash`` column."""
        metrics = self._query("SELECT key, settings_hash, metric, value FROM metrics WHERE split = ?", [split])
        selected = frame[["key", "_settings_hash"]].drop_duplicates()
        metrics = metrics.merge(selected, left_on=["key", "settings_hash"], right_on=["key", "_settings_hash"])
        if metrics.empty:
            return frame.drop(columns="_settings_hash")

        wide = metrics.pivot(index="key", columns="metric", values="value").astype("float64")
        wide.columns.name = None
        wide = wide.rename(columns={name: f"metric_{name}" for name in wide.columns if name in CANDIDATE_COLUMNS})
        frame = frame.drop(columns="_settings_hash").merge(wide, left_on="key", right_index=True, how="left")
        return frame.reset_index(drop=True)

    def best(self, run_id: str, split: str = "search", n: int = 1, settings_hash: str | None = None) -> pd.DataFrame:
        """Return the ``n`` distinct candidates of ``run_id`` with the highest fitness on ``split``.

        Failed evaluations and NULL fitness are skipped; ties go to the key
        that sorts first. ``generation`` is the first generation the key
        appeared in.
        """
        frame = self.run_candidates(run_id, split, settings_hash)
        evaluation_ok = ~frame["evaluation_failed"].fillna(False).astype(bool)
        usable = frame[frame["fitness"].notna() & evaluation_ok]
        first = usable.sort_values(["key", "generation"]).drop_duplicates("key")
        ranked = first.sort_values(["fitness", "key"], ascending=[False, True], kind="stable")
        return ranked.head(n).reset_index(drop=True)

    def lineage(self, run_id: str, split: str = "search", settings_hash: str | None = None) -> pd.DataFrame:
        """Return the breeding edges of ``run_id``: parent_key, child_key, generation, child_fitness, parent_fitness.

        ``generation`` is the first generation the child appeared in; each
        edge appears once even when the child is carried into later generations.
        """
        candidates = self.run_candidates(run_id, split, settings_hash)
        columns = ["parent_key", "child_key", "generation", "child_fitness", "parent_fitness"]
        if candidates.empty:
            return pd.DataFrame(columns=columns)

        first = candidates.sort_values(["key", "generation"]).drop_duplicates("key")
        edges = first[["key", "generation", "parents", "fitness"]].explode("parents").dropna(subset=["parents"])
        edges = edges.rename(columns={"key": "child_key", "parents": "parent_key", "fitness": "child_fitness"})
        fitness_by_key = first.set_index("key")["fitness"]
        edges["parent_fitness"] = edges["parent_key"].map(fitness_by_key).astype("float64")
        edges["generation"] = edges["generation"].astype("int64")
        edges["child_fitness"] = edges["child_fitness"].astype("float64")
        edges = edges.drop_duplicates(["parent_key", "child_key"])
        return edges[columns].sort_values(["generation", "child_key", "parent_key"]).reset_index(drop=True)

    # ----- export and lifetime

    def export_parquet(self, destination: str | os.PathLike, storage_options: dict | None = None) -> list[str]:
        """Write one Parquet file per table under ``destination`` (any fsspec URL); return the written URLs.

        DuckDB writes each file to a local temporary folder, and fsspec then
        uploads it. A local destination is replaced by a rename, so a reader
        there never opens a half-written file.
        """
        fs, root = fsspec.core.url_to_fs(str(destination), **(storage_options or {}))
        written = []
        with tempfile.TemporaryDirectory(prefix="evomerge-ledger-") as temporary:
            for table in TABLES:
                local = Path(temporary) / f"{table}.parquet"
                quoted = str(local).replace("'", "''")
                with self._lock:
                    try:
                        self._require_open().execute(f"COPY {table} TO '{quoted}' (FORMAT parquet)")
                    except duckdb.Error as error:
                        raise LedgerError(f"export of table {table} from {str(self.path)!r} failed: {error}") from error

                target = f"{root.rstrip('/')}/{table}.parquet"
                try:
                    fs.makedirs(root, exist_ok=True)
                    if isinstance(fs, LocalFileSystem):
                        shutil.copyfile(local, f"{target}.tmp")
                        os.replace(f"{target}.tmp", target)
                    else:
                        fs.put_file(str(local), target)
                except OSError as error:
                    raise LedgerError(
                        f"could not write {fs.unstrip_protocol(target)} ({error}): check the destination and credentials"
                    ) from error
                written.append(fs.unstrip_protocol(target))
        logger.info("ledger: exported %d tables to %s", len(written), destination)
        return written

    def close(self) -> None:
        """Close the DuckDB connection; later calls raise ``LedgerError``."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, read_only={self.read_only})"
