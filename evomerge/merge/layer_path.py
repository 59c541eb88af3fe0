"""The layer-path genome that the evolutionary search mutates.

A layer path (the data-flow-space, or DFS, merge of Akiba et al.,
"Evolutionary Optimization of Model Merging Recipes", Nature Machine
Intelligence, 2025) runs the layers of several models of one architecture in a
chosen order. The genome lays out
``T = repeats * len(model_names) * layers_per_model`` slots in the order
(repeat, model, layer). With ``M`` models of ``L`` layers, slot ``i`` is layer
``i % L`` of model ``(i // L) % M`` in repeat ``i // (M * L)``. An indicator
array selects the slots the path includes, and the path visits the included
slots in slot order. A scale array gives each slot's input scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.exceptions import ConfigError
from evomerge.merge.spec import LayerStep, MergeSpec


@dataclass(frozen=True)
class LayerPathGenome:
    """The search space of layer paths over ``model_names``, each with ``layers_per_model`` layers."""

    model_names: tuple[str, ...]
    layers_per_model: int
    repeats: int = 2
    max_path_length: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_names", tuple(self.model_names))
        if len(self.model_names) < 2:
            raise ConfigError(
                f"a layer path needs at least 2 models, got {list(self.model_names)}: add another model"
            )
        if len(set(self.model_names)) != len(self.model_names):
            raise ConfigError(f"model_names {list(self.model_names)} contains duplicates: give each model once")
        if self.layers_per_model < 1:
            raise ConfigError(f"layers_per_model is {self.layers_per_model}: give the models' layer count (>= 1)")
        if self.repeats < 1:
            raise ConfigError(f"repeats is {self.repeats}: each layer must be available at least once (>= 1)")
        if self.max_path_length is not None and self.max_path_length < 1:
            raise ConfigError(f"max_path_length is {self.max_path_length}: give a length >= 1 or None for no limit")

    @property
    def size(self) -> int:
        """Number of slots ``T``, the length of the indicator and scale arrays."""
        return self.repeats * len(self.model_names) * self.layers_per_model

    def slot(self, index: int) -> tuple[int, str, int]:
        """Return the (repeat, model name, layer) of slot ``index``."""
        per_repeat = len(self.model_names) * self.layers_per_model
        repeat, rest = divmod(index, per_repeat)
        model_index, layer = divmod(rest, self.layers_per_model)
        return repeat, self.model_names[model_index], layer

    def slot_index(self, repeat: int, model_name: str, layer: int) -> int:
        """Return the slot index of layer ``layer`` of ``model_name`` in repeat ``repeat``."""
        model_index = self.model_names.index(model_name)
        return (repeat * len(self.model_names) + model_index) * self.layers_per_model + layer

    def validate(self, indicator: Sequence[int | bool] | np.ndarray, scales: Sequence[float] | np.ndarray) -> None:
        """Raise ``ConfigError`` unless the arrays describe a non-empty path of allowed length.

        Only the scales of included slots must be finite and positive, because
        the scales of excluded slots never reach the model.
        """
        included = self._included(indicator)
        scale_array = np.asarray(scales, dtype=np.float64).reshape(-1)
        if scale_array.shape[0] != self.size:
            raise ConfigError(
                f"scales has {scale_array.shape[0]} entries but the genome has {self.size} slots "
                f"({self.repeats} repeats x {len(self.model_names)} models x {self.layers_per_model} layers)"
            )
        if not included.any():
            raise ConfigError("the indicator includes no slot, so the layer path is empty: set at least one entry to 1")
        path_length = int(included.sum())
        if self.max_path_length is not None and path_length > self.max_path_length:
            raise ConfigError(
                f"the layer path has {path_length} steps, more than max_path_length={self.max_path_length}: "
                "include fewer slots"
            )
        for index in np.flatnonzero(included):
            value = float(scale_array[index])
            if not math.isfinite(value) or value <= 0.0:
                repeat, name, layer = self.slot(int(index))
                raise ConfigError(
                    f"scale {value} at slot {index} (model {name!r}, layer {layer}, repeat {repeat}) is invalid: "
                    "a layer path input scale must be a finite number > 0"
                )

    def decode(
        self, indicator: Sequence[int | bool] | np.ndarray, scales: Sequence[float] | np.ndarray
    ) -> list[LayerStep]:
        """Convert indicator and scale arrays into the layer path they describe."""
        self.validate(indicator, scales)
        included = self._included(indicator)
        scale_array = np.asarray(scales, dtype=np.float64).reshape(-1)

        steps = []
        for index in np.flatnonzero(included):
            _, name, layer = self.slot(int(index))
            steps.append(LayerStep(model=name, layer=layer, scale=float(scale_array[index])))
        return steps

    def encode(self, steps: Sequence[LayerStep]) -> tuple[np.ndarray, np.ndarray]:
        """Convert a layer path into (indicator, scales); excluded slots get scale 1.0.

        A path is representable when its steps can be matched to slots in
        increasing slot order. Each step takes the earliest free slot for its
        (model, layer), which finds a match whenever one exists.
        """
        indicator = np.zeros(self.size, dtype=np.int8)
        scales = np.ones(self.size, dtype=np.float64)

        previous = -1
        for position, step in enumerate(steps):
            if step.model not in self.model_names:
                raise ConfigError(
                    f"layer path step {position} names model {step.model!r}, which is not in the genome's "
                    f"models {list(self.model_names)}: use one of those names"
                )
            if step.layer >= self.layers_per_model:
                raise ConfigError(
                    f"layer path step {position} uses layer {step.layer} of {step.model!r}, but the models have "
                    f"{self.layers_per_model} layers: use a layer index below {self.layers_per_model}"
                )
            candidates = [self.slot_index(repeat, step.model, step.layer) for repeat in range(self.repeats)]
            later = [index for index in candidates if index > previous]
            if not later:
                raise ConfigError(
                    f"layer path step {position} (model {step.model!r}, layer {step.layer}) cannot be placed after "
                    f"slot {previous}: the genome visits slots in (repeat, model, layer) order with "
                    f"repeats={self.repeats}, so raise repeats or reorder the path"
                )
            previous = later[0]
            indicator[previous] = 1
            scales[previous] = step.scale

        self.validate(indicator, scales)
        return indicator, scales

    def random(
        self, rng: np.random.Generator, include_probability: float = 0.5
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw a valid random path: each slot is included with ``include_probability``, all scales 1.0.

        An empty draw includes one random slot, and a draw longer than
        ``max_path_length`` keeps a random subset of that length.
        """
        if not 0.0 < include_probability <= 1.0:
            raise ConfigError(f"include_probability is {include_probability}: give a probability in (0, 1]")

        indicator = (rng.random(self.size) < include_probability).astype(np.int8)
        if not indicator.any():
            indicator[rng.integers(self.size)] = 1
        if self.max_path_length is not None and indicator.sum() > self.max_path_length:
            keep = rng.choice(np.flatnonzero(indicator), size=self.max_path_length, replace=False)
            indicator[:] = 0
            indicator[keep] = 1

        return indicator, np.ones(self.size, dtype=np.float64)

    def identity(self, model_name: str) -> tuple[np.ndarray, np.ndarray]:
        """Return the path through all layers of ``model_name`` in order, all scales 1.0."""
        if model_name not in self.model_names:
            raise ConfigError(
                f"model {model_name!r} is not in the genome's models {list(self.model_names)}: use one of those names"
            )
        indicator = np.zeros(self.size, dtype=np.int8)
        start = self.slot_index(0, model_name, 0)
        indicator[start : start + self.layers_per_model] = 1
        return indicator, np.ones(self.size, dtype=np.float64)

    def _included(self, indicator: Sequence[int | bool] | np.ndarray) -> np.ndarray:
        """Return the indicator as a boolean array after checking its length and values."""
        array = np.asarray(indicator).reshape(-1)
        if array.shape[0] != self.size:
            raise ConfigError(
                f"indicator has {array.shape[0]} entries but the genome has {self.size} slots "
                f"({self.repeats} repeats x {len(self.model_names)} models x {self.layers_per_model} layers)"
            )
        invalid = [value for value in array.tolist() if value not in (0, 1)]
        if invalid:
            raise ConfigError(f"indicator contains {invalid[0]!r}: every entry must be 0 or 1 (or a bool)")
        return array.astype(bool)


def layer_path_spec(
    steps: list[LayerStep],
    model_paths: Mapping[str, str],
    embed_model: str,
    **kwargs: Any,
) -> MergeSpec:
    """Build a ``dfs`` merge spec from a path over model names and a name-to-path mapping.

    ``kwargs`` are further ``MergeSpec`` fields, for example ``out_dtype`` or
    ``merge_method="ps_dfs"`` with ``models`` and ``parameters`` for the
    parameter-space step.
    """
    if not steps:
        raise ConfigError("the layer path is empty: give at least one step")
    for position, step in enumerate(steps):
        if step.model not in model_paths:
            raise ConfigError(
                f"layer path step {position} names model {step.model!r}, which has no path: "
                f"known models are {sorted(model_paths)}"
            )
    if embed_model not in model_paths:
        raise ConfigError(
            f"embed_model {embed_model!r} has no path: known models are {sorted(model_paths)}"
        )

    resolved = [
        LayerStep(model=model_paths[step.model], layer=step.layer, scale=step.scale) for step in steps
    ]
    fields = {"merge_method": "dfs", **kwargs}
    return MergeSpec(layer_path=resolved, embed_model=model_paths[embed_model], **fields)
