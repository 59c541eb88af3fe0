"""The table of merge methods, their parameters and their defaults.

A parameter-space method has a ``merge_tensor`` function that merges one
tensor name::

    merge_tensor(inputs, base, per_model, options, generator) -> Tensor

``inputs`` are the models' float32 tensors in the order of ``spec.models``.
When the method uses a base, entries naming the base model are left out and
``base`` is the base model's tensor, otherwise ``base`` is None.
``per_model`` contains each input's resolved per-model parameters, ``options``
the resolved global parameters, and ``generator`` is a ``torch.Generator``
seeded for this tensor. The result is float32.

A layer-space method (kind ``"layer"``) has no ``merge_tensor``. Its
implementation is ``evomerge.merge.layers.LAYER_MERGE_FUNCTIONS[name]``.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Literal, Mapping

import torch

from evomerge.exceptions import ConfigError
from evomerge.merge.linear import linear_merge, nuslerp_merge, slerp_merge
from evomerge.merge.model_stock import model_stock_merge
from evomerge.merge.task_vectors import Sparsifier, merge_task_vectors

MergeTensorFunction = Callable[
    [list[torch.Tensor], "torch.Tensor | None", list[dict[str, float]], dict[str, float], "torch.Generator | None"],
    torch.Tensor,
]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method: its kind, its parameters and, for parameter methods, its tensor function.

    ``needs_base`` means a spec without ``base_model`` is rejected. ``uses_base``
    means the base tensor is passed to ``merge_tensor`` when the spec names one.
    A parameter without an entry in ``defaults`` is required. ``tensor_threads``
    is how many tensor names the engine merges at once: 1 where torch's own
    kernels already use every core, more where the method spends its time in
    kernels that run on one core, such as random draws and sorting.
    """

    name: str
    kind: Literal["parameter", "layer"]
    needs_base: bool
    global_parameters: frozenset[str]
    per_model_parameters: frozenset[str]
    description: str
    merge_tensor: MergeTensorFunction | None = None
    uses_base: bool = False
    defaults: Mapping[str, float | bool] = field(default_factory=lambda: MappingProxyType({}))
    tensor_threads: int = 1

    def valid_parameters(self) -> frozenset[str]:
        """Return every name accepted in the spec's global ``parameters``.

        Per-model parameters are accepted there too and apply to every model
        that does not set its own value, as in mergekit.
        """
        return self.global_parameters | self.per_model_parameters

    def check_parameter_names(self, names: list[str] | set[str], *, per_model: bool, model: str | None = None) -> None:
        """Raise ConfigError naming the first parameter that this method does not accept."""
        valid = self.per_model_parameters if per_model else self.valid_parameters()
        for name in sorted(names):
            if name in valid:
                continue
            where = f"model {model!r}" if model else "parameters"
            close = difflib.get_close_matches(name, sorted(valid), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"unknown parameter {name!r} in {where} for merge method {self.name!r}: "
                f"{hint}valid names are {', '.join(sorted(valid)) or '(none)'}"
            )


def _task_vector_method(
    name: str,
    description: str,
    sparsifier: Sparsifier | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
) -> MergeMethod:
    """Build the registry entry of one task-vector method with mergekit's defaults."""
    per_model = {"weight", "density"}
    defaults: dict[str, float | bool] = {
        "density": 1.0,
        "normalize": normalize,
        "rescale": rescale,
        "lambda": 1.0,
        "int8_mask": False,
    }
    if sparsifier == "magnitude_outliers":
        per_model.add("gamma")
        defaults["gamma"] = 0.01
    if sparsifier == "rank_magnitude":
        per_model.add("epsilon")
        defaults["epsilon"] = 0.15

    merge_tensor = functools.partial(merge_task_vectors, sparsifier=sparsifier, consensus=consensus)
    return MergeMethod(
        name=name,
        kind="parameter",
        needs_base=True,
        # int8_mask only sets mergekit's mask dtype; it is accepted so mergekit configs load, and ignored.
        global_parameters=frozenset({"normalize", "rescale", "lambda", "int8_mask"}),
        per_model_parameters=frozenset(per_model),
        description=description,
        merge_tensor=merge_tensor,
        uses_base=True,
        defaults=MappingProxyType(defaults),
        # Random drops and DELLA's ranking sort run on one core.
        tensor_threads=2 if sparsifier in ("random", "rank_magnitude") else 1,
    )


