"""The merge engine: runs one ``MergeSpec`` and writes the merged model folder.

Parameter-space merges stream. For each tensor name the engine reads that
tensor from every input, merges it in float32, hands it to the writer and
drops it. Peak memory is therefore a few tensors per input plus one output
shard, whatever the number of layers. The inputs are memory-mapped, and the
pages of each tensor are unmapped once it is merged, so they do not pile up in
the resident set. Layer-space methods are delegated to ``evomerge.merge.layers``.

Before any tensor is read, the headers must agree: the same ``model_type`` and
``architectures`` in config.json, the same tensor names, and the same shapes
except for the vocabulary rows (dim 0) of the embedding and ``lm_head``.

Vocabulary sizes (``spec.tokenizer_source``):

* None: every model must have the same vocabulary size, otherwise
  IncompatibleModelsError.
* ``"base"``: the output keeps the base model's rows (the first model's when
  there is no base). Longer tensors are cut to that size. Where a model has
  fewer rows, the missing rows are taken from the base before merging, so
  those rows carry no task vector of that model.
* a model path: as ``"base"``, with that model's vocabulary size, rows and
  tokenizer files. The model need not be one of the inputs.
* ``"union"``: the output has the largest vocabulary. Each block of rows is
  merged among the models that have it, and where the base lacks the rows the
  mean of those models replaces it. Rows that only one model has are
  copied from it. Tokenizer files come from the model with the largest
  vocabulary.

Tied embeddings: a model without ``lm_head.weight`` whose config does not set
``tie_word_embeddings`` to false is tied. When every model is tied the output
is tied and no ``lm_head.weight`` is written. When tied and untied models are
mixed, the tied models contribute their embedding matrix as ``lm_head``, and
the output is untied with ``tie_word_embeddings: false``.

Half-precision inputs are merged in float32. The output dtype is, in order,
``MergeOptions.out_dtype``, ``spec.out_dtype``, ``spec.dtype``, or the dtype of
the base model (the first model's when there is no base). The writer raises
MergeError when the cast overflows.

The random drops of DARE and DELLA use a ``torch.Generator`` seeded from
``spec.seed`` (0 when unset) and the tensor name, so a tensor's result does
not depend on the order in which tensors are merged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import hashlib
import logging
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from evomerge.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, CheckpointWriter
from evomerge.exceptions import ConfigError, IncompatibleModelsError, MergeError
from evomerge.merge.parameters import layer_index, resolve_parameters
from evomerge.merge.registry import MergeMethod, get_method
from evomerge.merge.spec import MergeSpec, load_spec

logger = logging.getLogger(__name__)

LM_HEAD = "lm_head.weight"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MergeOptions:
    """Settings of one merge run: shard size, pickle and remote-code opt-ins, device and output dtype.

    ``trust_remote_code`` is passed on to layer methods, because parameter merges run no model code.
    """

    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    allow_pickle: bool = False
    trust_remote_code: bool = False
    device: str = "cpu"
    out_dtype: str | None = None  # overrides spec.out_dtype / spec.dtype / the base model's dtype


@dataclass(eq=False)
class _Model:
    """One opened model: its spec string, reader and tensor layout."""

    label: str
    reader: CheckpointReader
    embedding: str | None = None
    tied: bool = False

    def source_name(self, name: str) -> str:
        """Return the stored tensor that provides ``name``; a tied model's lm_head is its embedding."""
        if name == LM_HEAD and self.tied and not self.reader.has_tensor(LM_HEAD):
            return self.embedding or name
        return name

    def rows(self, name: str) -> int:
        """Return dim 0 of tensor ``name`` as this model provides it."""
        return self.reader.tensor_shape(self.source_name(name))[0]


@dataclass
class _Input:
    """One entry of ``spec.models`` that takes part in the merge."""

    model: _Model
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Plan:
    """Everything the tensor loop needs, decided from the spec and the headers."""

    method: MergeMethod
    inputs: list[_Input]
    base: _Model | None
    reference: _Model
    output_names: list[str]
    vocab_names: set[str]
    policy: str | None
    token_model: _Model | None
    num_layers: int
    seed: int
    global_values: dict[str, Any]


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def merge_from_config(
    config_path: str | os.PathLike, output_dir: str | os.PathLike, options: MergeOptions | None = None
) -> Path:
    """Read a merge config YAML (EvoMerge or mergekit form) and run it into ``output_dir``."""
    return run_merge(load_spec(config_path), output_dir, options)


