"""Resolution of spec parameter values to one number for one tensor.

A value is one of:

* a scalar, used for every tensor;
* a gradient, a list of numbers interpolated linearly over the layer
  position: layer ``i`` of ``L`` sits at ``i / (L - 1)`` of the list (1 when
  ``L == 1``, as in mergekit's ``plan.py``), so ``[0, 1]`` gives 0 at the first layer and 1 at the last;
* a list of conditionals ``{filter, value}``: the first entry whose filter is a
  substring of the tensor name wins, an entry without a filter is the
  fallback wherever it appears, and the chosen value may itself be a gradient.
  When nothing matches and there is no fallback, the parameter is unset and
  the method's default applies.

The layer index comes from ``layers.<N>.`` (or ``h.<N>.``, ``blocks.<N>.``,
``layer.<N>.``) in the tensor name. Tensors outside the layers take the
positions mergekit's ``plan.py`` gives them. Embeddings (a name containing
``embed``, ``wte`` or ``wpe``) sit at position 0. Everything else, such as the
final norm and ``lm_head``, sits at position 1.

Per-model values override the spec's global values of the same name.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from evomerge.exceptions import ConfigError
from evomerge.merge.spec import ConditionalValue

LAYER_INDEX_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
EMBEDDING_NAME_PARTS = ("embed", "wte", "wpe")


def layer_index(tensor_name: str) -> int | None:
    """Return the layer number in ``tensor_name`` (``model.layers.3.mlp`` gives 3), or None outside the layers."""
    match = LAYER_INDEX_PATTERN.search(tensor_name)
    return int(match.group(1)) if match else None


def layer_position(tensor_name: str, num_layers: int) -> float:
    """Return the tensor's position in [0, 1] along the layer stack, as the module docstring defines."""
    index = layer_index(tensor_name)
    if index is None:
        return 0.0 if any(part in tensor_name for part in EMBEDDING_NAME_PARTS) else 1.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, index / (num_layers - 1))


def interpolate_gradient(gradient: list[float], position: float) -> float:
    """Return the gradient's value at ``position`` in [0, 1], interpolating between neighbours."""
    if not gradient:
        raise ConfigError("a gradient parameter is an empty list: give at least one number")
    if len(gradient) == 1:
        return float(gradient[0])

    scaled = position * (len(gradient) - 1)
    lower = min(int(math.floor(scaled)), len(gradient) - 2)
    fraction = scaled - lower
    return (1.0 - fraction) * float(gradient[lower]) + fraction * float(gradient[lower + 1])


def _is_conditional_list(value: Any) -> bool:
    """Return True for a list of ``{filter, value}`` entries."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(entry, (ConditionalValue, dict)) for entry in value
    )


def resolve_value(value: Any, tensor_name: str, num_layers: int) -> float | bool | None:
    """Resolve a scalar, gradient or conditional list to one value for ``tensor_name``, or None when unset."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value)

    if _is_conditional_list(value):
        entries = [entry if isinstance(entry, ConditionalValue) else ConditionalValue(**entry) for entry in value]
        fallback = None
        for entry in entries:
            if entry.filter is None:
                fallback = entry if fallback is None else fallback
            elif entry.filter in tensor_name:
                return resolve_value(entry.value, tensor_name, num_layers)
        return None if fallback is None else resolve_value(fallback.value, tensor_name, num_layers)

    if isinstance(value, list):
        if not all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
            raise ConfigError(f"parameter value {value!r} is neither a gradient of numbers nor a list of {{filter, value}} entries")
        return interpolate_gradient(value, layer_position(tensor_name, num_layers))

    raise ConfigError(f"parameter value {value!r} is not a number, a gradient or a list of {{filter, value}} entries")


def resolve_parameters(
    names: frozenset[str] | set[str],
    values: Mapping[str, Any],
    tensor_name: str,
    num_layers: int,
    defaults: Mapping[str, float | bool],
    fallbacks: Mapping[str, Any] | None = None,
) -> dict[str, float | bool]:
    """Resolve every parameter in ``names`` for one tensor.

    ``values`` contains the values with priority (a model's own parameters),
    ``fallbacks`` the values used where those are unset (the spec's global
    parameters), and ``defaults`` the method's defaults. Names set nowhere are
    left out, so the caller can report a missing required parameter.
    """
    resolved: dict[str, float | bool] = {}
    for name in names:
        value = None
        if name in values:
            value = resolve_value(values[name], tensor_name, num_layers)
        if value is None and fallbacks is not None and name in fallbacks:
            value = resolve_value(fallbacks[name], tensor_name, num_layers)
        if value is None and name in defaults:
            value = defaults[name]
        if value is not None:
            resolved[name] = value
    return resolved
