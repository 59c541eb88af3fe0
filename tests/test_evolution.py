"""Search strategies on synthetic fitness functions: no merges, no models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from evomerge.config import config_from_dict
from evomerge.evolution import ModelInfo, Observation, make_strategy
from evomerge.exceptions import ConfigError
from evomerge.recipe import Recipe, validate_recipe
from evomerge.strategies import pareto

WORST = -1e9
ALL_TECHNIQUES = [
    "linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "breadcrumbs",
    "della", "model_stock", "passthrough", "dfs", "ps_dfs",
]


def make_config(names=("base", "a", "b"), techniques=None, **evolution):
    data = {"models": [{"name": name, "path": f"/models/{name}"} for name in names], "evolution": evolution}
    if techniques is not None:
        data["merge"] = {"techniques": techniques}
    return config_from_dict(data)


def model_info(names=("base", "a", "b"), num_layers=4):
    return {name: ModelInfo(num_layers=num_layers, fingerprint=f"fp-{name}") for name in names}


def run_search(strategy, score, max_generations=100):
    """Drive the propose/observe loop and return each generation's (canonical JSON, key) pairs.

    ``score(recipe, key)`` returns (fitness, metrics, failed).
    """
    proposals = []
    while not strategy.finished() and strategy.generation < max_generations:
        recipes = strategy.propose()
        observations = []
        for recipe in recipes:
            key = strategy.key_of(recipe)
            fitness, metrics, failed = score(recipe, key)
            observations.append(Observation(recipe, key, fitness, metrics, failed))
        proposals.append([(recipe.canonical_json(), strategy.key_of(recipe)) for recipe in recipes])
        strategy.observe(observations)
    return proposals


class LinearMixFitness:
    """fitness = -|share of model 'a' - 0.7| for linear recipes, following candidate inputs."""

    def __init__(self, target=0.7):
        self.target = target
        self.share: dict[str, float] = {}

    def share_of(self, reference: str) -> float:
        if reference == "model:a":
            return 1.0
        if reference.startswith("candidate:"):
            return self.share[reference.split(":", 1)[1]]
        return 0.0

    def __call__(self, recipe: Recipe, key: str):
        weights = [entry["weight"] for entry in recipe.input_parameters]
        total = sum(weights)
        if total <= 0:
            return WORST, {}, True
        share = sum(w * self.share_of(ref) for w, ref in zip(weights, recipe.inputs)) / total
        self.share[key] = share
        return -abs(share - self.target), {}, False


def constant_score(recipe, key):
    return 1.0, {}, False


def key_score(recipe, key):
    """Return a fitness fixed by the key, so every run gets the same scores."""
    return -(int(key[:6], 16) % 97) / 97.0, {}, False


# -- determinism and keys ---------------------------------------------------------------


@pytest.mark.parametrize("strategy_name", ["tournament", "cmaes", "dfs"])
def test_same_seed_same_recipes(strategy_name):
    config = make_config(techniques=ALL_TECHNIQUES, strategy=strategy_name, generations=4, early_stopping_patience=None)
    first = run_search(make_strategy(config, model_info()), key_score)
    second = run_search(make_strategy(config, model_info()), key_score)
    assert first == second
    assert len(first) == 4


def test_same_seed_other_process():
    # A different PYTHONHASHSEED must not change the proposals: nothing may depend on hash() or set order.
    script = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from test_evolution import ALL_TECHNIQUES, key_score, make_config, model_info, run_search
        from evomerge.evolution import make_strategy
        config = make_config(techniques=ALL_TECHNIQUES, generations=3, early_stopping_patience=None)
        print(json.dumps(run_search(make_strategy(config, model_info()), key_score)))
        """
    )
    environment = dict(os.environ, PYTHONHASHSEED="12345")
    completed = subprocess.run(
        [sys.executable, "-c", script, os.path.dirname(os.path.abspath(__file__))],
        capture_output=True, text=True, env=environment, check=True, timeout=120
    )
    config = make_config(techniques=ALL_TECHNIQUES, generations=3, early_stopping_patience=None)
    here = run_search(make_strategy(config, model_info()), key_score)
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == [[list(pair) for pair in g] for g in here]