def run_merge(spec: MergeSpec, output_dir: str | os.PathLike, options: MergeOptions | None = None) -> Path:
    """Merge the models of ``spec`` and publish the result at ``output_dir``; return that folder."""
    options = options or MergeOptions()
    output_dir = Path(output_dir)
    method = get_method(spec.merge_method)
    if method.kind == "layer":
        # Imported here because the layer module imports this one.
        from evomerge.merge.layers import LAYER_MERGE_FUNCTIONS

        return LAYER_MERGE_FUNCTIONS[method.name](spec, output_dir, options)

    _check_spec(spec, method)
    started = time.perf_counter()
    with ExitStack() as stack:
        stack.enter_context(_garbage_collection_paused())
        readers: dict[str, _Model] = {}

        def open_model(label: str) -> _Model:
            if label not in readers:
                reader = CheckpointReader(label, allow_pickle=options.allow_pickle)
                stack.callback(reader.close)
                readers[label] = _Model(label=label, reader=reader)
            return readers[label]

        plan = _build_plan(spec, method, open_model)
        logger.info(
            "Merging %d model(s) with %s into %s (base %s)",
            len(plan.inputs), method.name, output_dir, plan.base.label if plan.base else "none",
        )
        result = _write_merge(spec, plan, output_dir, options)

    logger.info(
        "Merged %s with %s: %d tensors in %.2f s",
        output_dir, method.name, len(plan.output_names), time.perf_counter() - started,
    )
    return result


@contextmanager
def _garbage_collection_paused():
    """Pause Python's cyclic garbage collector, and restore its state afterwards.

    A merge creates many short-lived tensor objects, which trigger collections
    that walk every object of the process while holding the interpreter lock.
    Cycles left meanwhile are collected by the first collection after the merge.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------
# Checks and planning
# ---------------------------------------------------------------------------


def _check_spec(spec: MergeSpec, method: MergeMethod) -> None:
    """Raise ConfigError for unknown or missing parameters and a missing base model."""
    if not spec.models:
        raise ConfigError(
            f"merge method {method.name!r} merges parameters but the spec has no models: list them under 'models'"
        )
    method.check_parameter_names(set(spec.parameters), per_model=False)
    for entry in spec.models:
        method.check_parameter_names(set(entry.parameters), per_model=True, model=entry.model)

    if method.needs_base and not spec.base_model:
        raise ConfigError(
            f"merge method {method.name!r} needs base_model: set base_model to the model the others were fine-tuned from"
        )
    if spec.tokenizer_source is not None and not spec.tokenizer_source.strip():
        raise ConfigError("tokenizer_source is empty: use 'base', 'union' or a model path, or leave it out")

    for name in sorted(method.per_model_parameters - set(method.defaults)):
        for entry in spec.models:
            if method.uses_base and entry.model == spec.base_model:
                continue
            if name not in entry.parameters and name not in spec.parameters:
                raise ConfigError(
                    f"model {entry.model!r} has no {name!r} for merge method {method.name!r}: "
                    f"set parameters.{name} on the model or in the global parameters"
                )
    for name in sorted(method.global_parameters - set(method.defaults)):
        if name not in spec.parameters:
            raise ConfigError(f"merge method {method.name!r} needs parameters.{name}: add it to the spec")


def _build_plan(spec: MergeSpec, method: MergeMethod, open_model: Callable[[str], _Model]) -> _Plan:
    """Open every model, check that their headers agree and decide the output layout."""
    base = open_model(spec.base_model) if spec.base_model else None
    inputs = []
    for entry in spec.models:
        model = open_model(entry.model)
        if method.uses_base and base is not None and model.reader.path == base.reader.path:
            # The base takes part as the base, as in mergekit, not as one more input.
            continue
        inputs.append(_Input(model=model, parameters=dict(entry.parameters)))

    reference = base or inputs[0].model
    merging = [item.model for item in inputs] + ([base] if base is not None and method.uses_base else [])
    checked = _unique([reference, *merging])
    for model in checked:
        _find_layout(model)
    _check_architecture(reference, checked)
    output_names, vocab_names = _check_tensor_names(reference, checked)

    policy, token_model = _vocabulary_policy(spec, reference, merging, open_model, vocab_names)
    _check_shapes(reference, checked, output_names, vocab_names, policy)
    if token_model is not None and token_model not in checked:
        _find_layout(token_model)
        _check_shapes(reference, [token_model], output_names, vocab_names, policy)

    num_layers = reference.reader.config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 1:
        indices = [index for name in output_names if (index := layer_index(name)) is not None]
        num_layers = max(indices) + 1 if indices else 1

    return _Plan(
        method=method,
        inputs=inputs,
        base=base if method.uses_base else None,
        reference=reference,
        output_names=output_names,
        vocab_names=vocab_names,
        policy=policy,
        token_model=token_model,
        num_layers=num_layers,
        seed=spec.seed if spec.seed is not None else 0,
        global_values=dict(spec.parameters),
    )


def _unique(models: list[_Model]) -> list[_Model]:
    """Return ``models`` without repeats, in order."""
    result: list[_Model] = []
    for model in models:
        if all(model is not other for other in result):
            result.append(model)
    return result


def _find_layout(model: _Model) -> None:
    """Record the model's embedding tensor and whether its lm_head is tied to it."""
    names = model.reader.tensor_names
    model.embedding = next((name for name in names if name.endswith(EMBEDDING_SUFFIXES)), None)
    tie_setting = model.reader.config.get("tie_word_embeddings")
    model.tied = LM_HEAD not in names and model.embedding is not None and tie_setting is not False


