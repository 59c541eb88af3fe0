"""Parameter ranges and the random draws and mutations of recipe genes.

The ranges bound both the initial draws and the mutations: a mutated value
is clipped back into its range. ``epsilon`` is further clipped to
``min(density, 1 - density)`` so that DELLA's keep probabilities
``density +- epsilon`` stay inside [0, 1].
"""

from __future__ import annotations

import numpy as np

from evomerge.merge.layer_path import LayerPathGenome

# (low, high) of each tuned parameter; values outside are clipped.
PARAMETER_RANGES: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.1, 1.0),
    "t": (0.0, 1.0),
    "lambda": (0.5, 1.5),
    "gamma": (0.0, 0.2),
    "epsilon": (0.0, 0.2),
}
# Per-input parameters the tournament draws and mutates, where the method accepts them.
TUNED_PER_MODEL = ("weight", "density", "gamma", "epsilon")
# Global parameters the tournament draws and mutates, where the method accepts them.
TUNED_GLOBAL = ("t", "lambda")
# Input scales of layer-path steps stay in this range.
PATH_SCALE_RANGE = (0.5, 1.5)
# Methods whose merge draws random drop masks and therefore needs a recipe seed.
SEEDED_METHODS = frozenset({"dare_linear", "dare_ties", "della", "della_linear"})


def draw_value(name: str, rng: np.random.Generator) -> float:
    """Draw a parameter uniformly from its range."""
    low, high = PARAMETER_RANGES[name]
    return float(rng.uniform(low, high))


def clip_value(name: str, value: float) -> float:
    """Clip a parameter into its range."""
    low, high = PARAMETER_RANGES[name]
    return float(min(max(value, low), high))


def perturb_value(name: str, value: float, scale: float, rng: np.random.Generator) -> float:
    """Add Gaussian noise of ``scale`` times the parameter's range width, then clip."""
    low, high = PARAMETER_RANGES[name]
    return clip_value(name, value + float(rng.normal(0.0, scale * (high - low))))


def fix_epsilon(parameters: dict[str, float]) -> dict[str, float]:
    """Clip ``epsilon`` to ``min(density, 1 - density)`` when both are present."""
    if "epsilon" in parameters and "density" in parameters:
        density = parameters["density"]
        parameters["epsilon"] = min(parameters["epsilon"], density, 1.0 - density)
    return parameters


def mutate_path(
    genome: LayerPathGenome,
    indicator: np.ndarray,
    scales: np.ndarray,
    rate: float,
    scale_sigma: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Flip indicator slots and perturb the scales of included slots.

    Each slot flips with probability ``rate / layers_per_model``, so a path
    expects ``rate * repeats * len(models)`` flips whatever the depth, and at
    least one slot flips. Each included scale moves by N(0, scale_sigma) with
    probability ``rate``. Excluded slots keep scale 1.0 so that one path has
    one genotype. A mutation that would empty the path keeps one slot.
    """
    indicator = np.array(indicator, dtype=np.int8)
    scales = np.array(scales, dtype=np.float64)

    flips = rng.random(genome.size) < rate / genome.layers_per_model
    if not flips.any():
        flips[rng.integers(genome.size)] = True
    indicator[flips] = 1 - indicator[flips]
    if not indicator.any():
        indicator[int(np.flatnonzero(flips)[0])] = 1

    moves = (rng.random(genome.size) < rate) & (indicator == 1)
    scales[moves] += rng.normal(0.0, scale_sigma, size=int(moves.sum()))
    scales = np.clip(scales, *PATH_SCALE_RANGE)
    scales[indicator == 0] = 1.0
    return indicator, scales