def test_other_seed_other_recipes():
    first = make_strategy(make_config(seed=1), model_info()).propose()
    second = make_strategy(make_config(seed=2), model_info()).propose()
    assert [r.canonical_json() for r in first] != [r.canonical_json() for r in second]


@pytest.mark.parametrize("strategy_name", ["tournament", "cmaes", "dfs"])
def test_keys_never_repeat(strategy_name):
    config = make_config(techniques=ALL_TECHNIQUES, strategy=strategy_name, generations=6, early_stopping_patience=None)
    proposals = run_search(make_strategy(config, model_info()), constant_score)
    keys = [key for generation in proposals for _, key in generation]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("strategy_name", ["tournament", "cmaes", "dfs"])
def test_proposals_pass_validation(strategy_name):
    config = make_config(techniques=ALL_TECHNIQUES, strategy=strategy_name, generations=5, early_stopping_patience=None)
    strategy = make_strategy(config, model_info())
    checked = 0

    def score(recipe, key):
        nonlocal checked
        validate_recipe(recipe, model_info())
        checked += 1
        return float(len(recipe.canonical_json()) % 13), {}, False

    run_search(strategy, score)
    assert checked >= 20


def test_tournament_covers_techniques():
    config = make_config(techniques=ALL_TECHNIQUES, population_size=12, generations=1)
    methods = {recipe.method for recipe in make_strategy(config, model_info()).propose()}
    assert methods == set(ALL_TECHNIQUES)


def test_dare_recipes_carry_seed():
    config = make_config(techniques=["dare_ties", "ties"], population_size=4)
    recipes = make_strategy(config, model_info()).propose()
    assert all(recipe.seed is not None for recipe in recipes if recipe.method == "dare_ties")
    assert all(recipe.seed is None for recipe in recipes if recipe.method == "ties")


def test_small_space_accepts_fewer():
    # model_stock over base + a + b has exactly one recipe: inputs (a, b).
    config = make_config(techniques=["model_stock"], population_size=4, generations=3, early_stopping_patience=None)
    proposals = run_search(make_strategy(config, model_info()), constant_score)
    assert [len(generation) for generation in proposals] == [1, 0, 0]


# -- the tournament ----------------------------------------------------------------------


def test_tournament_finds_linear_optimum():
    # Budget: 8 generations of 8 (6 new after generation 0), at most 50 recipes.
    # Every seed from 0 to 19 passes.
    config = make_config(
        names=("base", "a"),
        techniques=["linear"],
        population_size=8,
        generations=8,
        early_stopping_patience=None,
        seed=3,
    )
    strategy = make_strategy(config, model_info(("base", "a")))
    run_search(strategy, LinearMixFitness())
    assert strategy.best().fitness > -0.01


def test_tournament_merges_candidates():
    config = make_config(names=("base", "a"), techniques=["linear"], generations=4, crossover_rate=1.0,
                         early_stopping_patience=None)
    proposals = run_search(make_strategy(config, model_info(("base", "a"))), LinearMixFitness())
    later = [Recipe.model_validate_json(text) for generation in proposals[1:] for text, _ in generation]
    assert later
    assert all(len(recipe.parent_keys()) == 2 for recipe in later)


def test_elites_kept_not_rebuilt():
    config = make_config(names=("base", "a"), techniques=["linear"], population_size=6, elite_count=2, generations=5,
                         early_stopping_patience=None)
    strategy = make_strategy(config, model_info(("base", "a")))
    proposals = run_search(strategy, LinearMixFitness())
    assert [len(generation) for generation in proposals] == [6, 4, 4, 4, 4]
    elite_keys = {member.key for member in strategy.population[:2]}
    best_key = strategy.best().key
    assert best_key in elite_keys


def test_population_best_never_drops():
    config = make_config(names=("base", "a"), techniques=["linear"], generations=6, early_stopping_patience=None)
    strategy = make_strategy(config, model_info(("base", "a")))
    fitness = LinearMixFitness()
    bests = []
    while not strategy.finished():
        recipes = strategy.propose()
        strategy.observe([Observation(r, strategy.key_of(r), *fitness(r, strategy.key_of(r))) for r in recipes])
        bests.append(strategy.population[0].fitness)
    assert bests == sorted(bests)


