"""Layer-space merges: passthrough (frankenmerge), layer paths (dfs) and ps_dfs.

All three build a model whose decoder layers are copies of layers of other
models of one architecture, in a new order. The embeddings, final norm and head
(every tensor outside the layer stack), config.json and the tokenizer come
from one reference model. The checks run on config.json and safetensors
headers alone, before any tensor is read.

passthrough / frankenmerge (mergekit's ``slices`` form)::

    merge_method: passthrough
    base_model: /models/a            # non-layer tensors; default: the first slice's model
    slices:
      - sources: [{model: /models/a, layer_range: [0, 16]}]
      - sources: [{model: /models/b, layer_range: [8, 24], parameters: {scale: 0.5}}]

A slice copies the half-open layer range ``[start, end)`` of one model. A
slice ``scale`` multiplies the output projections (``self_attn.o_proj`` and
``mlp.down_proj``, weights and biases) of its layers, so it scales what those
layers add to the residual stream, and ``scale: 0`` turns them into identities.
The scale may also be a gradient over the slice's layers (``[0, 1]``) or a
list of ``{filter, value}`` entries such as ``{filter: o_proj, value: 0.5}``
that scales one projection. Other tensors are never scaled.

dfs (a layer path, the data-flow-space merge of Akiba et al., "Evolutionary
Optimization of Model Merging Recipes", Nature Machine Intelligence, 2025)::

    merge_method: dfs
    embed_model: /models/a           # default: base_model, then the first model, then the first step's model
    layer_path:
      - {model: /models/a, layer: 0}
      - {model: /models/b, layer: 3, scale: 0.8}

Step ``k`` runs layer ``layer`` of ``model`` on its input multiplied by
``scale`` (``s_k``). For pre-norm blocks, ``h + Attn(Norm(h))`` and then
``h + MLP(Norm(h))`` with a scale-invariant Norm (RMSNorm or LayerNorm), the
scaling folds into the weights. Let ``x_k`` be the residual stream after step
``k`` of the scaled path, ``z_k`` that of the written model, ``x_0 = z_0`` the
embeddings and ``c_k = s_1 * ... * s_k``. If ``x_{k-1} = c_{k-1} z_{k-1}``,
step ``k`` receives ``c_k z_{k-1}``. Because ``Norm(c z) = Norm(z)`` for
``c > 0``, its attention sublayer returns ``c_k z_{k-1} + Attn(Norm(z_{k-1}))
= c_k (z_{k-1} + Attn(Norm(z_{k-1})) / c_k)``, and the MLP sublayer does the
same. So the written layer at step ``k`` has ``o_proj`` and ``down_proj``
(weights and biases) divided by ``c_k``, and ``x_k = c_k z_k`` at every step.
The final norm removes the last factor ``c_n`` in the same way, so the
embeddings, final norm and head are copied unchanged.

The fold is exact except for the norms' epsilon: ``Norm(c z)`` computed with
epsilon ``eps`` equals ``Norm(z)`` computed with ``eps / c**2``. The written
model therefore matches the scaled path run with epsilon ``eps * c_k**2`` in
step ``k``'s norms and ``eps * c_n**2`` in the final norm, and differs from the
plain scaled path by a relative error of about ``eps * |1 - 1/c**2| / (2 *
mean(z**2))`` per norm. A non-positive scale does not fold, because
``Norm(c z) = -Norm(z)`` for ``c < 0`` and ``c = 0`` zeroes the stream.
Blocks that normalise a sublayer's output (Gemma 2 and 3, OLMo 2) or run
post-norm cancel the division, so only the model types in
``FOLDABLE_MODEL_TYPES`` accept scales other than 1.

ps_dfs (a layer path over a parameter-space merge and other models)::

    merge_method: ps_dfs
    ps_method: ties                  # the parameter-space method
    base_model: /models/base         # base of the parameter-space merge
    models: [{model: /models/ft1}, {model: /models/ft2}]
    parameters: {density: 0.5, weight: 0.5}
    embed_model: ps                  # default: ps
    layer_path:
      - {model: ps, layer: 0}
      - {model: /models/ft3, layer: 1, scale: 1.1}

``ps_method`` names the parameter-space method, and ``parameters``,
``models``, ``base_model``, ``dtype``, ``seed`` and ``tokenizer_source`` go to
it. The model name ``ps`` in ``layer_path`` and ``embed_model`` means that
merge's result, so a local folder named ``ps`` must be written ``./ps``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evomerge.exceptions import ConfigError, IncompatibleModelsError
from evomerge.merge.parameters import resolve_value
from evomerge.merge.spec import LayerStep, MergeSpec

if TYPE_CHECKING:
    from evomerge.checkpoint import CheckpointReader
    from evomerge.merge.engine import MergeOptions

logger = logging.getLogger(__name__)

# Tensors whose output is added to the residual stream, relative to the layer prefix.
ATTENTION_OUTPUT_PREFIX = "self_attn.o_proj."
MLP_OUTPUT_PREFIX = "mlp.down_proj."
OUTPUT_PROJECTION_PREFIXES = (ATTENTION_OUTPUT_PREFIX, MLP_OUTPUT_PREFIX)

# Model types whose transformers 5 decoder layer is h + f(Norm(h)) for each sublayer,
# with a scale-invariant norm, an output projection named as above and a final norm.
FOLDABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite"})

# Known model types whose blocks do not fold, with the reason.
UNFOLDABLE_REASONS = {
    "gemma2": "Gemma 2 normalises each sublayer's output, which cancels the scaling",
    "gemma3": "Gemma 3 normalises each sublayer's output, which cancels the scaling",
    "gemma3_text": "Gemma 3 normalises each sublayer's output, which cancels the scaling",
    "olmo2": "OLMo 2 normalises each sublayer's output (post-norm), which cancels the scaling",
    "gpt2": "GPT-2 names its output projections c_proj, which the fold does not handle",
}

# The model name that ps_dfs specs use for the parameter-space merge result.
PS_MODEL_NAME = "ps"

# Top-level config keys that are lists but never per-layer values.
NON_LAYER_LIST_KEYS = frozenset({"architectures"})

# The first "<stack>.<index>." in a tensor name, e.g. model.layers.3.mlp.down_proj.weight.
_LAYER_NAME = re.compile(r"^(?P<prefix>(?:.*?\.)?(?:layers|h|blocks)\.)(?P<index>\d+)\.(?P<rest>.+)$")


@dataclasses.dataclass(frozen=True)
class LayerPlacement:
    """One layer of the output: layer ``layer`` of ``model`` with scaled output projections.

    ``attention_scale`` multiplies ``self_attn.o_proj`` and ``mlp_scale``
    multiplies ``mlp.down_proj`` (weights and biases). ``origin`` names the
    slice or step for error messages.
    """

    model: str
    layer: int
    origin: str
    attention_scale: float = 1.0
    mlp_scale: float = 1.0

    def scale_for(self, rest: str) -> float:
        """Return the factor for the layer tensor ``rest`` (a name relative to the layer prefix)."""
        if rest.startswith(ATTENTION_OUTPUT_PREFIX):
            return self.attention_scale
        if rest.startswith(MLP_OUTPUT_PREFIX):
            return self.mlp_scale
        return 1.0

    @property
    def is_scaled(self) -> bool:
        """Whether any output projection is multiplied by a factor other than 1."""
        return self.attention_scale != 1.0 or self.mlp_scale != 1.0


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """The decoder layers one checkpoint's header lists."""

    prefix: str
    count: int
    tensors: dict[int, dict[str, tuple[tuple[int, ...], Any]]]

    def name(self, layer: int, rest: str) -> str:
        """Return the full tensor name of ``rest`` in layer ``layer``."""
        return f"{self.prefix}{layer}.{rest}"