def _check_architecture(reference: _Model, models: list[_Model]) -> None:
    """Raise IncompatibleModelsError when config.json model_type or architectures differ."""
    for key in ("model_type", "architectures"):
        expected = reference.reader.config.get(key)
        for model in models:
            value = model.reader.config.get(key)
            if expected is not None and value is not None and value != expected:
                raise IncompatibleModelsError(
                    f"model {model.label!r} has {key} {value!r} but {reference.label!r} has {expected!r}: "
                    "merge only models of one architecture"
                )


def _check_tensor_names(reference: _Model, models: list[_Model]) -> tuple[list[str], set[str]]:
    """Return the output tensor names and the vocabulary tensors, or raise on a missing tensor."""
    expected = [name for name in reference.reader.tensor_names if name != LM_HEAD]
    expected_set = set(expected)
    for model in models:
        names = set(model.reader.tensor_names) - {LM_HEAD}
        missing = sorted(expected_set - names)
        if missing:
            raise IncompatibleModelsError(
                f"model {model.label!r} has no tensor {missing[0]!r} that {reference.label!r} has "
                f"({len(missing)} missing): merge models with the same tensor names"
            )
        extra = sorted(names - expected_set)
        if extra:
            raise IncompatibleModelsError(
                f"model {model.label!r} has tensor {extra[0]!r} that {reference.label!r} lacks "
                f"({len(extra)} extra): merge models with the same tensor names"
            )

    with_head = [model for model in models if model.reader.has_tensor(LM_HEAD)]
    output_names = list(expected)
    if with_head:
        for model in models:
            if not model.reader.has_tensor(LM_HEAD) and not model.tied:
                raise IncompatibleModelsError(
                    f"model {model.label!r} has no tensor {LM_HEAD!r} and tie_word_embeddings is false, "
                    f"but {with_head[0].label!r} has one: merge models with the same tensor names"
                )
        output_names.append(LM_HEAD)
        if len(with_head) < len(models):
            tied = [model.label for model in models if model.tied]
            logger.info("Tied models %s contribute their embeddings as %s; the output is untied", tied, LM_HEAD)

    vocab_names = {name for name in output_names if name == LM_HEAD or name.endswith(EMBEDDING_SUFFIXES)}
    return output_names, vocab_names


def _vocabulary_policy(
    spec: MergeSpec,
    reference: _Model,
    merging: list[_Model],
    open_model: Callable[[str], _Model],
    vocab_names: set[str],
) -> tuple[str | None, _Model | None]:
    """Return the vocabulary policy ('fit' to one model, 'union' or None) and the tokenizer model."""
    source = spec.tokenizer_source
    if source is None:
        return None, None
    if source == "base":
        return "fit", reference
    if source == "union":
        embedding = next(iter(sorted(vocab_names)), None)
        if embedding is None:
            return "union", reference
        largest = max(merging, key=lambda model: model.rows(embedding))
        return "union", largest
    return "fit", open_model(source)


def _check_shapes(
    reference: _Model, models: list[_Model], names: list[str], vocab_names: set[str], policy: str | None
) -> None:
    """Raise IncompatibleModelsError when shapes differ beyond the vocabulary rows the policy allows."""
    for name in names:
        expected = tuple(reference.reader.tensor_shape(reference.source_name(name)))
        for model in models:
            shape = tuple(model.reader.tensor_shape(model.source_name(name)))
            if shape == expected:
                continue
            if name in vocab_names and shape[1:] == expected[1:]:
                if policy is None:
                    raise IncompatibleModelsError(
                        f"models have different vocabulary sizes ({reference.label!r}: {expected[0]}, "
                        f"{model.label!r}: {shape[0]} rows in {name!r}): set tokenizer_source to 'base', "
                        "'union' or a model path"
                    )
                continue
            raise IncompatibleModelsError(
                f"tensor {name!r} has shape {list(shape)} in {model.label!r} but {list(expected)} in "
                f"{reference.label!r}: merge models of the same size"
            )


