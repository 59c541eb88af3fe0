"""The run configuration: pydantic models with YAML load and save.

Every section forbids unknown keys, and ``load_config`` turns a misspelt key
into a ``ConfigError`` that names the key and the closest valid one.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.exceptions import ConfigError

DTYPE_NAMES = ("float32", "float16", "bfloat16")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelReference(_Section):
    """One input model: a local folder or a Hugging Face Hub id."""

    name: str = Field(description="Short unique name used in recipes, charts and the ledger.")
    path: str = Field(description="Local model folder or Hub id such as 'HuggingFaceTB/SmolLM2-135M'.")
    revision: str | None = Field(default=None, description="Hub branch, tag or commit; ignored for local folders.")

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        if not value or any(ch in value for ch in "/\\: "):
            raise ValueError(
                f"model name {value!r} is invalid: use letters, digits, '-', '_' or '.' only"
            )
        return value


class MergeSettings(_Section):
    """Settings of candidate builds: merge methods, base model, output dtype and shards."""

    techniques: list[str] = Field(
        default_factory=lambda: ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "passthrough"],
        description="Merge methods the initial population draws from.",
    )
    base_model: str | None = Field(
        default=None,
        description="Name of the model whose weights the task-vector methods subtract; defaults to the first model.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="Dtype of the written checkpoints."
    )
    max_shard_bytes: int = Field(
        default=256 * 1024**2,
        gt=0,
        description="Maximum size of one safetensors shard, in bytes. A merge keeps one pending shard in memory.",
    )
    tokenizer_source: str = Field(
        default="base",
        description="'base' keeps the base model's vocabulary, 'union' keeps extra rows from models that have them.",
    )
    allow_pickle: bool = Field(default=False, description="Allow loading pickled .bin checkpoints.")
    trust_remote_code: bool = Field(default=False, description="Allow model code shipped with a checkpoint.")


class EvolutionSettings(_Section):
    """Settings of the search: strategy, population, generations, mutation and selection."""

    strategy: Literal["tournament", "cmaes", "dfs"] = "tournament"
    population_size: int = Field(default=8, ge=2)
    generations: int = Field(default=5, ge=1)
    mutation_rate: float = Field(default=0.3, ge=0.0, le=1.0)
    mutation_scale: float = Field(default=0.15, ge=0.0)
    tournament_size: int = Field(default=3, ge=1)
    elite_count: int = Field(default=2, ge=0)
    seed: int = 42
    early_stopping_patience: int | None = Field(
        default=3, ge=1, description="Stop when the best fitness has not improved for this many generations."
    )
    cmaes_method: str = Field(default="ties", description="Task-vector method whose parameters CMA-ES tunes.")
    layer_groups: int = Field(default=4, ge=1, description="Number of layer groups with their own CMA-ES parameters.")
    objectives: list[str] = Field(
        default_factory=list,
        description="Metrics for a Pareto front; empty means the single weighted fitness.",
    )
    crossover_rate: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="Share of tournament and dfs children made by merging two earlier candidates instead of mutating one.",
    )
    dfs_repeats: int = Field(default=2, ge=1, description="Times each layer of each model is available to a layer path.")
    cmaes_sigma: float = Field(
        default=0.25, gt=0.0, le=1.0, description="Initial CMA-ES step size, as a fraction of each parameter's range."
    )

    @model_validator(mode="after")
    def _elites_fit(self) -> "EvolutionSettings":
        if self.elite_count >= self.population_size:
            raise ValueError(
                f"elite_count {self.elite_count} must be smaller than population_size {self.population_size}"
            )
        if self.tournament_size > self.population_size:
            raise ValueError(
                f"tournament_size {self.tournament_size} exceeds population_size {self.population_size}"
            )
        return self


class EvaluationSettings(_Section):
    """Settings of candidate scoring; their canonical hash is part of every evaluation key."""

    search_texts: list[str] = Field(
        default_factory=list,
        description="Text files (.txt, .jsonl) or literal strings for perplexity on the search split.",
    )
    heldout_texts: list[str] = Field(
        default_factory=list, description="Text files or literal strings for the held-out report."
    )
    prompts: list[str] = Field(default_factory=list, description="Prompts for the coherence metric.")
    heldout_prompts: list[str] = Field(
        default_factory=list, description="Coherence prompts for the held-out report; empty means the search prompts."
    )
    task_files: list[str] = Field(default_factory=list, description="JSONL task files for task accuracy.")
    heldout_task_files: list[str] = Field(default_factory=list, description="JSONL task files for the held-out report.")
    max_length: int = Field(default=256, ge=2, description="Tokens per perplexity window.")
    stride: int = Field(default=128, ge=1, description="Tokens the perplexity window moves each step.")
    batch_size: int = Field(default=8, ge=1)
    max_new_tokens: int = Field(default=32, ge=1)
    metric_weights: dict[str, float] = Field(
        default_factory=lambda: {"perplexity": 1.0},
        description="Weights of the metrics in the single fitness value; higher fitness is better.",
    )
    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    seed: int = 0

    def canonical_hash(self) -> str:
        """Hash the settings and the contents of every referenced file."""
        payload = self.model_dump(mode="json")
        file_hashes: dict[str, str] = {}
        for group in ("search_texts", "heldout_texts", "task_files", "heldout_task_files"):
            for entry in payload[group]:
                if _is_file(entry):
                    file_hashes[entry] = hashlib.sha256(Path(entry).read_bytes()).hexdigest()
        payload["_file_hashes"] = file_hashes
        encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]


def _is_file(entry: str) -> bool:
    """Return whether ``entry`` names an existing file; literal texts too long for a path are not files."""
    try:
        return Path(entry).is_file()
    except OSError:  # ENAMETOOLONG for a long literal text
        return False


class StorageSettings(_Section):
    """Locations of the checkpoint store, the ledger, the local cache and run outputs."""

    state_dir: str = Field(default=".evomerge", description="Project state folder for the default store and ledger.")
    store_url: str | None = Field(
        default=None, description="fsspec URL of the checkpoint store; defaults to <state_dir>/store."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Options passed to the fsspec filesystem, e.g. endpoint_url for s3."
    )
    ledger_path: str | None = Field(default=None, description="DuckDB file; defaults to <state_dir>/ledger.duckdb.")
    cache_dir: str | None = Field(
        default=None, description="Local copies of remote checkpoints; defaults to <state_dir>/cache."
    )
    export_ledger: bool = Field(
        default=False, description="At the end of a run write the ledger as Parquet to <store_url>/ledger/."
    )
    keep_top_k: int | None = Field(
        default=None, ge=1, description="At the end of a run keep only the top k candidates and their ancestors."
    )

    def resolved_store_url(self) -> str:
        return self.store_url or str(Path(self.state_dir).resolve() / "store")

    def resolved_ledger_path(self) -> Path:
        return Path(self.ledger_path) if self.ledger_path else Path(self.state_dir) / "ledger.duckdb"

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.state_dir) / "cache"


class RunnerSettings(_Section):
    """The Prefect task runner for merges and evaluations, and its limits."""

    task_runner: Literal["thread", "dask", "ray"] = "thread"
    max_workers: int = Field(default=2, ge=1, description="Concurrent merge or evaluation tasks.")
    address: str | None = Field(default=None, description="Scheduler address of an existing Dask or Ray cluster.")
    gpus_per_task: float = Field(default=0.0, ge=0.0, description="GPUs requested per task from Dask or Ray.")
    merge_timeout_seconds: float | None = Field(default=None, gt=0, description="Time limit of one merge task.")
    evaluation_timeout_seconds: float | None = Field(default=None, gt=0, description="Time limit of one evaluation task.")
    retries: int = Field(default=2, ge=0, description="Retries of a task that failed on a transient store error.")


class Configuration(_Section):
    """A whole tournament: input models and every settings section."""

    models: list[ModelReference] = Field(min_length=1)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    evolution: EvolutionSettings = Field(default_factory=EvolutionSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    run_id: str | None = Field(default=None, description="Fixed run id; a run with an existing id resumes.")
    output_dir: str | None = Field(default=None, description="Folder for charts and the report; defaults to <state_dir>/runs/<run_id>.")

    @model_validator(mode="after")
    def _names_unique(self) -> "Configuration":
        names = [model.name for model in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        base = self.merge.base_model
        if base is not None and base not in names:
            raise ValueError(f"merge.base_model {base!r} is not one of the model names {names}")
        return self

    def base_model_name(self) -> str:
        return self.merge.base_model or self.models[0].name

    def model_by_name(self, name: str) -> ModelReference:
        for model in self.models:
            if model.name == name:
                return model
        raise ConfigError(f"no model named {name!r}; known models: {[m.name for m in self.models]}")


def _valid_keys(model_type: type[BaseModel], location: tuple[Any, ...]) -> list[str]:
    """Return the field names valid at ``location`` (a pydantic error path)."""
    current: Any = model_type
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def format_validation_error(error: ValidationError, model_type: type[BaseModel], source: str) -> str:
    """Turn a pydantic error into lines that name each bad key and its fix."""
    lines = []
    for item in error.errors():
        location = tuple(item["loc"])
        dotted = ".".join(str(part) for part in location)
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(model_type, location)
            close = difflib.get_close_matches(str(location[-1]), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            lines.append(f"unknown key {dotted!r}: {hint}")
        else:
            lines.append(f"{dotted or '<root>'}: {item['msg']}")
    return f"invalid configuration in {source}:\n  " + "\n  ".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Configuration:
    """Validate a plain mapping as a ``Configuration``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Configuration.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, Configuration, source)) from None


