"""Merge recipes: what the search proposes, with content keys for caching.

A recipe names a merge method and its inputs by reference: ``"model:NAME"``
for an input model of the configuration, ``"candidate:KEY"`` for a candidate
built earlier in the run. ``candidate_key`` hashes the canonical JSON of the
recipe with the fingerprint of every input, so the same merge of the same
weights always gets the same key and is built once.

Canonical JSON sorts keys, drops whitespace, rounds floats to 10 significant
digits, writes -0.0 as 0.0, and writes every numeric merge parameter and
scale as a float (``1`` and ``1.0`` give the same key). Layer indices, slice
bounds and the seed stay integers. An ``input_parameters`` tuple of empty
dicts is the same as ``()``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evomerge.exceptions import ConfigError
from evomerge.merge.spec import InputModel, LayerStep, MergeSpec, Slice, SliceSource

# Bump when the merge code changes the tensors that a recipe builds, so that
# old checkpoints in the store are not reused under the same key.
MERGE_CODE_VERSION = "1"

MODEL_PREFIX = "model:"
CANDIDATE_PREFIX = "candidate:"
# The parameter-space result inside a ps_dfs layer path.
PS_REFERENCE = "ps"

# Parameters whose every value must lie in [0, 1].
UNIT_INTERVAL_PARAMETERS = frozenset({"density", "t", "gamma", "epsilon"})


class Recipe(BaseModel):
    """One merge described by model references; frozen and hashable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    # "model:NAME" or "candidate:KEY"; order matters and duplicates are kept.
    inputs: tuple[str, ...] = ()
    base: str | None = None
    # Global parameters; a list value is a gradient over the layers.
    parameters: dict[str, Any] = Field(default_factory=dict)
    # One dict per input, or empty.
    input_parameters: tuple[dict[str, Any], ...] = ()
    # Passthrough slices: (reference, start, end, scale), layers [start, end).
    slices: tuple[tuple[str, int, int, float], ...] | None = None
    # dfs and ps_dfs steps: (reference, layer, input scale); ps_dfs may use "ps".
    layer_path: tuple[tuple[str, int, float], ...] | None = None
    # Seed of the random drops of dare and della.
    seed: int | None = None

    def __hash__(self) -> int:
        return hash(self.canonical_json())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Recipe):
            return NotImplemented
        return self.canonical_json() == other.canonical_json()

    def canonical_json(self) -> str:
        """Serialise the recipe as canonical JSON (see the module docstring)."""
        # Python mode keeps NaN as a float so that json.dumps rejects it; JSON mode would write null.
        data = self.model_dump()
        data["parameters"] = _as_float_values(data["parameters"])
        if all(not entry for entry in data["input_parameters"]):
            data["input_parameters"] = []
        data["input_parameters"] = [_as_float_values(dict(entry)) for entry in data["input_parameters"]]
        if data["slices"] is not None:
            data["slices"] = [[ref, int(start), int(end), float(scale)] for ref, start, end, scale in data["slices"]]
        if data["layer_path"] is not None:
            data["layer_path"] = [[ref, int(layer), float(scale)] for ref, layer, scale in data["layer_path"]]
        normalised = _round_floats(data)
        try:
            return json.dumps(normalised, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except ValueError:
            raise ConfigError(
                f"recipe for method {self.method!r} contains NaN or infinity: give finite parameter values"
            ) from None

    def references(self) -> list[str]:
        """Return every model or candidate reference the recipe reads, without duplicates, in order."""
        found: list[str] = []
        candidates = list(self.inputs)
        if self.base is not None:
            candidates.append(self.base)
        candidates.extend(entry[0] for entry in self.slices or ())
        candidates.extend(entry[0] for entry in self.layer_path or ())
        for reference in candidates:
            if reference != PS_REFERENCE and reference not in found:
                found.append(reference)
        return found

    def parent_keys(self) -> list[str]:
        """Return the keys of the candidates among the references, in order of first use."""
        return [ref[len(CANDIDATE_PREFIX):] for ref in self.references() if ref.startswith(CANDIDATE_PREFIX)]


def _as_float_values(value: Any) -> Any:
    """Turn every int (not bool) inside a parameter value into a float."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_as_float_values(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_float_values(item) for key, item in value.items()}
    return value


def _round_floats(value: Any) -> Any:
    """Round floats to 10 significant digits and turn -0.0 into 0.0, recursively."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return value
        rounded = float(f"{value:.10g}")
        return 0.0 if rounded == 0.0 else rounded
    if isinstance(value, (list, tuple)):
        return [_round_floats(item) for item in value]
    if isinstance(value, dict):
        return {key: _round_floats(item) for key, item in value.items()}
    return value


def candidate_key(recipe: Recipe, fingerprints: Mapping[str, str]) -> str:
    """Return the 20-hex-digit content key of a recipe.

    The hash covers the canonical JSON, the fingerprint of every reference
    (sorted by reference) and ``MERGE_CODE_VERSION``. A ``"candidate:KEY"``
    reference uses KEY as its fingerprint; a model reference needs an entry
    in ``fingerprints``.
    """
    parts = [recipe.canonical_json()]
    for reference in sorted(recipe.references()):
        if reference.startswith(CANDIDATE_PREFIX):
            fingerprint = reference[len(CANDIDATE_PREFIX):]
        elif reference in fingerprints:
            fingerprint = fingerprints[reference]
        else:
            raise ConfigError(
                f"no fingerprint for {reference!r}: fingerprint every input model first; "
                f"known references: {sorted(fingerprints)}"
            )
        parts.append(f"{reference}={fingerprint}")
    parts.append(f"merge_code_version={MERGE_CODE_VERSION}")
    digest = hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()
    return digest[:20]


def recipe_to_spec(recipe: Recipe, resolve: Callable[[str], str]) -> MergeSpec:
    """Build the ``MergeSpec`` of a recipe; ``resolve`` maps a reference to a local folder.

    Layer methods carry no ``models`` list except ps_dfs, whose inputs are the
    models of its parameter-space step. The base is the embed model of a dfs
    path, the base of ps_dfs's parameter-space step (whose result "ps" then
    provides embeddings and head) and the source of the non-layer tensors of a
    passthrough merge.
    """
    is_layer_method = recipe.slices is not None or recipe.layer_path is not None
    models: list[InputModel] = []
    if not is_layer_method or recipe.method == "ps_dfs":
        for index, reference in enumerate(recipe.inputs):
            parameters = recipe.input_parameters[index] if recipe.input_parameters else {}
            models.append(InputModel(model=resolve(reference), parameters=dict(parameters)))

    slices = None
    if recipe.slices is not None:
        slices = []
        for reference, start, end, scale in recipe.slices:
            parameters = {} if float(scale) == 1.0 else {"scale": float(scale)}
            source = SliceSource(model=resolve(reference), layer_range=(start, end), parameters=parameters)
            slices.append(Slice(sources=[source]))

    layer_path = None
    if recipe.layer_path is not None:
        layer_path = []
        for reference, layer, scale in recipe.layer_path:
            model = reference if reference == PS_REFERENCE else resolve(reference)
            layer_path.append(LayerStep(model=model, layer=layer, scale=scale))

    base = resolve(recipe.base) if recipe.base is not None else None
    parameters = {name: value for name, value in recipe.parameters.items() if name != "ps_method"}
    return MergeSpec(
        merge_method=recipe.method,
        models=models,
        base_model=base,
        parameters=parameters,
        slices=slices,
        layer_path=layer_path,
        # dfs takes embeddings and head from the base; ps_dfs leaves embed_model unset so they come from "ps".
        embed_model=base if recipe.method == "dfs" else None,
        seed=recipe.seed,
        ps_method=recipe.parameters.get("ps_method"),
    )


def merge_methods() -> Mapping[str, Any]:
    """Return the merge method registry; imported on first use because it loads torch."""
    from evomerge.merge.registry import MERGE_TECHNIQUES

    return MERGE_TECHNIQUES


def _layer_count(reference: str, model_info: Mapping[str, Any]) -> int | None:
    """Return the layer count of a reference, or None for a candidate missing from ``model_info``."""
    if reference.startswith(MODEL_PREFIX):
        name = reference[len(MODEL_PREFIX):]
        if name not in model_info:
            raise ConfigError(f"unknown model {name!r} in reference {reference!r}; known models: {sorted(model_info)}")
        return model_info[name].num_layers
    if reference.startswith(CANDIDATE_PREFIX):
        info = model_info.get(reference)
        return None if info is None else info.num_layers
    raise ConfigError(
        f"invalid reference {reference!r}: write 'model:NAME' for an input model or 'candidate:KEY' for a candidate"
    )


def _check_value(name: str, value: Any, max_entries: int | None, where: str) -> None:
    """Check one parameter value: finite numbers, unit ranges, gradient length."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for entry in value:
            _check_value(name, entry.get("value"), max_entries, f"{where} (filter {entry.get('filter')!r})")
        return
    if isinstance(value, bool):
        return
    numbers = value if isinstance(value, list) else [value]
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: parameter {name!r} is an empty gradient: give 1 or more values")
        if max_entries is not None and len(value) > max_entries:
            raise ConfigError(
                f"{where}: gradient {name!r} has {len(value)} entries but the model has {max_entries} layers: "
                f"give 1 to {max_entries} values"
            )
    for number in numbers:
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            raise ConfigError(f"{where}: parameter {name!r} value {number!r} is not a number")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: parameter {name!r} is {number}: give a finite value")
        if name in UNIT_INTERVAL_PARAMETERS and not 0.0 <= number <= 1.0:
            raise ConfigError(f"{where}: {name} {number} is outside [0, 1]: give a value from 0 to 1")


def _check_required_parameters(method: Any, recipe: Recipe, where: str) -> None:
    """Reject a recipe that lacks a parameter without a default, as the merge engine would."""
    defaults = set(getattr(method, "defaults", {}))
    for name in sorted(set(method.per_model_parameters) - defaults):
        for index, reference in enumerate(recipe.inputs):
            if getattr(method, "uses_base", False) and reference == recipe.base:
                continue
            own = recipe.input_parameters[index] if recipe.input_parameters else {}
            if name not in own and name not in recipe.parameters:
                raise ConfigError(
                    f"{where}: input {index} ({reference!r}) has no {name!r}: set it in input_parameters[{index}] "
                    "or in the global parameters"
                )
    for name in sorted(set(method.global_parameters) - defaults):
        if name not in recipe.parameters:
            raise ConfigError(f"{where}: missing parameter {name!r}: add it to parameters")


def _check_parameter_names(method: Any, recipe: Recipe, where: str) -> Any:
    """Reject parameter names the method does not accept; return the method whose parameters apply.

    For ps_dfs that is the parameter-space method named by ``ps_method``.
    """
    allowed_global = set(method.global_parameters) | set(method.per_model_parameters)
    if recipe.method == "ps_dfs":
        # ps_dfs takes 'ps_method' and the parameters of that method.
        allowed_global.add("ps_method")
        ps_name = recipe.parameters.get("ps_method")
        table = merge_methods()
        if ps_name not in table or table[ps_name].kind != "parameter":
            valid = sorted(name for name, entry in table.items() if entry.kind == "parameter")
            raise ConfigError(f"{where}: ps_method {ps_name!r} is not a parameter-space method; valid: {valid}")
        method = table[ps_name]
        allowed_global |= set(method.global_parameters) | set(method.per_model_parameters)
    for name in recipe.parameters:
        if name not in allowed_global:
            raise ConfigError(
                f"{where}: unknown parameter {name!r} for method {recipe.method!r}; valid: {sorted(allowed_global)}"
            )
    allowed_per_model = set(method.per_model_parameters)
    for index, entry in enumerate(recipe.input_parameters):
        for name in entry:
            if name not in allowed_per_model:
                raise ConfigError(
                    f"{where}: unknown parameter {name!r} for input {index} of method {recipe.method!r}; "
                    f"valid per-input parameters: {sorted(allowed_per_model)}"
                )
    return method


def validate_recipe(recipe: Recipe, model_info: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` unless the recipe can be merged.

    ``model_info`` maps model names (and optionally ``"candidate:KEY"``) to
    objects with ``num_layers``. Checks the method, parameter names and
    ranges, gradient lengths (1 to num_layers entries, where num_layers is the
    largest layer count among the model references), slices and layer paths.
    A candidate missing from ``model_info`` is assumed valid for layer bounds.
    """
    table = merge_methods()
    where = f"recipe {recipe.method!r}"
    if recipe.method not in table:
        close = difflib.get_close_matches(recipe.method, list(table), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid methods: {sorted(table)}"
        raise ConfigError(f"unknown merge method {recipe.method!r}: {hint}")
    method = table[recipe.method]

    layer_counts = {ref: _layer_count(ref, model_info) for ref in recipe.references()}
    if method.needs_base and recipe.base is None:
        raise ConfigError(f"{where}: method {recipe.method!r} needs a base model: set base to 'model:NAME'")
    if recipe.input_parameters and len(recipe.input_parameters) != len(recipe.inputs):
        raise ConfigError(
            f"{where}: {len(recipe.input_parameters)} input_parameters entries for {len(recipe.inputs)} inputs: "
            "give one dict per input or none"
        )

    parameter_method = _check_parameter_names(method, recipe, where)
    known_counts = [count for count in layer_counts.values() if count is not None]
    max_entries = max(known_counts) if known_counts else None
    for name, value in recipe.parameters.items():
        if name != "ps_method":
            _check_value(name, value, max_entries, where)
    for index, entry in enumerate(recipe.input_parameters):
        for name, value in entry.items():
            _check_value(name, value, max_entries, f"{where} input {index}")
    if parameter_method.kind == "parameter":
        _check_required_parameters(parameter_method, recipe, where)

    if method.kind == "parameter":
        if not recipe.inputs:
            raise ConfigError(f"{where}: no inputs: give at least one 'model:NAME' or 'candidate:KEY'")
        if recipe.slices is not None or recipe.layer_path is not None:
            raise ConfigError(f"{where}: slices and layer_path belong to layer methods: remove them")
        return
    if recipe.method in ("passthrough", "frankenmerge"):
        _validate_slices(recipe, layer_counts, where)
    else:
        _validate_layer_path(recipe, layer_counts, where)


def _validate_slices(recipe: Recipe, layer_counts: Mapping[str, int | None], where: str) -> None:
    """Check that every slice is a non-empty in-range layer range of a listed input."""
    if not recipe.slices:
        raise ConfigError(f"{where}: no slices: give (reference, start, end, scale) entries")
    for index, (reference, start, end, scale) in enumerate(recipe.slices):
        if reference not in recipe.inputs and reference != recipe.base:
            raise ConfigError(f"{where}: slice {index} reads {reference!r}, which is not among the inputs: add it")
        count = layer_counts[reference]
        if start < 0 or start >= end or (count is not None and end > count):
            raise ConfigError(
                f"{where}: slice {index} layer range [{start}, {end}) of {reference!r} is empty or out of range: "
                f"give 0 <= start < end <= {count if count is not None else 'num_layers'}"
            )
        if not math.isfinite(scale):
            raise ConfigError(f"{where}: slice {index} scale {scale} is not finite")


def _validate_layer_path(recipe: Recipe, layer_counts: Mapping[str, int | None], where: str) -> None:
    """Check that every step names a listed input, an existing layer and a positive scale."""
    if not recipe.layer_path:
        raise ConfigError(f"{where}: empty layer path: give at least one (reference, layer, scale) step")
    ps_count = None
    if recipe.method == "ps_dfs":
        counts = [layer_counts[ref] for ref in recipe.inputs if layer_counts.get(ref) is not None]
        ps_count = min(counts) if counts else None
    for index, (reference, layer, scale) in enumerate(recipe.layer_path):
        if reference == PS_REFERENCE:
            if recipe.method != "ps_dfs":
                raise ConfigError(f"{where}: step {index} reads 'ps', which only ps_dfs provides")
            count = ps_count
        elif reference in recipe.inputs or reference == recipe.base:
            count = layer_counts[reference]
        else:
            raise ConfigError(f"{where}: step {index} reads {reference!r}, which is not among the inputs: add it")
        if layer < 0 or (count is not None and layer >= count):
            raise ConfigError(
                f"{where}: step {index} layer {layer} of {reference!r} is out of range: "
                f"give 0 <= layer < {count if count is not None else 'num_layers'}"
            )
        if not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"{where}: step {index} scale {scale} must be a positive finite number")