# ---------------------------------------------------------------------------
# The tensor loop
# ---------------------------------------------------------------------------


def _output_dtype(spec: MergeSpec, options: MergeOptions, reference: _Model, names: list[str]) -> torch.dtype:
    """Return the dtype to write: options, then the spec, then the reference model's float dtype."""
    for choice in (options.out_dtype, spec.out_dtype, spec.dtype):
        if choice is not None:
            if choice not in DTYPES:
                raise ConfigError(f"output dtype {choice!r} is invalid: use one of {', '.join(DTYPES)}")
            return DTYPES[choice]
    for name in names:
        dtype = reference.reader.tensor_dtype(reference.source_name(name))
        if dtype.is_floating_point:
            return dtype
    return torch.float32


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """Return a CPU generator seeded from ``seed`` and the tensor name, independent of tensor order."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _write_merge(spec: MergeSpec, plan: _Plan, output_dir: Path, options: MergeOptions) -> Path:
    """Merge every tensor name in turn and publish the folder through the checkpoint writer."""
    out_dtype = _output_dtype(spec, options, plan.reference, plan.output_names)
    config = dict(plan.reference.reader.config)
    if LM_HEAD in plan.output_names:
        config["tie_word_embeddings"] = False

    side_files_from = (plan.token_model or plan.reference).reader.path
    # Only host-independent facts go into the header: two builds of one recipe
    # from differently located inputs must write identical bytes.
    metadata = {"merge_method": plan.method.name}

    with CheckpointWriter(output_dir, max_shard_bytes=options.max_shard_bytes, dtype=out_dtype) as writer:
        for name, merged in _merged_in_order(plan, options):
            # _merge_one returns tensors that share no memory with the inputs, so the writer need not copy them.
            writer.add_tensor(name, merged, copy=False)
        return writer.finalize(config=config, side_files_from=side_files_from, metadata=metadata)


def _merged_in_order(plan: _Plan, options: MergeOptions):
    """Yield ``(name, merged tensor)`` in output order, merging in a pool of worker threads.

    The pool has the method's ``tensor_threads`` workers, and one more name
    than that is submitted, so the workers merge the next names while this
    thread writes. Results do not depend on the thread count, because random
    drops are seeded by tensor name. When a name is submitted, the OS is asked
    to start reading the name PREFETCH_DISTANCE places later, so disk reads
    overlap the arithmetic.
    """
    names = list(plan.output_names)
    candidates = [item.model for item in plan.inputs] + [plan.base, plan.token_model, plan.reference]
    models = _unique([model for model in candidates if model is not None])
    threads = max(1, plan.method.tensor_threads)

    def prefetch(position: int) -> None:
        if position < len(names):
            for model in models:
                model.reader.prefetch([model.source_name(names[position])])

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        pending: collections.deque = collections.deque()
        for position in range(PREFETCH_DISTANCE):
            prefetch(position)
        for position, name in enumerate(names):
            prefetch(position + PREFETCH_DISTANCE)
            pending.append((name, pool.submit(_merge_one, name, plan, options)))
            if len(pending) > threads:
                done_name, future = pending.popleft()
                yield done_name, future.result()
        while pending:
            done_name, future = pending.popleft()
            yield done_name, future.result()


# How many names ahead of the one being submitted the OS starts reading in the background.
PREFETCH_DISTANCE = 2


def _read_float(model: _Model, name: str, device: str) -> torch.Tensor:
    """Read the tensor that ``model`` provides for ``name`` as float32, rejecting NaN and inf."""
    tensor = model.reader.get_tensor(model.source_name(name))
    if not tensor.is_floating_point():
        return tensor
    tensor = tensor.to(device=device, dtype=torch.float32)
    # aminmax propagates NaN and keeps inf, and costs a fraction of isfinite(tensor).all().
    low, high = torch.aminmax(tensor) if tensor.numel() else (torch.zeros(()), torch.zeros(()))
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        raise MergeError(
            f"tensor {name!r} of model {model.label!r} contains NaN or inf: repair or replace that checkpoint"
        )
    return tensor


def _merge_one(name: str, plan: _Plan, options: MergeOptions) -> torch.Tensor:
    """Read, merge and return one output tensor, then release the input pages it read.

    Without the release, every memory-mapped page read so far would stay in the
    resident set until the readers close, so peak RSS would grow with depth.
    """
    cache: dict[int, torch.Tensor] = {}
    read_models: list[_Model] = []

    def read(model: _Model) -> torch.Tensor:
        # The same model listed twice is read once and used twice.
        key = id(model)
        if key not in cache:
            read_models.append(model)
            cache[key] = _read_float(model, name, options.device)
        return cache[key]

    try:
        merged = _merge_read(name, plan, read)
        # Where the result is an input itself (a tensor passed through unmerged), copy it: the writer keeps
        # merged tensors without copying, and two output names may view the same input bytes.
        if any(_shares_storage(merged, tensor) for tensor in cache.values()):
            merged = merged.clone()
        return merged
    finally:
        cache.clear()
        for model in read_models:
            model.reader.release([model.source_name(name)])


def _shares_storage(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Return whether two tensors start their storage at the same address."""
    return first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()


