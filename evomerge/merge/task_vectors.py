"""Task-vector merges: task arithmetic, TIES, DARE, breadcrumbs and DELLA.

All eight methods are one computation with two switches, as in mergekit's
``generalized_task_arithmetic.py`` (github.com/arcee-ai/mergekit):

1. task vectors ``d_i = x_i - base``;
2. sparsify each ``d_i`` with the method's sparsifier and the model's ``density``;
3. with sign consensus (the TIES methods) keep per entry only the weighted
   deltas whose sign matches the sign of ``sum_i w_i d_i``;
4. ``merged = sum_i w_i d_i`` over the kept entries, divided by the sum of the
   kept weights when ``normalize`` is true;
5. ``output = base + lambda * merged``.

Density rules: ``density >= 1`` keeps every entry and ``density <= 0`` drops
the whole task vector, which gives the base. When ``density * numel`` rounds
down to 0 for a positive density, the magnitude sparsifiers keep the single
largest entry. mergekit's ``magnitude()`` fails an assertion in that case and
its ``build_mask()`` keeps nothing. Keeping one entry means a tiny tensor such
as a 1-element bias still receives some of the task vector.
"""

from __future__ import annotations

from typing import Literal

import torch

from evomerge.exceptions import MergeError
from evomerge.merge.linear import weight_sum_divisor

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "rank_magnitude"]


def _kept_count(density: float, numel: int) -> int:
    """Return how many entries a density keeps, at least 1 when density is positive."""
    return max(1, int(density * numel))


