"""Interpolation merges: linear, slerp and nuslerp.

Each function merges one tensor name. Inputs arrive as float32 tensors of one
shape, ``per_model`` contains each input's resolved per-model parameters and
``options`` the resolved global parameters, as ``evomerge.merge.registry``
describes. The semantics follow mergekit's ``linear.py``, ``slerp.py`` and
``nuslerp.py`` (github.com/arcee-ai/mergekit).
"""

from __future__ import annotations

import math

import torch

from evomerge.exceptions import MergeError

# Unit vectors with |cos| above this are treated as parallel and lerped, as in mergekit.
PARALLEL_COSINE_THRESHOLD = 0.9995

# Norms below this count as zero vectors, which have no direction to rotate.
ZERO_NORM_EPSILON = 1e-8

WEIGHT_SUM_ZERO_MESSAGE = "weights sum to 0 under normalize=true: give at least one non-zero weight or set normalize=false"


def weight_sum_divisor(weights: list[float]) -> float:
    """Return the sum of ``weights``, raising MergeError when it is 0."""
    total = math.fsum(weights)
    if abs(total) < 1e-12:
        raise MergeError(f"{WEIGHT_SUM_ZERO_MESSAGE} (weights {weights})")
    return total


def linear_merge(
    inputs: list[torch.Tensor],
    base: torch.Tensor | None,
    per_model: list[dict[str, float]],
    options: dict[str, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Average the inputs: ``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize`` is true.

    ``base`` is not used, because a linear merge has no base role.
    """
    weights = [float(parameters["weight"]) for parameters in per_model]
    merged = torch.zeros_like(inputs[0])
    for weight, tensor in zip(weights, inputs):
        merged.add_(tensor, alpha=weight)

    if options.get("normalize", True):
        merged.div_(weight_sum_divisor(weights))
    return merged


def lerp(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Interpolate linearly: ``(1 - t) * start + t * end``."""
    return (1.0 - t) * start + t * end


def slerp(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Interpolate along the great circle between the flattened tensors.

    ``sin((1 - t) * theta) / sin(theta) * start + sin(t * theta) / sin(theta) * end``
    with ``cos(theta)`` the cosine of the two tensors. Parallel or opposite
    tensors (|cos| > 0.9995) and zero tensors fall back to ``lerp``, so the
    result is finite for every finite input.
    """
    start_norm = torch.linalg.vector_norm(start).item()
    end_norm = torch.linalg.vector_norm(end).item()
    if start_norm < ZERO_NORM_EPSILON or end_norm < ZERO_NORM_EPSILON:
        return lerp(t, start, end)

    cosine = (torch.sum(start * end).item() / (start_norm * end_norm))
    if abs(cosine) > PARALLEL_COSINE_THRESHOLD:
        return lerp(t, start, end)

    theta = math.acos(cosine)
    sin_theta = math.sin(theta)
    start_scale = math.sin((1.0 - t) * theta) / sin_theta
    end_scale = math.sin(t * theta) / sin_theta
    return start_scale * start + end_scale * end


def slerp_merge(
    inputs: list[torch.Tensor],
    base: torch.Tensor | None,
    per_model: list[dict[str, float]],
    options: dict[str, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Slerp from the base (t = 0) to the one other model (t = 1).

    Without a base the two inputs are the ends. ``t`` outside [0, 1] extrapolates.
    """
    endpoints = ([base] if base is not None else []) + list(inputs)
    if len(endpoints) != 2:
        raise MergeError(
            f"slerp merges exactly two models, got {len(endpoints)} "
            f"({len(inputs)} models{' plus a base' if base is not None else ''}): "
            "give base_model and one other model, or two models"
        )
    return slerp(float(options["t"]), endpoints[0], endpoints[1])


def nuslerp(
    t: float, start: torch.Tensor, end: torch.Tensor, *, flatten: bool = True, row_wise: bool = False
) -> torch.Tensor:
    """Slerp ``start`` to ``end`` as whole tensors or as separate vectors.

    ``flatten`` treats each tensor as one vector. Otherwise the vectors run
    along the last dimension, or along dimension 0 with ``row_wise`` (mergekit's
    ``nuslerp_row_wise``), and each is slerped on its own. Vectors that are
    (nearly) parallel, opposite or zero are lerped.
    """
    shape = start.shape
    if flatten or start.dim() < 2:
        start_vectors = start.reshape(1, -1)
        end_vectors = end.reshape(1, -1)
    elif row_wise:
        start_vectors = start.transpose(0, -1)
        end_vectors = end.transpose(0, -1)
    else:
        start_vectors = start
        end_vectors = end

    start_norms = torch.linalg.vector_norm(start_vectors, dim=-1, keepdim=True)
    end_norms = torch.linalg.vector_norm(end_vectors, dim=-1, keepdim=True)
    cosine = (start_vectors * end_vectors).sum(dim=-1, keepdim=True) / (start_norms * end_norms).clamp(min=1e-12)
    theta = torch.acos(cosine.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)

    # Vectors with no usable angle (parallel, opposite or zero) get a lerp instead.
    degenerate = (
        (cosine.abs() > PARALLEL_COSINE_THRESHOLD)
        | (start_norms < ZERO_NORM_EPSILON)
        | (end_norms < ZERO_NORM_EPSILON)
    )
    safe_sin = torch.where(degenerate, torch.ones_like(sin_theta), sin_theta)
    rotated = (torch.sin((1.0 - t) * theta) * start_vectors + torch.sin(t * theta) * end_vectors) / safe_sin
    merged = torch.where(degenerate, lerp(t, start_vectors, end_vectors), rotated)

    if row_wise and not flatten and start.dim() >= 2:
        merged = merged.transpose(0, -1)
    return merged.reshape(shape)


def nuslerp_merge(
    inputs: list[torch.Tensor],
    base: torch.Tensor | None,
    per_model: list[dict[str, float]],
    options: dict[str, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Slerp two models with ``t = w_2 / (w_1 + w_2)``; with a base, slerp their task vectors.

    With a base: ``base + nuslerp(t, x_1 - base, x_2 - base)``. Weights that sum
    to 0 give ``t = 0.5``, as in mergekit.
    """
    if len(inputs) != 2:
        raise MergeError(
            f"nuslerp merges exactly two models besides the base, got {len(inputs)}: list two models"
        )
    first_weight = float(per_model[0]["weight"])
    second_weight = float(per_model[1]["weight"])
    total = first_weight + second_weight
    t = 0.5 if abs(total) < 1e-6 else second_weight / total

    flatten = bool(options.get("nuslerp_flatten", True))
    row_wise = bool(options.get("nuslerp_row_wise", False))
    if base is None:
        return nuslerp(t, inputs[0], inputs[1], flatten=flatten, row_wise=row_wise)
    return base + nuslerp(t, inputs[0] - base, inputs[1] - base, flatten=flatten, row_wise=row_wise)
