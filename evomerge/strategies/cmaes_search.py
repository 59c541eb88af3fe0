"""CMA-ES over per-layer-group merge parameters of one method.

The search vector lives in the unit cube. For each non-base input model and
each tuned per-model parameter (``weight``, and ``density`` where the method
takes it) it contains ``layer_groups`` entries, and for a global ``t`` (slerp)
another ``layer_groups`` entries. Each entry maps linearly onto the
parameter's range in ``genes.PARAMETER_RANGES``. The ``layer_groups`` values of
one parameter become a gradient list, which the merge interpolates linearly
over the layer index.

``cmaes.CMA`` minimises, so it receives ``-fitness``. A failed candidate
is given ``FAILED_VALUE``, which ranks below every fitness above -1e12. A sampled vector
whose recipe key was seen before is not proposed again: CMA-ES receives the
fitness already observed for that key. The CMA object is not saved; the
base class's replay of the proposals and observations rebuilds it exactly.
"""

from __future__ import annotations

import logging
import math

import cmaes
import numpy as np

from evomerge.evolution import Observation, SearchStrategy
from evomerge.exceptions import ConfigError
from evomerge.recipe import Recipe, merge_methods
from evomerge.strategies import genes

logger = logging.getLogger(__name__)

# Told to CMA-ES for a failed or unscored candidate; CMA-ES ranks solutions, so only the order matters.
FAILED_VALUE = 1e12
# cmaes 0.13 divides by zero in its recombination weights for populations of 2 and 3.
MIN_POPULATION = 4


class CMAESStrategy(SearchStrategy):
    """CMA-ES over the gradients of one parameter-space method."""

    name = "cmaes"

    def _init_search(self) -> None:
        method_name = self.settings.cmaes_method
        methods = merge_methods()
        if method_name not in methods or methods[method_name].kind != "parameter":
            valid = sorted(name for name, entry in methods.items() if entry.kind == "parameter")
            raise ConfigError(f"evolution.cmaes_method {method_name!r} is not a parameter-space method; valid: {valid}")
        method = methods[method_name]
        self.method = method_name

        if self.settings.population_size < MIN_POPULATION:
            raise ConfigError(
                f"evolution.population_size is {self.settings.population_size}, but the cmaes strategy needs at "
                f"least {MIN_POPULATION}: raise population_size"
            )
        groups = self.settings.layer_groups
        if groups > self.num_layers:
            raise ConfigError(
                f"evolution.layer_groups is {groups} but the models have {self.num_layers} layers: "
                f"give at most {self.num_layers} groups"
            )

        others = [ref for ref in self.model_refs if ref != self.base_ref]
        if not others:
            raise ConfigError("CMA-ES merging needs at least 2 models: add a fine-tune of the base model")
        if method_name in ("slerp", "nuslerp"):
            self.inputs = (self.base_ref, others[0])
        elif method.needs_base:
            self.inputs = tuple(others)
        else:
            self.inputs = tuple(self.model_refs)
        self.base = self.base_ref if method.needs_base else None

        self.per_model = [name for name in ("weight", "density") if name in method.per_model_parameters]
        if method_name in ("slerp", "nuslerp"):
            self.per_model = []
        self.global_names = [name for name in ("t",) if name in method.global_parameters]
        dimension = groups * (len(self.per_model) * len(self.inputs) + len(self.global_names))
        if dimension == 0:
            raise ConfigError(f"method {method_name!r} has no weight, density or t for CMA-ES to tune: choose e.g. 'ties'")
        self.dimension = dimension

        self.recipe_seed = self.draw_seed() if method_name in genes.SEEDED_METHODS else None
        bounds = np.tile([0.0, 1.0], (dimension, 1))
        self.optimizer = cmaes.CMA(
            mean=np.full(dimension, 0.5),
            sigma=self.settings.cmaes_sigma,
            bounds=bounds,
            seed=self.draw_seed(),
            population_size=self.settings.population_size,
        )
        self.fitness_by_key: dict[str, float] = {}
        self._sampled: list[tuple[np.ndarray, str]] = []

    def vector_to_recipe(self, vector: np.ndarray) -> Recipe:
        """Map a unit-cube vector onto a recipe with gradient parameters."""
        groups = self.settings.layer_groups
        position = 0

        def take(name: str) -> list[float]:
            nonlocal position
            low, high = genes.PARAMETER_RANGES[name]
            values = [float(low + (high - low) * value) for value in vector[position : position + groups]]
            position += groups
            return values

        input_parameters = []
        for _ in self.inputs:
            input_parameters.append({name: take(name) for name in self.per_model})
        parameters = {name: take(name) for name in self.global_names}
        return Recipe(
            method=self.method,
            inputs=self.inputs,
            base=self.base,
            parameters=parameters,
            input_parameters=tuple(input_parameters) if self.per_model else (),
            seed=self.recipe_seed,
        )

    def _propose(self) -> list[Recipe]:
        self._sampled = []
        recipes = []
        taken_keys: set[str] = set()
        for _ in range(self.optimizer.population_size):
            vector = self.optimizer.ask()
            recipe = self.vector_to_recipe(vector)
            key = self.key_of(recipe)
            self._sampled.append((vector, key))
            if self.is_new(key, taken_keys):
                taken_keys.add(key)
                recipes.append(recipe)
        return recipes

    def _observe(self, observations: list[Observation]) -> None:
        for observation in observations:
            usable = not observation.failed and math.isfinite(observation.fitness)
            self.fitness_by_key[observation.key] = -observation.fitness if usable else FAILED_VALUE

        solutions = []
        for vector, key in self._sampled:
            if key not in self.fitness_by_key:
                logger.warning("cmaes generation %d: candidate %s has no observation, so it counts as failed", self.generation, key)
            solutions.append((vector, self.fitness_by_key.get(key, FAILED_VALUE)))
        self.optimizer.tell(solutions)
        self._sampled = []