def passthrough_merge(spec: MergeSpec, output_dir: Path, options: "MergeOptions") -> Path:
    """Write the model that stacks the layer ranges of ``spec.slices`` and return its folder."""
    if not spec.slices:
        raise ConfigError(
            f"merge_method {spec.merge_method!r} needs slices: give a list of "
            "{sources: [{model: ..., layer_range: [start, end]}]}"
        )

    placements: list[LayerPlacement] = []
    for index, slice_ in enumerate(spec.slices):
        if len(slice_.sources) > 1:
            models = [source.model for source in slice_.sources]
            raise ConfigError(
                f"slice {index} has {len(slice_.sources)} sources {models}, but {spec.merge_method} copies layers "
                "from one source per slice: split it into one-source slices, or merge the models first with a "
                "parameter-space method (linear, ties, ...) and take the slice from that result"
            )
        source = slice_.sources[0]
        start, end = source.layer_range
        if start < 0 or start >= end:
            raise ConfigError(
                f"slice {index} layer_range [{start}, {end}] of {source.model!r} is empty or negative: "
                "give 0 <= start < end (the range is half-open)"
            )
        origin = f"slice {index} (layer_range [{start}, {end}])"
        scales = _slice_scales(index, source.parameters, end - start)
        for layer, (attention_scale, mlp_scale) in zip(range(start, end), scales):
            placements.append(LayerPlacement(source.model, layer, origin, attention_scale, mlp_scale))

    reference = spec.base_model or spec.slices[0].sources[0].model
    return write_layer_model(placements, reference, spec, Path(output_dir), options, fold=False)


