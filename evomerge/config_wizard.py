"""The interactive configuration generator behind ``--generate-config``.

Every question shows its default in brackets, and an empty reply takes it. An
invalid reply is explained and the question repeated, up to ``MAX_ATTEMPTS`` times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from evomerge.config import (
    Configuration,
    EvaluationSettings,
    EvolutionSettings,
    MergeSettings,
    ModelReference,
    save_config,
)
from evomerge.exceptions import ConfigError

MAX_ATTEMPTS = 5
DEFAULT_OUTPUT = "evomerge.yaml"


class _Asker:
    def __init__(self, ask: Callable[[str], str]):
        self.ask = ask

    def value(self, question: str, default, parse: Callable[[str], object]):
        for _ in range(MAX_ATTEMPTS):
            try:
                answer = self.ask(f"{question} [{default}]: ").strip()
            except EOFError:
                answer = ""
            if not answer:
                return default
            try:
                return parse(answer)
            except (ValueError, ConfigError) as error:
                print(f"  invalid answer {answer!r}: {error}")
        raise ConfigError(f"no valid answer to {question!r} after {MAX_ATTEMPTS} attempts")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be a whole number of at least 1")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def _methods(text: str) -> list[str]:
    from evomerge.merge.registry import get_method

    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        get_method(name)
    if not names:
        raise ValueError("give at least one method")
    return names


def _files(text: str) -> list[str]:
    paths = [part.strip() for part in text.split(",") if part.strip()]
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise ValueError(f"file not found: {', '.join(missing)}")
    # Absolute paths keep the written configuration valid from any working directory.
    return [str(Path(path).resolve()) for path in paths]


def run_wizard(ask: Callable[[str], str] = input, output: str | None = None) -> Path:
    """Ask for models, methods, evolution and evaluation settings; write and return the YAML path."""
    asker = _Asker(ask)
    print("Input models: local folders or Hub ids of fine-tunes of one base model; an empty answer ends the list.")
    models = _ask_models(ask)
    names = [model.name for model in models]

    def parse_base(text: str) -> str:
        if text not in names:
            raise ValueError(f"choose one of {names}")
        return text

    base = asker.value("Base model name (task-vector methods subtract it)", names[0], parse_base)
    defaults_merge = MergeSettings()
    techniques = asker.value("Merge methods, comma-separated", ",".join(defaults_merge.techniques), _methods)
    if isinstance(techniques, str):
        techniques = _methods(techniques)  # the default comes back as its display string

    defaults_evolution = EvolutionSettings()
    population = asker.value("Population size", defaults_evolution.population_size, _positive_int)
    generations = asker.value("Generations", defaults_evolution.generations, _positive_int)
    mutation_rate = asker.value("Mutation rate (0-1)", defaults_evolution.mutation_rate, _probability)
    seed = asker.value("Random seed", defaults_evolution.seed, int)
    texts = asker.value("Evaluation text files, comma-separated (empty: none)", "", _files)
    output_path = output or asker.value("Write the configuration to", DEFAULT_OUTPUT, str)

    elite_count = min(defaults_evolution.elite_count, population - 1)
    tournament_size = min(defaults_evolution.tournament_size, population)
    config = Configuration(
        models=models,
        merge=MergeSettings(techniques=techniques, base_model=base),
        evolution=EvolutionSettings(
            population_size=population,
            generations=generations,
            mutation_rate=mutation_rate,
            seed=seed,
            elite_count=elite_count,
            tournament_size=tournament_size,
        ),
        evaluation=EvaluationSettings(search_texts=texts or []),
    )
    return save_config(config, output_path)


def _ask_models(ask: Callable[[str], str]) -> list[ModelReference]:
    """Ask for model paths until an empty answer after at least two; end of input stops the questions."""
    models: list[ModelReference] = []
    while True:
        hint = " (empty to finish)" if len(models) >= 2 else ""
        try:
            answer = ask(f"Model {len(models) + 1} path or Hub id{hint}: ").strip()
        except EOFError:
            if len(models) >= 2:
                return models
            raise ConfigError(
                f"input ended after {len(models)} model(s): give at least two model paths or Hub ids"
            ) from None
        if not answer:
            if len(models) >= 2:
                return models
            print("  at least two models are needed")
            continue
        name = Path(answer.rstrip("/")).name.replace(" ", "-") or f"model{len(models) + 1}"
        if name in {model.name for model in models}:
            name = f"{name}-{len(models) + 1}"
        path = str(Path(answer).resolve()) if Path(answer).exists() else answer  # else a Hub id
        models.append(ModelReference(name=name, path=path))
