"""The tournament genetic algorithm over recipes of several merge techniques.

Generation 0 draws ``population_size`` recipes, cycling through
``merge.techniques`` in a shuffled order: parameter-space merges of random
input subsets with random parameters, passthrough slices, and layer paths
(``dfs``, and ``ps_dfs`` over a parameter-space merge named "ps"). Every later
generation keeps the ``elite_count`` best members of the population without
rebuilding them and fills the other slots with children:

- with probability ``crossover_rate`` a merge child, a ``linear`` or ``slerp``
  recipe over ``"candidate:KEY"`` of a tournament winner and a random
  non-elite member with the same layer count;
- otherwise a mutation of a tournament winner's parameters, slices or path.

The population is the elites plus the successful children. Failed
candidates never enter it, so they are never selected. When no member
exists (all of generation 0 failed), the next generation is drawn afresh.
"""

from __future__ import annotations

import difflib
import logging

import numpy as np

from evomerge.evolution import Observation, SearchStrategy
from evomerge.exceptions import ConfigError
from evomerge.merge.layer_path import LayerPathGenome
from evomerge.merge.spec import LayerStep
from evomerge.recipe import CANDIDATE_PREFIX, PS_REFERENCE, Recipe, merge_methods
from evomerge.strategies import genes

logger = logging.getLogger(__name__)

PATH_METHODS = ("dfs", "ps_dfs")
SLICE_METHODS = ("passthrough", "frankenmerge")