TEXT_FILE_FIELDS = ("search_texts", "heldout_texts", "task_files", "heldout_task_files")


def _resolve_relative_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Make model paths and evaluation files that exist relative to ``folder`` absolute.

    Entries that do not exist there stay as written: Hub ids, literal texts,
    and paths meant relative to the working directory.
    """

    def resolved(entry: Any) -> Any:
        if not isinstance(entry, str) or Path(entry).is_absolute():
            return entry
        candidate = folder / entry
        try:
            exists = candidate.exists()
        except OSError:  # a literal text too long to be a path
            return entry
        return str(candidate.resolve()) if exists else entry

    for model in data.get("models") or []:
        if isinstance(model, dict) and "path" in model:
            model["path"] = resolved(model["path"])
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict):
        for field in TEXT_FILE_FIELDS:
            if isinstance(evaluation.get(field), list):
                evaluation[field] = [resolved(entry) for entry in evaluation[field]]
    return data


def load_config(path: str | Path) -> Configuration:
    """Read a YAML configuration file.

    Model folders and evaluation files are looked up relative to the file's
    own folder first, so a configuration works from any working directory.
    Storage paths stay relative to the working directory.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {str(path)!r} not found: check the path or create one with --generate-config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"configuration file {str(path)!r} is not valid YAML: {error}") from None
    if isinstance(data, dict):
        data = _resolve_relative_paths(data, path.resolve().parent)
    return config_from_dict(data or {}, source=str(path))


def save_config(config: Configuration, path: str | Path) -> Path:
    """Write ``config`` as YAML that ``load_config`` reads back unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def config_hash(config: Configuration) -> str:
    """Return a short hash of the configuration's canonical JSON."""
    encoded = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]
