"""Search strategies: propose recipes, observe their fitness, breed the next generation.

Three strategies share the ``SearchStrategy`` interface:

- ``tournament`` (default): a genetic algorithm over recipes of the
  configured merge techniques, with tournament selection, elitism, parameter
  mutation and children that merge two earlier candidates.
- ``cmaes``: CMA-ES over per-layer-group weights and densities of one
  task-vector method (evolutionary merging in parameter space).
- ``dfs``: a genetic algorithm over layer paths (indicator bits and input
  scales of ``LayerPathGenome``).

Every random choice comes from one ``numpy.random.Generator`` seeded with
``evolution.seed``, so the same configuration, seed and observed fitness give
the same recipes in the same order. No strategy proposes a recipe whose key
was already proposed in the run. ``state_dict`` stores the proposals and
observations of every generation, and ``load_state_dict`` replays them on a
fresh strategy. Replay restores the generator, the populations and the CMA-ES
distribution exactly without pickling anything.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.config import Configuration
from evomerge.exceptions import ConfigError
from evomerge.recipe import MODEL_PREFIX, Recipe, candidate_key
from evomerge.strategies import pareto

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
# Attempts to draw a recipe with an unseen key before a generation accepts one recipe fewer.
MAX_REDRAWS = 20


@dataclass(frozen=True)
class ModelInfo:
    """Layer count and content fingerprint of one input model."""

    num_layers: int
    fingerprint: str


@dataclass(frozen=True)
class Observation:
    """The score of one proposed recipe; failed candidates carry ``failed=True``."""

    recipe: Recipe
    key: str
    fitness: float
    metrics: dict[str, float] = field(default_factory=dict)
    failed: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the observation as plain JSON types; non-finite floats become strings."""
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            "key": self.key,
            "fitness": _encode_float(self.fitness),
            "metrics": {name: _encode_float(value) for name, value in self.metrics.items()},
            "failed": self.failed,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Observation":
        """Rebuild an observation written by ``to_json``."""
        return cls(
            recipe=Recipe.model_validate(data["recipe"]),
            key=data["key"],
            fitness=_decode_float(data["fitness"]),
            metrics={name: _decode_float(value) for name, value in data["metrics"].items()},
            failed=bool(data["failed"]),
            error=data.get("error"),
        )