def _merge_read(name: str, plan: _Plan, read: Callable[[_Model], torch.Tensor]) -> torch.Tensor:
    """Merge one output tensor from the tensors that ``read`` returns for each model."""
    inputs = [read(item.model) for item in plan.inputs]
    base = read(plan.base) if plan.base is not None else None
    if not (inputs[0] if inputs else base).is_floating_point():
        return read(plan.reference)

    per_model = [_model_parameters(plan, item, name) for item in plan.inputs]
    options_for_tensor = _global_parameters(plan, name)
    generator = tensor_generator(plan.seed, name)

    try:
        if name in plan.vocab_names and plan.policy == "fit":
            fill = read(plan.token_model)
            rows = fill.shape[0]
            inputs = [_fit_rows(tensor, rows, fill) for tensor in inputs]
            base = _fit_rows(base, rows, fill) if base is not None else None
        if name in plan.vocab_names and plan.policy == "union":
            merged = _merge_union(plan.method, inputs, base, per_model, options_for_tensor, generator)
        elif inputs:
            merged = plan.method.merge_tensor(inputs, base, per_model, options_for_tensor, generator)
        else:
            merged = base
    except MergeError as error:
        raise MergeError(f"tensor {name!r}: {error}") from error
    return merged.cpu()


def _model_parameters(plan: _Plan, item: _Input, name: str) -> dict[str, Any]:
    """Resolve one input's per-model parameters for tensor ``name``."""
    method = plan.method
    resolved = resolve_parameters(
        method.per_model_parameters, item.parameters, name, plan.num_layers, method.defaults, fallbacks=plan.global_values
    )
    missing = sorted(method.per_model_parameters - set(resolved))
    if missing:
        raise ConfigError(
            f"model {item.model.label!r} has no {missing[0]!r} for tensor {name!r}: "
            "add a value or a fallback entry without filter"
        )
    return resolved


def _global_parameters(plan: _Plan, name: str) -> dict[str, Any]:
    """Resolve the method's global parameters for tensor ``name``."""
    method = plan.method
    resolved = resolve_parameters(method.global_parameters, plan.global_values, name, plan.num_layers, method.defaults)
    missing = sorted(method.global_parameters - set(resolved))
    if missing:
        raise ConfigError(
            f"parameters.{missing[0]} has no value for tensor {name!r}: add a value or a fallback entry without filter"
        )
    return resolved


def _fit_rows(tensor: torch.Tensor, rows: int, fill: torch.Tensor) -> torch.Tensor:
    """Cut ``tensor`` to ``rows`` rows, or extend it with the rows of ``fill`` it lacks."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, fill[tensor.shape[0] : rows]], dim=0)


def _merge_union(
    method: MergeMethod,
    inputs: list[torch.Tensor],
    base: torch.Tensor | None,
    per_model: list[dict[str, Any]],
    options: dict[str, Any],
    generator: torch.Generator,
) -> torch.Tensor:
    """Merge a vocabulary tensor block by block of rows, each among the models that have the block."""
    row_counts = sorted({tensor.shape[0] for tensor in inputs} | ({base.shape[0]} if base is not None else set()))
    blocks = []
    start = 0
    for end in row_counts:
        members = [index for index, tensor in enumerate(inputs) if tensor.shape[0] >= end]
        member_rows = [inputs[index][start:end] for index in members]
        base_rows = base[start:end] if base is not None and base.shape[0] >= end else None

        if not members:
            blocks.append(base_rows)
        elif len(members) == 1 and base_rows is None:
            blocks.append(member_rows[0])
        else:
            if base_rows is None and base is not None:
                base_rows = torch.stack(member_rows).mean(dim=0)
            member_parameters = [per_model[index] for index in members]
            blocks.append(method.merge_tensor(member_rows, base_rows, member_parameters, options, generator))
        start = end
    return torch.cat(blocks, dim=0)
