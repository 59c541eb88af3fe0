"""A genetic algorithm over layer paths (the ``dfs`` strategy).

The genotype is the indicator and scale arrays of a ``LayerPathGenome`` over
all input models, with ``evolution.dfs_repeats`` repeats. Embeddings, final
norm and head come from the base model. Generation 0 contains the identity path
of every model followed by mutated identity paths. Later generations keep
the ``elite_count`` best paths and fill the rest with uniform crossover of
two tournament winners (probability ``crossover_rate``) followed by mutation,
or with a mutation of one tournament winner (see ``genes.mutate_path``).
"""

from __future__ import annotations

import numpy as np

from evomerge.evolution import Observation, SearchStrategy
from evomerge.exceptions import ConfigError
from evomerge.merge.layer_path import LayerPathGenome
from evomerge.merge.spec import LayerStep
from evomerge.recipe import Recipe
from evomerge.strategies import genes


class LayerPathStrategy(SearchStrategy):
    """Tournament selection, uniform crossover and bit-flip mutation over layer paths."""

    name = "dfs"

    def _init_search(self) -> None:
        if len(self.model_refs) < 2:
            raise ConfigError("the dfs strategy needs at least 2 models to combine layers from: add a model")
        self.genome = LayerPathGenome(tuple(self.model_refs), self.num_layers, repeats=self.settings.dfs_repeats)
        self.population: list[Observation] = []

    def path_recipe(self, indicator: np.ndarray, scales: np.ndarray) -> Recipe:
        """Return the dfs recipe of a genotype."""
        steps = self.genome.decode(indicator, scales)
        return Recipe(
            method="dfs",
            inputs=tuple(self.model_refs),
            base=self.base_ref,
            layer_path=tuple((step.model, step.layer, step.scale) for step in steps),
        )

    def genotype(self, recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
        """Return the indicator and scale arrays of a dfs recipe."""
        steps = [LayerStep(model=ref, layer=layer, scale=scale) for ref, layer, scale in recipe.layer_path or ()]
        return self.genome.encode(steps)

    def _mutated(self, indicator: np.ndarray, scales: np.ndarray) -> Recipe:
        indicator, scales = genes.mutate_path(
            self.genome, indicator, scales, self.settings.mutation_rate, self.settings.mutation_scale, self.rng
        )
        return self.path_recipe(indicator, scales)

    def _propose(self) -> list[Recipe]:
        taken_keys: set[str] = set()
        recipes = []
        if not self.population:
            for ref in self.model_refs[: self.settings.population_size]:
                recipe = self.draw_new(lambda ref=ref: self.path_recipe(*self.genome.identity(ref)), taken_keys)
                if recipe is not None:
                    recipes.append(recipe)
            while len(recipes) < self.settings.population_size:
                recipe = self.draw_new(self._random_identity_mutant, taken_keys)
                if recipe is None:
                    break
                recipes.append(recipe)
            return recipes

        elites = min(self.settings.elite_count, len(self.population))
        for _ in range(self.settings.population_size - elites):
            recipe = self.draw_new(self._child, taken_keys)
            if recipe is not None:
                recipes.append(recipe)
        return recipes

    def _random_identity_mutant(self) -> Recipe:
        ref = self.model_refs[int(self.rng.integers(len(self.model_refs)))]
        return self._mutated(*self.genome.identity(ref))

    def _child(self) -> Recipe:
        first = self.tournament_pick(self.population)
        indicator, scales = self.genotype(self.population[first].recipe)
        if len(self.population) > 1 and self.rng.random() < self.settings.crossover_rate:
            second = self.tournament_pick(self.population, exclude=first)
            other_indicator, other_scales = self.genotype(self.population[second].recipe)
            from_first = self.rng.random(self.genome.size) < 0.5
            indicator = np.where(from_first, indicator, other_indicator)
            scales = np.where(from_first, scales, other_scales)
        return self._mutated(indicator, scales)

    def _observe(self, observations: list[Observation]) -> None:
        elites = self.population[: self.settings.elite_count]
        elite_keys = {member.key for member in elites}
        fresh = [obs for obs in observations if obs.key not in elite_keys]
        self.population = self.rank_order(elites + fresh)[: self.settings.population_size]