def dfs_merge(spec: MergeSpec, output_dir: Path, options: "MergeOptions") -> Path:
    """Write the model that runs ``spec.layer_path`` with its input scales folded in and return its folder."""
    if not spec.layer_path:
        raise ConfigError(
            f"merge_method {spec.merge_method!r} needs layer_path: "
            "give a list of {model: ..., layer: ..., scale: ...}"
        )

    placements = fold_layer_path(spec.layer_path)
    reference = spec.embed_model or spec.base_model or (spec.models[0].model if spec.models else None)
    reference = reference or spec.layer_path[0].model
    fold = any(placement.is_scaled for placement in placements)
    return write_layer_model(placements, reference, spec, Path(output_dir), options, fold=fold)


def ps_dfs_merge(spec: MergeSpec, output_dir: Path, options: "MergeOptions") -> Path:
    """Run the parameter-space merge of ``spec`` into a temporary folder, then the layer path over it."""
    from evomerge.merge.engine import run_merge

    if not spec.layer_path:
        raise ConfigError("merge_method 'ps_dfs' needs layer_path: give steps whose model is 'ps' or a model path")
    ps_method = spec.ps_method
    if not isinstance(ps_method, str) or not ps_method:
        raise ConfigError(
            f"ps_dfs needs ps_method, the parameter-space method to run first, got {ps_method!r}: "
            "set it to e.g. 'ties' or 'linear'"
        )
    if ps_method in LAYER_MERGE_FUNCTIONS:
        raise ConfigError(f"ps_method {ps_method!r} is a layer-space method: use a parameter-space one")
    if not spec.models:
        raise ConfigError("ps_dfs needs models for the parameter-space merge: give them under 'models'")

    ps_spec = MergeSpec(
        merge_method=ps_method,
        models=spec.models,
        base_model=spec.base_model,
        parameters=spec.parameters,
        dtype=spec.dtype,
        tokenizer_source=spec.tokenizer_source,
        seed=spec.seed,
    )

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # The intermediate lives next to the output so that large copies stay on one file system.
    with tempfile.TemporaryDirectory(prefix=".ps_dfs-", dir=output_dir.parent) as scratch:
        ps_path = str(run_merge(ps_spec, Path(scratch) / "ps", options))
        logger.info("ps_dfs: parameter-space merge %s written to %s", ps_method, ps_path)

        steps = [
            step.model_copy(update={"model": ps_path}) if step.model == PS_MODEL_NAME else step
            for step in spec.layer_path
        ]
        embed_model = spec.embed_model or PS_MODEL_NAME
        dfs_spec = MergeSpec(
            merge_method="dfs",
            layer_path=steps,
            embed_model=ps_path if embed_model == PS_MODEL_NAME else embed_model,
            dtype=spec.dtype,
            out_dtype=spec.out_dtype,
        )
        return dfs_merge(dfs_spec, output_dir, options)


