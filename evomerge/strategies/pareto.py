"""Pareto dominance over several metrics of the observed candidates.

A metric whose name contains "perplexity" or ends with "loss" is minimised;
every other metric is maximised. Failed candidates and candidates that lack
one of the objective metrics take no part in the front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def metric_sign(name: str) -> float:
    """Return +1 for a metric where higher is better and -1 for one where lower is better."""
    lowered = name.lower()
    if "perplexity" in lowered or lowered.endswith("loss"):
        return -1.0
    return 1.0


def objective_vector(observation: Any, objectives: Sequence[str]) -> tuple[float, ...] | None:
    """Return the metrics as a tuple to maximise, or None when the observation cannot be compared."""
    if observation.failed:
        return None
    values = []
    for name in objectives:
        value = observation.metrics.get(name)
        if value is None or not math.isfinite(value):
            return None
        values.append(metric_sign(name) * float(value))
    return tuple(values)


def dominates(first: Sequence[float], second: Sequence[float]) -> bool:
    """Return whether ``first`` is at least as good everywhere and better somewhere (both maximised)."""
    at_least_as_good = all(a >= b for a, b in zip(first, second, strict=True))
    better_somewhere = any(a > b for a, b in zip(first, second, strict=True))
    return at_least_as_good and better_somewhere


def non_dominated_ranks(observations: Sequence[Any], objectives: Sequence[str]) -> list[int]:
    """Return each observation's front number: 0 for the Pareto front, 1 for the next, and so on.

    Observations that cannot be compared get one more than the last front.
    """
    vectors = [objective_vector(observation, objectives) for observation in observations]
    ranks = [-1] * len(observations)
    remaining = [index for index, vector in enumerate(vectors) if vector is not None]

    front_number = 0
    while remaining:
        front = [
            index
            for index in remaining
            if not any(dominates(vectors[other], vectors[index]) for other in remaining if other != index)
        ]
        for index in front:
            ranks[index] = front_number
        remaining = [index for index in remaining if index not in front]
        front_number += 1

    return [front_number if rank < 0 else rank for rank in ranks]


def pareto_front(observations: Sequence[Any], objectives: Sequence[str]) -> list[Any]:
    """Return the non-dominated observations in their original order; duplicates by key appear once."""
    ranks = non_dominated_ranks(observations, objectives)
    front = []
    keys = set()
    for observation, rank in zip(observations, ranks, strict=True):
        if rank == 0 and objective_vector(observation, objectives) is not None and observation.key not in keys:
            keys.add(observation.key)
            front.append(observation)
    return front