class TournamentStrategy(SearchStrategy):
    """Tournament selection with elitism, parameter mutation and merge children."""

    name = "tournament"

    def _init_search(self) -> None:
        self.methods = merge_methods()
        self.techniques = list(self.config.merge.techniques)
        if not self.techniques:
            raise ConfigError("merge.techniques is empty: list at least one merge method, e.g. ['linear', 'ties']")
        for technique in self.techniques:
            self._check_technique(technique)

        self.others = [ref for ref in self.model_refs if ref != self.base_ref]
        self.population: list[Observation] = []
        self.layer_counts: dict[str, int] = {}

    def _check_technique(self, technique: str) -> None:
        """Raise ``ConfigError`` for a technique that is unknown or impossible with the configured models."""
        if technique not in self.methods:
            close = difflib.get_close_matches(technique, list(self.methods), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid methods: {sorted(self.methods)}"
            raise ConfigError(f"merge.techniques lists unknown method {technique!r}: {hint}")
        model_count = len(self.config.models)
        if model_count < 2:
            raise ConfigError(f"merge technique {technique!r} needs at least 2 models, the configuration has {model_count}")
        if technique == "model_stock" and model_count < 3:
            raise ConfigError("model_stock needs a base and at least 2 other models: add a model or drop model_stock")

    # -- proposals ------------------------------------------------------------------

    def _propose(self) -> list[Recipe]:
        if not self.population:
            return self._initial_population()

        elites = min(self.settings.elite_count, len(self.population))
        taken_keys: set[str] = set()
        children = []
        for _ in range(self.settings.population_size - elites):
            child = self.draw_new(self._make_child, taken_keys)
            if child is not None:
                children.append(child)
        return children

    def _initial_population(self) -> list[Recipe]:
        """Draw ``population_size`` random recipes, cycling through the techniques."""
        order = [self.techniques[int(index)] for index in self.rng.permutation(len(self.techniques))]
        taken_keys: set[str] = set()
        recipes = []
        for slot in range(self.settings.population_size):
            technique = order[slot % len(order)]
            recipe = self.draw_new(lambda: self.random_recipe(technique), taken_keys)
            if recipe is not None:
                recipes.append(recipe)
        return recipes

    def _make_child(self) -> Recipe | None:
        if self.rng.random() < self.settings.crossover_rate:
            child = self._merge_child()
            if child is not None:
                return child
        parent = self.population[self.tournament_pick(self.population)]
        return self.mutate(parent.recipe)

    def _merge_child(self) -> Recipe | None:
        """Merge a tournament winner with a lower-ranked member of the same layer count."""
        first = self.tournament_pick(self.population)
        layers = self.layer_counts[self.population[first].key]
        same_depth = [
            index
            for index, member in enumerate(self.population)
            if index != first and self.layer_counts[member.key] == layers
        ]
        lower = [index for index in same_depth if index >= self.settings.elite_count]
        choices = lower or same_depth
        if not choices:
            return None
        second = choices[int(self.rng.integers(len(choices)))]

        refs = (
            f"{CANDIDATE_PREFIX}{self.population[first].key}",
            f"{CANDIDATE_PREFIX}{self.population[second].key}",
        )
        if "slerp" in self.techniques and self.rng.random() < 0.5:
            return Recipe(method="slerp", inputs=refs, base=refs[0], parameters={"t": genes.draw_value("t", self.rng)})
        weight = genes.draw_value("weight", self.rng)
        return Recipe(method="linear", inputs=refs, input_parameters=({"weight": weight}, {"weight": 1.0 - weight}))

    # -- random recipes ----------------------------------------------------------------

    def random_recipe(self, technique: str) -> Recipe:
        """Draw a random recipe of one technique over the input models."""
        if technique in SLICE_METHODS:
            return self._random_slices(technique)
        if technique in PATH_METHODS:
            return self._random_path(technique)
        return self._random_parameter_recipe(technique)

    def _random_parameter_recipe(self, method: str) -> Recipe:
        info = self.methods[method]
        refs = self.model_refs
        if method in ("slerp", "nuslerp"):
            chosen = [refs[int(index)] for index in self.rng.choice(len(refs), size=2, replace=False)]
            base = chosen[0] if info.needs_base else None
        elif not info.needs_base:
            size = int(self.rng.integers(2, len(refs) + 1))
            chosen = [refs[int(index)] for index in sorted(self.rng.choice(len(refs), size=size, replace=False))]
            base = None
        else:
            smallest = 2 if method == "model_stock" else 1
            size = int(self.rng.integers(smallest, len(self.others) + 1))
            picked = sorted(self.rng.choice(len(self.others), size=size, replace=False))
            chosen = [self.others[int(index)] for index in picked]
            base = self.base_ref

        per_model = [name for name in genes.TUNED_PER_MODEL if name in info.per_model_parameters]
        global_names = [name for name in genes.TUNED_GLOBAL if name in info.global_parameters]
        input_parameters = tuple(
            genes.fix_epsilon({name: genes.draw_value(name, self.rng) for name in per_model}) for _ in chosen
        )
        parameters = {name: genes.draw_value(name, self.rng) for name in global_names}
        seed = self.draw_seed() if method in genes.SEEDED_METHODS else None
        return Recipe(
            method=method,
            inputs=tuple(chosen),
            base=base,
            parameters=parameters,
            input_parameters=input_parameters if per_model else (),
            seed=seed,
        )

    def _random_slices(self, method: str) -> Recipe:
        """Cut the layers into 2-3 contiguous ranges from random models; half the time repeat one range."""
        layers = self.num_layers
        count = min(int(self.rng.integers(2, 4)), layers)
        cuts = sorted(int(cut) for cut in self.rng.choice(np.arange(1, layers), size=count - 1, replace=False)) if count > 1 else []
        bounds = [0, *cuts, layers]
        slices = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            source = self.model_refs[int(self.rng.integers(len(self.model_refs)))]
            slices.append((source, start, end, 1.0))
        if self.rng.random() < 0.5:
            repeated = int(self.rng.integers(len(slices)))
            slices.insert(repeated + 1, slices[repeated])
        return self._slice_recipe(method, slices)

    def _slice_recipe(self, method: str, slices: list[tuple[str, int, int, float]]) -> Recipe:
        inputs = tuple(dict.fromkeys(entry[0] for entry in slices))
        return Recipe(method=method, inputs=inputs, base=self.base_ref, slices=tuple(slices))

    def _random_path(self, method: str) -> Recipe:
        """Start from one model's own layers and mutate the path; ps_dfs starts from its "ps" merge."""
        if method == "dfs":
            skeleton = Recipe(method="dfs", inputs=tuple(self.model_refs), base=self.base_ref)
            start = self.model_refs[int(self.rng.integers(len(self.model_refs)))]
        else:
            choices = [name for name in self.techniques if self.methods[name].kind == "parameter"] or ["ties"]
            ps_method = choices[int(self.rng.integers(len(choices)))]
            step = self._random_parameter_recipe(ps_method)
            skeleton = step.model_copy(
                update={
                    "method": "ps_dfs",
                    "parameters": {"ps_method": ps_method, **step.parameters},
                }
            )
            start = PS_REFERENCE
        genome = self._genome(skeleton)
        indicator, scales = genome.identity(start)
        indicator, scales = genes.mutate_path(
            genome, indicator, scales, self.settings.mutation_rate, self.settings.mutation_scale, self.rng
        )
        return self._path_recipe(skeleton, genome, indicator, scales)

    def _genome(self, skeleton: Recipe) -> LayerPathGenome:
        """Return the path genome over a recipe's references, with "ps" first for ps_dfs."""
        names = [ref for ref in skeleton.references() if ref != PS_REFERENCE]
        if skeleton.method == "ps_dfs":
            names.insert(0, PS_REFERENCE)
        return LayerPathGenome(tuple(names), self.num_layers, repeats=self.settings.dfs_repeats)

    @staticmethod
    def _path_recipe(skeleton: Recipe, genome: LayerPathGenome, indicator, scales) -> Recipe:
        steps = genome.decode(indicator, scales)
        path = tuple((step.model, step.layer, step.scale) for step in steps)
        return skeleton.model_copy(update={"layer_path": path})

    # -- mutation ---------------------------------------------------------------------

    def mutate(self, recipe: Recipe) -> Recipe:
        """Return a changed copy of a recipe: its path, its slices or its numeric parameters."""
        if recipe.layer_path is not None:
            return self._mutate_path_recipe(recipe)
        if recipe.slices is not None:
            return self._mutate_slices(recipe)
        return self._mutate_parameters(recipe, force=True)

    def _mutate_parameters(self, recipe: Recipe, force: bool) -> Recipe:
        """Perturb each tuned number with probability ``mutation_rate``; with ``force`` at least one changes."""
        parameters = dict(recipe.parameters)
        input_parameters = [dict(entry) for entry in recipe.input_parameters]
        genes_found = [(None, name) for name in sorted(parameters) if name in genes.PARAMETER_RANGES]
        for index, entry in enumerate(input_parameters):
            genes_found.extend((index, name) for name in sorted(entry) if name in genes.PARAMETER_RANGES)
        if not genes_found:
            return self._toggle_input(recipe) if force else recipe

        def perturb(where: int | None, name: str) -> None:
            target = parameters if where is None else input_parameters[where]
            value = target[name]
            if isinstance(value, list):
                target[name] = [genes.perturb_value(name, item, self.settings.mutation_scale, self.rng) for item in value]
            else:
                target[name] = genes.perturb_value(name, value, self.settings.mutation_scale, self.rng)

        changed = False
        for where, name in genes_found:
            if self.rng.random() < self.settings.mutation_rate:
                perturb(where, name)
                changed = True
        if force and not changed:
            where, name = genes_found[int(self.rng.integers(len(genes_found)))]
            perturb(where, name)

        input_parameters = [genes.fix_epsilon(entry) for entry in input_parameters]
        return recipe.model_copy(update={"parameters": parameters, "input_parameters": tuple(input_parameters)})

    def _toggle_input(self, recipe: Recipe) -> Recipe:
        """Add or drop one non-base input model; used for methods without numeric parameters."""
        inputs = list(recipe.inputs)
        candidate = self.others[int(self.rng.integers(len(self.others)))]
        if candidate in inputs and len(inputs) > 2:
            inputs.remove(candidate)
        elif candidate not in inputs:
            inputs.append(candidate)
        ordered = tuple(ref for ref in self.others if ref in inputs) + tuple(ref for ref in inputs if ref not in self.others)
        return recipe.model_copy(update={"inputs": ordered})

    def _mutate_slices(self, recipe: Recipe) -> Recipe:
        """Change the source model or move one bound of slices, each with probability ``mutation_rate``."""
        slices = list(recipe.slices or ())
        changed = False
        for index in range(len(slices)):
            if self.rng.random() < self.settings.mutation_rate:
                changed = self._change_slice(slices, index) or changed
        attempts = 0
        while not changed and attempts < 10:
            changed = self._change_slice(slices, int(self.rng.integers(len(slices))))
            attempts += 1
        return self._slice_recipe(recipe.method, slices)

    def _change_slice(self, slices: list[tuple[str, int, int, float]], index: int) -> bool:
        """Apply one random edit to slice ``index``; return whether it changed."""
        source, start, end, scale = slices[index]
        operation = int(self.rng.integers(3))
        if operation == 0:
            others = [ref for ref in self.model_refs if ref != source]
            source = others[int(self.rng.integers(len(others)))]
        else:
            step = 1 if self.rng.random() < 0.5 else -1
            if operation == 1:
                start += step
            else:
                end += step
            if not 0 <= start < end <= self.num_layers:
                return False
        slices[index] = (source, start, end, scale)
        return True

    def _mutate_path_recipe(self, recipe: Recipe) -> Recipe:
        """Mutate the layer path; for ps_dfs also perturb the parameter-space step's numbers."""
        skeleton = recipe.model_copy(update={"layer_path": None})
        genome = self._genome(skeleton)
        steps = [LayerStep(model=ref, layer=layer, scale=scale) for ref, layer, scale in recipe.layer_path or ()]
        indicator, scales = genome.encode(steps)
        indicator, scales = genes.mutate_path(
            genome, indicator, scales, self.settings.mutation_rate, self.settings.mutation_scale, self.rng
        )
        if recipe.method == "ps_dfs":
            skeleton = self._mutate_parameters(skeleton, force=False)
        return self._path_recipe(skeleton, genome, indicator, scales)

    # -- observation ------------------------------------------------------------------

    def _observe(self, observations: list[Observation]) -> None:
        for observation in observations:
            if not observation.failed:
                self.layer_counts[observation.key] = self._output_layers(observation.recipe)

        elites = self.population[: self.settings.elite_count]
        elite_keys = {member.key for member in elites}
        fresh = [obs for obs in observations if obs.key not in elite_keys]
        self.population = self.rank_order(elites + fresh)[: self.settings.population_size]

    def _output_layers(self, recipe: Recipe) -> int:
        """Return the layer count of the model a recipe builds."""
        if recipe.layer_path is not None:
            return len(recipe.layer_path)
        if recipe.slices is not None:
            return sum(end - start for _, start, end, _ in recipe.slices)
        first = recipe.inputs[0] if recipe.inputs else self.base_ref
        if first.startswith(CANDIDATE_PREFIX):
            return self.layer_counts.get(first[len(CANDIDATE_PREFIX):], self.num_layers)
        return self.num_layers
