"""The merge spec: one merge, in the shape mergekit's YAML configs use.

A spec names a method, its input models (paths or Hub ids), an optional base
model, method parameters and, for layer-space methods, slices or a layer path.
It can be read from EvoMerge YAML or from a mergekit config, and written back
as a mergekit config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.exceptions import ConfigError

# A parameter value is a scalar, a gradient (a list interpolated over the layer
# index), or a list of conditional entries {filter: "self_attn", value: ...}
# where the first entry whose filter is a substring of the tensor name wins and
# an entry without a filter is the fallback.
Scalar = Union[float, int, bool]
Gradient = list[float]


class ConditionalValue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    filter: str | None = None
    value: Union[Scalar, Gradient]


ParameterValue = Union[Scalar, Gradient, list[ConditionalValue]]


class _SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputModel(_SpecModel):
    """One input of a parameter-space merge with its own parameters."""

    model: str
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


class SliceSource(_SpecModel):
    """A half-open layer range ``[start, end)`` taken from one model."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


class Slice(_SpecModel):
    """One slice of a layer-space merge; several sources are merged with ``merge_method``."""

    sources: list[SliceSource] = Field(min_length=1)


class LayerStep(_SpecModel):
    """One step of a layer path: layer ``layer`` of ``model``, its input scaled by ``scale``."""

    model: str
    layer: int = Field(ge=0)
    scale: float = 1.0


class MergeSpec(_SpecModel):
    """A single merge. Model strings are local folders or Hub ids."""

    merge_method: str
    models: list[InputModel] = Field(default_factory=list)
    base_model: str | None = None
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    slices: list[Slice] | None = None
    layer_path: list[LayerStep] | None = None
    ps_method: str | None = Field(
        default=None, description="ps_dfs only: the parameter-space method whose result the layer path runs over."
    )
    embed_model: str | None = Field(
        default=None, description="Model that provides embeddings, final norm and head for a layer path."
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer_source: str | None = None
    seed: int | None = Field(default=None, description="Seed for the random drops of DARE and DELLA.")

    @model_validator(mode="after")
    def _has_inputs(self) -> "MergeSpec":
        if not self.models and not self.slices and not self.layer_path:
            raise ValueError(f"merge_method {self.merge_method!r} has no inputs: give models, slices or layer_path")
        return self

    def model_paths(self) -> list[str]:
        """Return every model the merge reads, without duplicates, in order of first use."""
        seen: list[str] = []
        candidates = [entry.model for entry in self.models]
        if self.base_model:
            candidates.insert(0, self.base_model)
        for slice_ in self.slices or []:
            candidates.extend(source.model for source in slice_.sources)
        for step in self.layer_path or []:
            candidates.append(step.model)
        if self.embed_model:
            candidates.append(self.embed_model)
        for path in candidates:
            if path not in seen:
                seen.append(path)
        return seen


def spec_from_dict(data: dict[str, Any], source: str = "<dict>") -> MergeSpec:
    """Validate a mapping in EvoMerge or mergekit form as a ``MergeSpec``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a merge config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    # mergekit names the method 'merge_method'. EvoMerge recipes may use 'method' instead.
    if "method" in data and "merge_method" not in data:
        data["merge_method"] = data.pop("method")
    # mergekit allows a bare model string in 'models'.
    if isinstance(data.get("models"), list):
        data["models"] = [{"model": entry} if isinstance(entry, str) else entry for entry in data["models"]]
    try:
        return MergeSpec.model_validate(data)
    except ValidationError as error:
        from evomerge.config import format_validation_error

        raise ConfigError(format_validation_error(error, MergeSpec, source)) from None


def load_spec(path: str | Path) -> MergeSpec:
    """Read a merge config YAML file (EvoMerge or mergekit form)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"merge config {str(path)!r} not found: check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"merge config {str(path)!r} is not valid YAML: {error}") from None
    return spec_from_dict(data or {}, source=str(path))


def spec_to_mergekit(spec: MergeSpec) -> dict[str, Any]:
    """Return the spec as a mergekit config mapping (plain YAML-ready types)."""
    data = spec.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data["merge_method"] = spec.merge_method
    # mergekit has no layer-path method; the path is kept under its own key so
    # that EvoMerge can read the file back.
    return data