def test_failed_candidate_never_selected():
    config = make_config(names=("base", "a"), techniques=["linear"], generations=5, crossover_rate=0.5,
                         early_stopping_patience=None)
    strategy = make_strategy(config, model_info(("base", "a")))
    fitness = LinearMixFitness()
    failed_keys = set()

    def score(recipe, key):
        value, metrics, failed = fitness(recipe, key)
        if strategy.generation == 0 and len(failed_keys) < 3:
            # A failure reported with a tempting fitness must still be ignored.
            failed_keys.add(key)
            return 100.0, metrics, True
        return value, metrics, failed

    proposals = run_search(strategy, score)
    parents = {parent for generation in proposals[1:] for text, _ in generation
               for parent in Recipe.model_validate_json(text).parent_keys()}
    assert len(proposals) == 5
    assert not parents & failed_keys
    assert strategy.best().key not in failed_keys
    assert all(member.key not in failed_keys for member in strategy.population)


def test_all_failed_generation_redraws():
    config = make_config(names=("base", "a"), techniques=["linear"], generations=2, early_stopping_patience=None)
    strategy = make_strategy(config, model_info(("base", "a")))
    first = strategy.propose()
    strategy.observe([Observation(r, strategy.key_of(r), WORST, {}, True, "merge failed") for r in first])
    second = strategy.propose()
    assert len(second) == config.evolution.population_size
    assert strategy.best() is None


# -- CMA-ES ---------------------------------------------------------------------------------


def test_cmaes_converges_on_quadratic():
    target = {"model:a": {"weight": [0.3, 0.6], "density": [0.5, 0.8]},
              "model:b": {"weight": [0.8, 0.2], "density": [0.9, 0.4]}}

    def score(recipe, key):
        error = 0.0
        for ref, entry in zip(recipe.inputs, recipe.input_parameters):
            for name, values in entry.items():
                error += sum((v - t) ** 2 for v, t in zip(values, target[ref][name]))
        return -error, {"error": error}, False

    # Budget: 60 generations of 8 samples over an 8-dimensional vector; every seed from 0 to 19 passes.
    config = make_config(strategy="cmaes", layer_groups=2, population_size=8, generations=60,
                         early_stopping_patience=None, cmaes_sigma=0.3)
    strategy = make_strategy(config, model_info())
    run_search(strategy, score)
    best = strategy.best()
    assert best.recipe.method == "ties"
    assert best.metrics["error"] < 1e-3


def test_cmaes_vector_to_gradients():
    config = make_config(strategy="cmaes", layer_groups=2, cmaes_method="ties")
    strategy = make_strategy(config, model_info())
    recipe = strategy.vector_to_recipe(np.array([0.0, 1.0, 0.5, 1.0, 0.25, 0.75, 0.0, 0.0]))
    assert recipe.inputs == ("model:a", "model:b")
    assert recipe.base == "model:base"
    assert recipe.input_parameters[0] == {"weight": [0.0, 1.0], "density": [0.55, 1.0]}
    assert recipe.input_parameters[1] == {"weight": [0.25, 0.75], "density": [0.1, 0.1]}


def test_cmaes_failed_candidate_survives():
    config = make_config(strategy="cmaes", layer_groups=1, generations=3, early_stopping_patience=None)
    strategy = make_strategy(config, model_info())

    def score(recipe, key):
        weight = recipe.input_parameters[0]["weight"][0]
        if weight > 0.5:
            return WORST, {}, True
        return -weight, {}, False

    proposals = run_search(strategy, score)
    assert len(proposals) == 3
    assert strategy.best().recipe.input_parameters[0]["weight"][0] <= 0.5


# -- layer paths ----------------------------------------------------------------------------