def _layer_method(name: str, description: str) -> MergeMethod:
    """Build the registry entry of a layer-space method implemented in ``evomerge.merge.layers``."""
    return MergeMethod(
        name=name,
        kind="layer",
        needs_base=False,
        global_parameters=frozenset(),
        per_model_parameters=frozenset(),
        description=description,
    )


_METHODS = [
    MergeMethod(
        name="linear",
        kind="parameter",
        needs_base=False,
        global_parameters=frozenset({"normalize"}),
        per_model_parameters=frozenset({"weight"}),
        description="Weighted average of the models.",
        merge_tensor=linear_merge,
        defaults=MappingProxyType({"normalize": True}),
    ),
    MergeMethod(
        name="slerp",
        kind="parameter",
        needs_base=True,
        global_parameters=frozenset({"t"}),
        per_model_parameters=frozenset(),
        description="Spherical interpolation from the base (t=0) to the other model (t=1).",
        merge_tensor=slerp_merge,
        uses_base=True,
    ),
    MergeMethod(
        name="nuslerp",
        kind="parameter",
        needs_base=False,
        global_parameters=frozenset({"nuslerp_flatten", "nuslerp_row_wise"}),
        per_model_parameters=frozenset({"weight"}),
        description="Spherical interpolation of two models by weight, or of their task vectors when a base is given.",
        merge_tensor=nuslerp_merge,
        uses_base=True,
        defaults=MappingProxyType({"nuslerp_flatten": True, "nuslerp_row_wise": False}),
    ),
    _task_vector_method("task_arithmetic", "Base plus the weighted sum of task vectors.", None, False, False, False),
    _task_vector_method("ties", "Magnitude trim, sign election and disjoint mean of task vectors.", "magnitude", True, True, False),
    _task_vector_method("dare_linear", "Random drop and rescale of task vectors, then a weighted sum.", "random", False, False, True),
    _task_vector_method("dare_ties", "Random drop and rescale of task vectors, then TIES sign election.", "random", True, False, True),
    _task_vector_method("breadcrumbs", "Drop the largest and smallest task-vector entries, then a weighted sum.", "magnitude_outliers", False, False, False),
    _task_vector_method("breadcrumbs_ties", "Breadcrumbs pruning followed by TIES sign election.", "magnitude_outliers", True, False, False),
    _task_vector_method("della", "Magnitude-ranked random drop (DELLA) with TIES sign election.", "rank_magnitude", True, True, True),
    _task_vector_method("della_linear", "Magnitude-ranked random drop (DELLA), then a weighted sum.", "rank_magnitude", False, False, True),
    MergeMethod(
        name="model_stock",
        kind="parameter",
        needs_base=True,
        global_parameters=frozenset({"filter_wise"}),
        per_model_parameters=frozenset(),
        description="Interpolate from the base to the models' average by a ratio set by the task vectors' angle.",
        merge_tensor=model_stock_merge,
        uses_base=True,
        defaults=MappingProxyType({"filter_wise": False}),
    ),
    _layer_method("passthrough", "Copy or stack layer ranges from the models (slices)."),
    _layer_method("frankenmerge", "Stack layer ranges of several models into a deeper model."),
    _layer_method("dfs", "Follow a layer path through the models' layers, each input scaled."),
    _layer_method("ps_dfs", "Parameter-space merge followed by a data-flow layer path."),
]

MERGE_TECHNIQUES: dict[str, MergeMethod] = {method.name: method for method in _METHODS}


def get_method(name: str) -> MergeMethod:
    """Return the registered method ``name``, or raise ConfigError with the closest valid name."""
    method = MERGE_TECHNIQUES.get(name)
    if method is not None:
        return method

    close = difflib.get_close_matches(name, list(MERGE_TECHNIQUES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown merge method {name!r}: {hint}valid methods are {', '.join(sorted(MERGE_TECHNIQUES))}"
    )