def _encode_float(value: float | None) -> float | str | None:
    """Return a finite float unchanged and inf, -inf or nan as a string, which strict JSON accepts."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def _decode_float(value: float | str | None) -> float | None:
    return None if value is None else float(value)


class SearchStrategy(ABC):
    """The propose/observe loop shared by every strategy.

    Subclasses implement ``_propose`` (the next generation's new recipes) and
    ``_observe`` (update their population from one generation's observations).
    """

    name: str = ""

    def __init__(self, config: Configuration, model_info: Mapping[str, ModelInfo]) -> None:
        self.config = config
        self.settings = config.evolution
        self.model_info = dict(model_info)
        missing = [model.name for model in config.models if model.name not in self.model_info]
        if missing:
            raise ConfigError(f"no ModelInfo for models {missing}: inspect every configured model before the search")
        self.fingerprints = {f"{MODEL_PREFIX}{name}": info.fingerprint for name, info in self.model_info.items()}
        self.model_refs = [f"{MODEL_PREFIX}{model.name}" for model in config.models]
        self.base_ref = f"{MODEL_PREFIX}{config.base_model_name()}"

        layer_counts = {model.name: self.model_info[model.name].num_layers for model in config.models}
        if len(set(layer_counts.values())) != 1:
            raise ConfigError(
                f"input models have different layer counts {layer_counts}: merge models of one architecture and size"
            )
        self.num_layers = next(iter(layer_counts.values()))
        if self.num_layers < 1:
            raise ConfigError(f"input models report {self.num_layers} layers: check num_hidden_layers in config.json")
        self._reset()

    # -- the public loop ------------------------------------------------------

    def propose(self) -> list[Recipe]:
        """Return this generation's new recipes; calling again before ``observe`` returns the same list."""
        if self._pending is None:
            self._pending = self._propose()
            self._seen_keys.update(self.key_of(recipe) for recipe in self._pending)
            logger.info("%s generation %d: proposed %d recipes", self.name, self.generation, len(self._pending))
        return list(self._pending)

    def observe(self, observations: list[Observation]) -> None:
        """Record one generation's scores and prepare the next generation."""
        if self._pending is None:
            # observe without propose: draw the proposals first so the generator stays in step with a replay.
            self.propose()
        observations = list(observations)
        self._proposals.append(list(self._pending or []))
        self._history.append(observations)
        self._seen_keys.update(observation.key for observation in observations)
        self._pending = None

        self._observe(observations)
        self._update_patience(observations)
        self.generation += 1

    def finished(self) -> bool:
        """Return whether every generation ran or the best fitness stalled for ``early_stopping_patience``."""
        if self.generation >= self.settings.generations:
            return True
        patience = self.settings.early_stopping_patience
        return patience is not None and self._stale_generations >= patience

    def best(self) -> Observation | None:
        """Return the successful observation with the highest fitness; the earliest wins a tie."""
        best = None
        for observation in self.observations():
            if observation.failed or not math.isfinite(observation.fitness):
                continue
            if best is None or observation.fitness > best.fitness:
                best = observation
        return best

    def pareto_front(self) -> list[Observation]:
        """Return the non-dominated observations over ``evolution.objectives``; empty for fewer than 2 objectives."""
        if len(self.settings.objectives) < 2:
            return []
        return pareto.pareto_front(self.observations(), self.settings.objectives)

    def observations(self) -> list[Observation]:
        """Return every observation of the run in order."""
        return [observation for generation in self._history for observation in generation]

    # -- state ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return the run's proposals and observations as JSON-serialisable data."""
        return {
            "format": STATE_FORMAT,
            "strategy": self.name,
            "seed": self.settings.seed,
            "proposals": [[recipe.model_dump(mode="json") for recipe in generation] for generation in self._proposals],
            "observations": [[observation.to_json() for observation in generation] for generation in self._history],
            "pending": None if self._pending is None else [recipe.model_dump(mode="json") for recipe in self._pending],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved state by replaying its generations on a fresh strategy.

        Raises ``ConfigError`` when the replayed proposals differ from the saved
        ones, which happens when the configuration or the seed changed.
        """
        if state.get("format") != STATE_FORMAT or state.get("strategy") != self.name:
            raise ConfigError(
                f"saved search state is format {state.get('format')!r} of strategy {state.get('strategy')!r}, "
                f"but this run uses format {STATE_FORMAT} of {self.name!r}: resume with the original configuration"
            )
        if state.get("seed") != self.settings.seed:
            raise ConfigError(
                f"saved search state used seed {state.get('seed')!r}, this configuration has seed "
                f"{self.settings.seed}: resume with the original seed"
            )

        self._reset()
        for index, (proposals, observations) in enumerate(zip(state["proposals"], state["observations"], strict=True)):
            self._replay_proposals(index, proposals)
            self.observe([Observation.from_json(entry) for entry in observations])
        if state.get("pending") is not None:
            self._replay_proposals(len(state["proposals"]), state["pending"])

    def _replay_proposals(self, generation: int, saved: list[Mapping[str, Any]]) -> None:
        """Propose again and check that the result equals the saved proposals."""
        replayed = [recipe.canonical_json() for recipe in self.propose()]
        expected = [Recipe.model_validate(entry).canonical_json() for entry in saved]
        if replayed != expected:
            raise ConfigError(
                f"replaying generation {generation} proposed {len(replayed)} recipes that differ from the "
                f"{len(expected)} saved ones: the configuration or the input models changed since the state was "
                "saved; resume with the original configuration or start a new run"
            )

    # -- helpers for subclasses --------------------------------------------------

    def key_of(self, recipe: Recipe) -> str:
        """Return the content key the generation loop gives ``recipe``."""
        return candidate_key(recipe, self.fingerprints)

    def is_new(self, key: str, taken_keys: set[str]) -> bool:
        """Return whether ``key`` was neither proposed nor observed in this run nor in ``taken_keys`` (this generation's keys)."""
        return key not in self._seen_keys and key not in taken_keys

    def draw_new(self, make: Callable[[], Recipe | None], taken_keys: set[str]) -> Recipe | None:
        """Call ``make`` until it returns a recipe with an unseen key, at most ``MAX_REDRAWS`` times.

        Adds the accepted key to ``taken_keys``; returns None when every attempt
        was a duplicate.
        """
        for _ in range(MAX_REDRAWS):
            recipe = make()
            if recipe is None:
                continue
            key = self.key_of(recipe)
            if self.is_new(key, taken_keys):
                taken_keys.add(key)
                return recipe
        logger.info("%s generation %d: no unseen recipe after %d draws", self.name, self.generation, MAX_REDRAWS)
        return None

    def draw_seed(self) -> int:
        """Draw a seed for a recipe or a library optimiser from the strategy's generator."""
        return int(self.rng.integers(0, 2**31 - 1))

    def rank_order(self, observations: list[Observation]) -> list[Observation]:
        """Sort successful observations best first: by Pareto front when 2+ objectives are set, then fitness."""
        usable = [obs for obs in observations if not obs.failed and math.isfinite(obs.fitness)]
        if len(self.settings.objectives) >= 2:
            ranks = pareto.non_dominated_ranks(usable, self.settings.objectives)
        else:
            ranks = [0] * len(usable)
        # The stable sort keeps earlier observations ahead on equal rank and fitness.
        order = sorted(range(len(usable)), key=lambda index: (ranks[index], -usable[index].fitness))
        return [usable[index] for index in order]

    def tournament_pick(self, ranked: list[Any], exclude: int | None = None) -> int:
        """Return the index of the winner of a tournament over a best-first list."""
        indices = [index for index in range(len(ranked)) if index != exclude]
        size = min(self.settings.tournament_size, len(indices))
        entrants = self.rng.choice(len(indices), size=size, replace=False)
        return indices[int(min(entrants))]

    # -- internals ------------------------------------------------------------------

    def _reset(self) -> None:
        """Return the strategy to the state before its first proposal."""
        self.rng = np.random.default_rng(self.settings.seed)
        self.generation = 0
        self._proposals: list[list[Recipe]] = []
        self._history: list[list[Observation]] = []
        self._pending: list[Recipe] | None = None
        self._seen_keys: set[str] = set()
        self._best_fitness: float | None = None
        self._stale_generations = 0
        self._init_search()

    def _update_patience(self, observations: list[Observation]) -> None:
        """Count the generations since the best fitness last rose."""
        scores = [obs.fitness for obs in observations if not obs.failed and math.isfinite(obs.fitness)]
        generation_best = max(scores, default=None)
        if generation_best is not None and (self._best_fitness is None or generation_best > self._best_fitness):
            self._best_fitness = generation_best
            self._stale_generations = 0
        else:
            self._stale_generations += 1

    @abstractmethod
    def _init_search(self) -> None:
        """Set up the strategy's own state; called on construction and before a replay."""

    @abstractmethod
    def _propose(self) -> list[Recipe]:
        """Return the next generation's new recipes."""

    @abstractmethod
    def _observe(self, observations: list[Observation]) -> None:
        """Update the strategy's own state from one generation's observations."""


def make_strategy(config: Configuration, model_info: Mapping[str, ModelInfo]) -> SearchStrategy:
    """Create the search strategy that ``config.evolution.strategy`` names."""
    name = config.evolution.strategy
    if name == "tournament":
        from evomerge.strategies.tournament import TournamentStrategy

        return TournamentStrategy(config, model_info)
    if name == "cmaes":
        from evomerge.strategies.cmaes_search import CMAESStrategy

        return CMAESStrategy(config, model_info)
    if name == "dfs":
        from evomerge.strategies.layer_search import LayerPathStrategy

        return LayerPathStrategy(config, model_info)
    raise ConfigError(f"unknown evolution.strategy {name!r}: use 'tournament', 'cmaes' or 'dfs'")