def test_dfs_finds_known_path():
    target = [("model:base", 0), ("model:base", 1), ("model:a", 2), ("model:a", 3)]

    def score(recipe, key):
        steps = [(ref, layer) for ref, layer, _ in recipe.layer_path]
        missing = len(set(target) - set(steps))
        extra = len(steps) - len(set(steps) & set(target))
        order_penalty = 0 if steps == target else 0.5
        scale_penalty = sum(abs(scale - 1.0) for _, _, scale in recipe.layer_path)
        return -(missing + extra + order_penalty + scale_penalty), {}, False

    # Budget: 40 generations of 8 over 8 slots (2 models x 4 layers, 1 repeat).
    # Every seed from 0 to 19 except 10 passes.
    config = make_config(names=("base", "a"), strategy="dfs", dfs_repeats=1, population_size=8, generations=40,
                         early_stopping_patience=None)
    strategy = make_strategy(config, model_info(("base", "a")))
    run_search(strategy, score)
    best = strategy.best()
    assert [(ref, layer) for ref, layer, _ in best.recipe.layer_path] == target
    assert all(abs(scale - 1.0) < 0.15 for _, _, scale in best.recipe.layer_path)


def test_dfs_starts_with_identities():
    config = make_config(strategy="dfs", population_size=4)
    recipes = make_strategy(config, model_info()).propose()
    first_path = [(ref, layer) for ref, layer, _ in recipes[0].layer_path]
    assert first_path == [("model:base", layer) for layer in range(4)]
    assert recipes[0].base == "model:base"


# -- state, stopping, Pareto ------------------------------------------------------------------


@pytest.mark.parametrize("strategy_name", ["tournament", "cmaes", "dfs"])
def test_state_round_trip_same_proposals(strategy_name):
    config = make_config(techniques=ALL_TECHNIQUES, strategy=strategy_name, generations=6, early_stopping_patience=None)
    score = lambda recipe, key: (-(int(key[:6], 16) % 89) / 89.0, {"perplexity": 3.0}, False)  # noqa: E731
    original = make_strategy(config, model_info())
    for _ in range(3):
        recipes = original.propose()
        original.observe([Observation(r, original.key_of(r), *score(r, original.key_of(r))) for r in recipes])
    state = json.loads(json.dumps(original.state_dict(), allow_nan=False))

    restored = make_strategy(config, model_info())
    restored.load_state_dict(state)
    assert restored.generation == 3
    assert restored.best() == original.best()
    assert [r.canonical_json() for r in restored.propose()] == [r.canonical_json() for r in original.propose()]


def test_state_keeps_pending_proposals():
    config = make_config(generations=4)
    original = make_strategy(config, model_info())
    pending = original.propose()
    restored = make_strategy(config, model_info())
    restored.load_state_dict(original.state_dict())
    assert restored.propose() == pending


def test_state_failed_fitness_round_trip():
    config = make_config(generations=4)
    original = make_strategy(config, model_info())
    recipes = original.propose()
    original.observe([Observation(r, original.key_of(r), -math.inf, {}, True, "boom") for r in recipes])
    state = json.loads(json.dumps(original.state_dict(), allow_nan=False))
    restored = make_strategy(config, model_info())
    restored.load_state_dict(state)
    assert restored.observations()[0].fitness == -math.inf
    assert restored.observations()[0].error == "boom"


def test_state_other_seed_rejected():
    original = make_strategy(make_config(seed=1), model_info())
    original.propose()
    with pytest.raises(ConfigError, match="seed 1"):
        make_strategy(make_config(seed=2), model_info()).load_state_dict(original.state_dict())


def test_state_other_config_rejected():
    original = make_strategy(make_config(techniques=["ties"]), model_info())
    recipes = original.propose()
    original.observe([Observation(r, original.key_of(r), 1.0, {}) for r in recipes])
    changed = make_strategy(make_config(techniques=["linear"]), model_info())
    with pytest.raises(ConfigError, match="replaying generation 0"):
        changed.load_state_dict(original.state_dict())


def test_early_stopping_after_patience():
    config = make_config(generations=10, early_stopping_patience=2)
    strategy = make_strategy(config, model_info())
    run_search(strategy, constant_score)
    # Generation 0 sets the best; generations 1 and 2 do not beat it.
    assert strategy.generation == 3
    assert strategy.finished()