def fold_layer_path(steps: Sequence[LayerStep]) -> list[LayerPlacement]:
    """Convert a layer path into placements whose output scale is ``1 / c_k``, ``c_k`` the running product of scales."""
    placements = []
    cumulative = 1.0
    for position, step in enumerate(steps):
        if not math.isfinite(step.scale) or step.scale <= 0.0:
            raise ConfigError(
                f"layer_path step {position} ({step.model!r}, layer {step.layer}) has scale {step.scale}: "
                "an input scale must be a finite number > 0, because a pre-norm block cannot fold a "
                "zero or negative scale into its weights"
            )
        cumulative *= step.scale
        if not math.isfinite(cumulative) or cumulative == 0.0:
            raise ConfigError(
                f"the product of layer_path scales up to step {position} is {cumulative}, outside float range: "
                "use scales closer to 1"
            )
        origin = f"layer_path step {position}"
        placements.append(LayerPlacement(step.model, step.layer, origin, 1.0 / cumulative, 1.0 / cumulative))
    return placements


def find_layer_stack(reader: "CheckpointReader") -> LayerStack:
    """Find the decoder layers in a checkpoint header, using ``num_hidden_layers`` from its config."""
    count = reader.config.get("num_hidden_layers")
    if not isinstance(count, int) or count < 1:
        raise IncompatibleModelsError(
            f"config.json of {str(reader.path)!r} has num_hidden_layers={count!r}: layer merges need a "
            "decoder-only model with a top-level num_hidden_layers"
        )

    stacks: dict[str, dict[int, dict[str, tuple[tuple[int, ...], Any]]]] = {}
    for name in reader.tensor_names:
        match = _LAYER_NAME.match(name)
        if match is None:
            continue
        layers = stacks.setdefault(match["prefix"], {})
        entry = (tuple(reader.tensor_shape(name)), reader.tensor_dtype(name))
        layers.setdefault(int(match["index"]), {})[match["rest"]] = entry

    matching = [prefix for prefix, layers in stacks.items() if sorted(layers) == list(range(count))]
    if len(matching) != 1:
        found = {prefix: len(layers) for prefix, layers in stacks.items()}
        raise IncompatibleModelsError(
            f"{str(reader.path)!r}: expected one layer stack with num_hidden_layers={count} layers, "
            f"found stacks {found}: layer merges support decoder-only checkpoints with one stack"
        )
    prefix = matching[0]
    return LayerStack(prefix=prefix, count=count, tensors=stacks[prefix])


def check_placements(
    placements: Sequence[LayerPlacement],
    stacks: Mapping[str, LayerStack],
    model_types: Mapping[str, str | None],
    reference: str,
) -> None:
    """Raise unless every placement names an existing layer shaped like the reference model's layers."""
    reference_type = model_types[reference]
    reference_layer = stacks[reference].tensors[0]

    for placement in placements:
        stack = stacks[placement.model]
        if placement.layer >= stack.count:
            raise ConfigError(
                f"{placement.origin}: layer {placement.layer} of {placement.model!r} is out of range, "
                f"the model has {stack.count} layers (0 to {stack.count - 1})"
            )
        if model_types[placement.model] != reference_type:
            raise IncompatibleModelsError(
                f"{placement.origin}: {placement.model!r} has model_type {model_types[placement.model]!r} but the "
                f"reference model {reference!r} has {reference_type!r}: use models of one architecture"
            )
        layer = stack.tensors[placement.layer]
        if _layer_shapes(layer) != _layer_shapes(reference_layer):
            raise IncompatibleModelsError(
                f"{placement.origin}: layer {placement.layer} of {placement.model!r} has tensors "
                f"{_describe_difference(layer, reference_layer)} unlike layer 0 of the reference model "
                f"{reference!r}: use models with the same layer shapes"
            )
        scaled_projections = (
            (ATTENTION_OUTPUT_PREFIX, placement.attention_scale),
            (MLP_OUTPUT_PREFIX, placement.mlp_scale),
        )
        for prefix, factor in scaled_projections:
            if factor != 1.0 and not any(rest.startswith(prefix) for rest in layer):
                raise ConfigError(
                    f"{placement.origin}: layer {placement.layer} of {placement.model!r} has no tensor "
                    f"{prefix}*, so scale {factor} cannot be applied to it: remove the scale"
                )


