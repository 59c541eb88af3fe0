"""Model Stock: move from the base towards the average of the fine-tunes by a ratio set by their angle.

The interpolation ratio is ``t = N cos(theta) / (1 + (N - 1) cos(theta))``,
with ``cos(theta)`` the mean pairwise cosine of the task vectors
``x_i - base``, and the result is ``t * mean_i(x_i) + (1 - t) * base``. The
cosine is taken over the whole tensor, or per row with ``filter_wise``. This
follows mergekit's ``model_stock.py`` (github.com/arcee-ai/mergekit), which
cites the Model Stock paper, arXiv:2403.19522.
"""

from __future__ import annotations

import torch

from evomerge.exceptions import MergeError


def model_stock_merge(
    inputs: list[torch.Tensor],
    base: torch.Tensor | None,
    per_model: list[dict[str, float]],
    options: dict[str, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return ``t * mean(x_i) + (1 - t) * base`` with ``t`` from the mean pairwise cosine of the task vectors."""
    if base is None:
        raise MergeError("model_stock needs a base tensor: set base_model to the model the fine-tunes share")
    if len(inputs) < 2:
        raise MergeError(f"model_stock needs at least two models besides the base, got {len(inputs)}: add models")

    shape = base.shape
    if options.get("filter_wise", False):
        # A 1-D tensor such as a bias is one row.
        rows = (1, -1) if base.dim() < 2 else (shape[0], -1)
        base_rows = base.reshape(rows)
        model_rows = [tensor.reshape(rows) for tensor in inputs]
    else:
        base_rows = base.reshape(1, -1)
        model_rows = [tensor.reshape(1, -1) for tensor in inputs]

    offsets = [rows - base_rows for rows in model_rows]
    cosines = []
    for first in range(len(offsets)):
        for second in range(first + 1, len(offsets)):
            norms = torch.linalg.vector_norm(offsets[first], dim=-1) * torch.linalg.vector_norm(offsets[second], dim=-1)
            dot = (offsets[first] * offsets[second]).sum(dim=-1)
            cosines.append((dot / norms.clamp(min=1e-6)).clamp(-1.0, 1.0))
    cosine = torch.stack(cosines).mean(dim=0).unsqueeze(-1)

    count = len(inputs)
    # NOTE: a mean cosine of exactly -1/(N-1) makes the denominator 0; it is clamped away from 0 here.
    denominator = 1.0 + (count - 1) * cosine
    denominator = torch.where(denominator.abs() < 1e-6, torch.full_like(denominator, 1e-6), denominator)
    ratio = count * cosine / denominator

    average = torch.stack(model_rows).mean(dim=0)
    merged = ratio * average + (1.0 - ratio) * base_rows
    return merged.reshape(shape)