def test_generations_limit_stops():
    config = make_config(generations=2, early_stopping_patience=None)
    strategy = make_strategy(config, model_info())
    run_search(strategy, constant_score)
    assert strategy.generation == 2


def hand_made_observations():
    points = {
        "A": ({"perplexity": 10.0, "accuracy": 0.5}, False),
        "B": ({"perplexity": 12.0, "accuracy": 0.7}, False),
        "C": ({"perplexity": 11.0, "accuracy": 0.4}, False),  # dominated by A
        "D": ({"perplexity": 9.0, "accuracy": 0.3}, False),
        "E": ({"perplexity": 5.0, "accuracy": 0.9}, True),  # failed
        "F": ({"perplexity": 8.0}, False),  # no accuracy
        "G": ({"perplexity": 12.0, "accuracy": 0.5}, False),  # dominated by A and B, not by C
    }
    recipe = Recipe(method="linear", inputs=("model:a", "model:b"))
    return [Observation(recipe, key, 0.0, metrics, failed) for key, (metrics, failed) in points.items()]


def test_pareto_front_hand_made():
    front = pareto.pareto_front(hand_made_observations(), ["perplexity", "accuracy"])
    assert [obs.key for obs in front] == ["A", "B", "D"]


def test_pareto_ranks_hand_made():
    ranks = pareto.non_dominated_ranks(hand_made_observations(), ["perplexity", "accuracy"])
    assert ranks == [0, 0, 1, 0, 2, 2, 1]


def test_metric_directions():
    assert pareto.metric_sign("perplexity") == -1.0
    assert pareto.metric_sign("heldout_perplexity") == -1.0
    assert pareto.metric_sign("eval_loss") == -1.0
    assert pareto.metric_sign("accuracy") == 1.0


def test_strategy_pareto_front():
    config = make_config(objectives=["perplexity", "accuracy"], population_size=7)
    strategy = make_strategy(config, model_info())
    recipes = strategy.propose()
    observations = [
        Observation(recipe, strategy.key_of(recipe), obs.fitness, obs.metrics, obs.failed)
        for recipe, obs in zip(recipes, hand_made_observations())
    ]
    strategy.observe(observations)
    front = strategy.pareto_front()
    assert [obs.key for obs in front] == [observations[i].key for i in (0, 1, 3)]


def test_single_objective_no_front():
    strategy = make_strategy(make_config(), model_info())
    recipes = strategy.propose()
    strategy.observe([Observation(r, strategy.key_of(r), 1.0, {"perplexity": 2.0}) for r in recipes])
    assert strategy.pareto_front() == []


def test_multi_objective_ranks_front_first():
    config = make_config(objectives=["perplexity", "accuracy"])
    strategy = make_strategy(config, model_info())
    ordered = strategy.rank_order(hand_made_observations())
    assert [obs.key for obs in ordered][:3] == ["A", "B", "D"]
    assert "E" not in [obs.key for obs in ordered]


# -- configuration errors ---------------------------------------------------------------------


def test_unknown_technique_suggests():
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        make_strategy(make_config(techniques=["tie"]), model_info())


def test_cmaes_too_many_groups():
    with pytest.raises(ConfigError, match="layer_groups is 5 but the models have 4 layers"):
        make_strategy(make_config(strategy="cmaes", layer_groups=5), model_info())


def test_cmaes_small_population_rejected():
    config = make_config(strategy="cmaes", population_size=3, elite_count=1)
    with pytest.raises(ConfigError, match="population_size is 3, but the cmaes strategy needs at least 4"):
        make_strategy(config, model_info())


def test_cmaes_layer_method_rejected():
    with pytest.raises(ConfigError, match="'passthrough' is not a parameter-space method"):
        make_strategy(make_config(strategy="cmaes", cmaes_method="passthrough"), model_info())


def test_layer_counts_must_match():
    info = model_info()
    info["b"] = ModelInfo(num_layers=6, fingerprint="fp-b")
    with pytest.raises(ConfigError, match="different layer counts"):
        make_strategy(make_config(), info)