def check_fold_allowed(model_type: str | None, reference: str) -> None:
    """Raise ``ConfigError`` unless layer-path input scales fold exactly into blocks of ``model_type``."""
    if model_type in FOLDABLE_MODEL_TYPES:
        return
    reason = UNFOLDABLE_REASONS.get(
        model_type or "", "the fold has only been derived for pre-norm blocks with o_proj and down_proj outputs"
    )
    raise ConfigError(
        f"layer_path scales other than 1 cannot be folded into {reference!r} (model_type {model_type!r}): "
        f"{reason}. Set every scale to 1, or use a model type in {sorted(FOLDABLE_MODEL_TYPES)}"
    )


def rebuild_config(
    reference_config: Mapping[str, Any],
    placements: Sequence[LayerPlacement],
    configs: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Return the reference config with ``num_hidden_layers`` and every per-layer list set for the new layers.

    A per-layer list is a top-level list as long as ``num_hidden_layers``.
    Entry ``i`` of the new list is the source model's entry for output layer ``i``.
    """
    config = dict(reference_config)
    old_count = reference_config["num_hidden_layers"]
    per_layer_keys = [
        key
        for key, value in reference_config.items()
        if isinstance(value, list) and len(value) == old_count and key not in NON_LAYER_LIST_KEYS
    ]

    for key in per_layer_keys:
        rebuilt = []
        for placement in placements:
            source = configs[placement.model]
            values = source.get(key)
            if not isinstance(values, list) or len(values) != source["num_hidden_layers"]:
                raise IncompatibleModelsError(
                    f"{placement.origin}: config.json of {placement.model!r} has no per-layer list {key!r} "
                    f"like the reference model's: use models of one architecture"
                )
            rebuilt.append(values[placement.layer])
        config[key] = rebuilt
        logger.debug("rebuilt per-layer config list %s for %d layers", key, len(rebuilt))

    config["num_hidden_layers"] = len(placements)
    return config


def write_layer_model(
    placements: Sequence[LayerPlacement],
    reference: str,
    spec: MergeSpec,
    output_dir: Path,
    options: "MergeOptions",
    *,
    fold: bool,
) -> Path:
    """Check the placements against the headers, then write the layer model and return its folder.

    ``fold`` marks output scales that come from layer-path input scales,
    which need an architecture in ``FOLDABLE_MODEL_TYPES``.
    """
    from evomerge.checkpoint import CheckpointReader, CheckpointWriter

    if spec.tokenizer_source not in (None, "base", reference):
        raise ConfigError(
            f"tokenizer_source {spec.tokenizer_source!r} is not supported by {spec.merge_method}: the tokenizer "
            f"must match the embeddings, which come from {reference!r}; remove tokenizer_source"
        )

    model_paths = [reference] + [placement.model for placement in placements]
    allow_pickle = bool(getattr(options, "allow_pickle", False))
    with ExitStack() as stack:
        readers: dict[str, CheckpointReader] = {}
        for path in dict.fromkeys(model_paths):
            readers[path] = stack.enter_context(CheckpointReader(path, allow_pickle=allow_pickle))

        stacks = {path: find_layer_stack(reader) for path, reader in readers.items()}
        model_types = {path: reader.config.get("model_type") for path, reader in readers.items()}
        if fold:
            check_fold_allowed(model_types[reference], reference)
        check_placements(placements, stacks, model_types, reference)
        config = rebuild_config(
            readers[reference].config, placements, {path: reader.config for path, reader in readers.items()}
        )

        logger.info(
            "%s: writing %d layers from %d models, non-layer tensors from %s",
            spec.merge_method,
            len(placements),
            len(readers),
            reference,
        )
        # The writer casts floating-point tensors to this dtype; None keeps each tensor's own.
        writer_kwargs = {"dtype": getattr(options, "out_dtype", None) or spec.out_dtype or spec.dtype}
        max_shard_bytes = getattr(options, "max_shard_bytes", None)
        if max_shard_bytes is not None:
            writer_kwargs["max_shard_bytes"] = max_shard_bytes
        with CheckpointWriter(output_dir, **writer_kwargs) as writer:
            reference_reader = readers[reference]
            reference_stack = stacks[reference]
            for name in reference_reader.tensor_names:
                match = _LAYER_NAME.match(name)
                if match is None or match["prefix"] != reference_stack.prefix:
                    writer.add_tensor(name, reference_reader.get_tensor(name))
                    reference_reader.release([name])

            for output_layer, placement in enumerate(placements):
                source_reader = readers[placement.model]
                source_stack = stacks[placement.model]
                for rest in source_stack.tensors[placement.layer]:
                    source_name = source_stack.name(placement.layer, rest)
                    tensor = source_reader.get_tensor(source_name)
                    factor = placement.scale_for(rest)
                    if factor != 1.0:
                        tensor = (tensor.to(torch.float32) * factor).to(tensor.dtype)
                    # add_tensor stores its own copy, so a layer used twice gets independent tensors
                    # and the input pages can be unmapped at once.
                    writer.add_tensor(reference_stack.name(output_layer, rest), tensor)
                    source_reader.release([source_name])

            return writer.finalize(config=config, side_files_from=reference_reader.path)


def _slice_scales(index: int, parameters: Mapping[str, Any], length: int) -> list[tuple[float, float]]:
    """Return (attention, MLP) output scales for each layer of a slice from its ``scale`` parameter.

    The value may be a number, a gradient over the slice's layers, or a list of
    ``{filter, value}`` entries matched against names such as
    ``layers.0.self_attn.o_proj.weight``. An unmatched projection keeps 1.0.
    """
    unknown = sorted(set(parameters) - {"scale"})
    if unknown:
        raise ConfigError(
            f"slice {index} has parameters {unknown}, but passthrough slices accept only 'scale': remove them"
        )
    value = parameters.get("scale", 1.0)

    scales = []
    for position in range(length):
        pair = []
        for prefix in OUTPUT_PROJECTION_PREFIXES:
            try:
                resolved = resolve_value(value, f"layers.{position}.{prefix}weight", length)
            except ConfigError as error:
                raise ConfigError(f"slice {index} scale: {error}") from None
            if resolved is None:
                resolved = 1.0
            if isinstance(resolved, bool) or not math.isfinite(resolved):
                raise ConfigError(
                    f"slice {index} has scale {resolved!r} for {prefix}weight: give a finite number, a gradient "
                    "of numbers or a list of {filter, value} entries"
                )
            pair.append(float(resolved))
        scales.append((pair[0], pair[1]))
    return scales


def _layer_shapes(layer: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict[str, tuple[int, ...]]:
    """Return a layer's tensor shapes by name; dtypes may differ because the writer casts."""
    return {rest: shape for rest, (shape, _) in layer.items()}


def _describe_difference(
    layer: Mapping[str, tuple[tuple[int, ...], Any]], reference: Mapping[str, tuple[tuple[int, ...], Any]]
) -> str:
    """Return the first tensor name and shape where two layers differ, for error messages."""
    for rest in sorted(set(layer) | set(reference)):
        if rest not in reference:
            return f"with extra {rest!r}"
        if rest not in layer:
            return f"without {rest!r}"
        if layer[rest][0] != reference[rest][0]:
            return f"with {rest!r} of shape {list(layer[rest][0])} (reference: {list(reference[rest][0])})"
    return "that differ"


LAYER_MERGE_FUNCTIONS: dict[str, Callable[[MergeSpec, Path, "MergeOptions"], Path]] = {
    "passthrough": passthrough_merge,
    "frankenmerge": passthrough_merge,
    "dfs": dfs_merge,
    "ps_dfs": ps_dfs_merge,
}