def _rescale_l1(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Scale ``pruned`` so that its L1 norm equals that of ``original``."""
    before = original.abs().sum()
    after = pruned.abs().sum()
    if before.item() < 1e-12 or after.item() < 1e-12:
        return pruned
    return pruned * (before / after)


def _bernoulli_mask(keep_probability: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw a 0/1 mask on the CPU, so a CPU generator gives the same mask for tensors on any device."""
    mask = torch.bernoulli(keep_probability.cpu(), generator=generator)
    return mask.to(keep_probability.device)


def magnitude_prune(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude and zero the rest.

    With ``rescale`` the kept entries are scaled to keep the L1 norm of ``delta``.
    Ties at the cut-off are broken by ``torch.topk``.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)

    flat = delta.reshape(-1)
    kept = _kept_count(density, flat.numel())
    indices = torch.topk(flat.abs(), kept, sorted=False).indices
    mask = torch.zeros_like(flat)
    mask[indices] = 1.0
    pruned = (flat * mask).reshape(delta.shape)
    return _rescale_l1(delta, pruned) if rescale else pruned


def outlier_prune(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Drop the largest ``gamma`` fraction by magnitude, then the smallest, so ``density`` remains.

    This is the breadcrumbs mask. ``kept = int(density * n)`` and ``top = int(gamma * n)``.
    When ``kept + top > n``, fewer large entries are dropped so that ``kept`` entries remain.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)

    flat = delta.reshape(-1)
    count = flat.numel()
    kept = _kept_count(density, count)
    top = min(int(gamma * count), count - kept)
    bottom = count - kept - top

    order = torch.argsort(flat.abs(), stable=True)
    mask = torch.zeros_like(flat)
    mask[order[bottom : count - top]] = 1.0
    pruned = (flat * mask).reshape(delta.shape)
    return _rescale_l1(delta, pruned) if rescale else pruned


def random_drop(
    delta: torch.Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE); with ``rescale`` divide the kept entries by ``density``."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)

    mask = _bernoulli_mask(torch.full_like(delta, density), generator)
    pruned = delta * mask
    return pruned / density if rescale else pruned


def rank_magnitude_drop(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop entries with probabilities ranked by magnitude (DELLA's MagPrune).

    Entries are ranked within each row of the tensor reshaped to
    ``(shape[0], -1)``, and a 1-D tensor is one row. The entry of rank r among
    n, smallest magnitude first, is kept with probability ``p_keep = density - epsilon + 2 * epsilon * r / (n - 1)``.
    With ``rescale`` the kept entries are divided by ``p_keep``, which is
    ``1 / (1 - p_drop)``. A 1-entry row is kept with probability ``density``.
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return torch.zeros_like(delta)
    if density - epsilon <= 0.0 or density + epsilon >= 1.0:
        limit = min(density, 1.0 - density)
        raise MergeError(
            f"epsilon {epsilon} with density {density} gives keep probabilities outside (0, 1): "
            f"choose epsilon below {limit:.6g} or move density away from 0 and 1"
        )

    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(torch.float32)
    if width > 1:
        rank_fraction = ranks / (width - 1)
    else:
        rank_fraction = torch.full_like(ranks, 0.5)

    keep_probability = (density - epsilon) + 2.0 * epsilon * rank_fraction
    mask = _bernoulli_mask(keep_probability, generator)
    pruned = rows * mask
    if rescale:
        pruned = pruned / keep_probability
    return pruned.reshape(delta.shape)


def _check_fraction(name: str, value: float, model_index: int) -> None:
    """Raise MergeError unless ``value`` lies in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise MergeError(f"{name} {value} of model {model_index} is outside [0, 1]: give a fraction between 0 and 1")


def sparsify(
    delta: torch.Tensor,
    sparsifier: Sparsifier | None,
    parameters: dict[str, float],
    rescale: bool,
    generator: torch.Generator | None,
    model_index: int,
) -> torch.Tensor:
    """Apply ``sparsifier`` to one task vector with that model's parameters."""
    if sparsifier is None:
        return delta

    density = float(parameters.get("density", 1.0))
    _check_fraction("density", density, model_index)
    if sparsifier == "magnitude":
        return magnitude_prune(delta, density, rescale)
    if sparsifier == "random":
        return random_drop(delta, density, rescale, generator)
    if sparsifier == "magnitude_outliers":
        gamma = float(parameters.get("gamma", 0.01))
        _check_fraction("gamma", gamma, model_index)
        return outlier_prune(delta, density, gamma, rescale)
    if sparsifier == "rank_magnitude":
        return rank_magnitude_drop(delta, density, float(parameters.get("epsilon", 0.15)), rescale, generator)
    raise ValueError(f"unknown sparsifier {sparsifier!r}")


def sign_consensus_mask(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """Return a mask of the entries whose sign matches the elected sign of their column.

    The elected sign is that of ``sum_i w_i d_i``, with 0 counted as positive.
    Zero entries never match, so they do not count in the divisor.
    """
    elected = torch.where(weighted_deltas.sum(dim=0) >= 0, 1.0, -1.0)
    return (torch.sign(weighted_deltas) == elected).to(weighted_deltas.dtype)


def merge_task_vectors(
    inputs: list[torch.Tensor],
    base: torch.Tensor | None,
    per_model: list[dict[str, float]],
    options: dict[str, float],
    generator: torch.Generator | None,
    *,
    sparsifier: Sparsifier | None,
    consensus: bool,
) -> torch.Tensor:
    """Merge task vectors: ``base + lambda * sum_i w_i sparsify(x_i - base)``, see the module docstring."""
    if base is None:
        raise MergeError("task-vector merges need a base tensor: set base_model to the model the fine-tunes share")
    if not inputs:
        return base.clone()

    rescale = bool(options.get("rescale", False))
    deltas = [
        sparsify(tensor - base, sparsifier, parameters, rescale, generator, index)
        for index, (tensor, parameters) in enumerate(zip(inputs, per_model))
    ]
    weights = [float(parameters["weight"]) for parameters in per_model]
    normalize = bool(options.get("normalize", False))
    if normalize:
        weight_sum_divisor(weights)

    stacked = torch.stack(deltas)
    weight_column = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weight_column = weight_column.reshape((-1,) + (1,) * (stacked.dim() - 1))
    weighted = stacked * weight_column
    del deltas, stacked

    if consensus:
        mask = sign_consensus_mask(weighted)
        merged = (weighted * mask).sum(dim=0)
        divisor = (weight_column * mask).sum(dim=0)
        # Entries where no model agrees with the elected sign keep merged = 0.
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = weighted.sum(dim=0)
        divisor = weight_column.sum(dim=0)

    if normalize:
        merged = merged / divisor
    return base + float(options.get("lambda", 1.0)) * merged
