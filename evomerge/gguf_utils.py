"""Read, convert and write GGUF files for the llama architecture.

The ``gguf`` package (the llama.cpp project's Python library) does the byte
work: ``GGUFReader`` parses the file, ``gguf.quants`` quantises and
dequantises blocks, ``GGUFWriter`` writes files, ``TensorNameMap`` maps
Hugging Face tensor names to GGUF names and ``SpecialVocab`` collects merges,
special token ids and the chat template of a Hugging Face folder.

llama.cpp's ``convert_hf_to_gguf.py`` reorders the rows of ``q_proj`` and
``k_proj`` of llama models, because llama.cpp rotates adjacent value pairs
while transformers rotates the two halves of each head. ``hf_to_gguf``
applies that permutation and ``gguf_to_hf`` undoes it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from evomerge.exceptions import GGUFError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

# Output types of hf_to_gguf and the general.file_type value llama.cpp expects for each.
EXPORT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# llama.cpp pre-tokenizer names whose split puts every digit in its own piece before the GPT-2
# byte-level regex. For "smollm" this matches transformers 5.25's own GGUF tokenizer on "12345".
DIGIT_SPLITTING_PRE_TOKENIZERS = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Name, numpy-order shape and GGML type name (e.g. ``"Q4_1"``) of one tensor in a GGUF file."""

    name: str
    shape: tuple[int, ...]
    type: str


@dataclass
class GGUFModel:
    """An open GGUF file: its metadata as Python values and its tensor list."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    _reader: gguf.GGUFReader = field(repr=False)

    def tensor_info(self, name: str) -> GGUFTensorInfo:
        """Return the entry for tensor ``name``; raise GGUFError when the file has none."""
        for info in self.tensors:
            if info.name == name:
                return info
        raise GGUFError(
            f"tensor {name!r} not found in {self.path}: the file has {len(self.tensors)} tensors, "
            f"e.g. {[info.name for info in self.tensors[:5]]}"
        )

    def load_tensor(self, name: str) -> torch.Tensor:
        """Dequantise tensor ``name`` to a float32 torch tensor of its numpy-order shape."""
        info = self.tensor_info(name)
        reader_tensor = next(t for t in self._reader.tensors if t.name == name)
        try:
            values = gguf.quants.dequantize(reader_tensor.data, reader_tensor.tensor_type)
        except NotImplementedError:
            raise GGUFError(
                f"tensor {name!r} in {self.path} has type {info.type}, which gguf {_gguf_version()} "
                "cannot dequantise: convert the file with llama.cpp to Q8_0, F16 or F32 first"
            ) from None
        values = np.array(values, dtype=np.float32, copy=True).reshape(info.shape)
        return torch.from_numpy(values)


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _field_value(reader_field: gguf.ReaderField) -> Any:
    """Return a metadata field as a Python value; arrays of strings become lists of str."""
    return reader_field.contents()


def read_gguf(path: str | Path) -> GGUFModel:
    """Open a GGUF file and read its metadata and tensor table (tensor data stays memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {str(path)!r} not found: check the path")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, TypeError) as error:
        raise GGUFError(
            f"{path} is not a readable GGUF file ({error}): check that the download finished "
            "and that the file is not a Git LFS pointer"
        ) from None

    metadata = {}
    for key, reader_field in reader.fields.items():
        # GGUF.version, GGUF.tensor_count and GGUF.kv_count are header fields, not key-value pairs.
        if key.startswith("GGUF."):
            continue
        metadata[key] = _field_value(reader_field)

    tensors = [
        GGUFTensorInfo(
            name=tensor.name,
            shape=tuple(int(dim) for dim in reversed(tensor.shape.tolist())),
            type=tensor.tensor_type.name,
        )
        for tensor in reader.tensors
    ]
    return GGUFModel(path=path, metadata=metadata, tensors=tensors, _reader=reader)


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face order to llama.cpp order, as ``convert_hf_to_gguf.py`` does."""
    head_dim_half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, head_dim_half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def reverse_permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo ``permute_qk``: reorder q/k rows from llama.cpp order to Hugging Face order."""
    head_dim_half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, head_dim_half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _require(metadata: dict[str, Any], key: str, path: Path) -> Any:
    if key not in metadata:
        raise GGUFError(f"{path} lacks the metadata key {key!r}, which a llama GGUF file must have")
    return metadata[key]


def llama_config_from_gguf(model: GGUFModel) -> dict[str, Any]:
    """Build a Hugging Face ``LlamaConfig`` dict from the ``llama.*`` metadata of a GGUF file."""
    from transformers import LlamaConfig

    metadata = model.metadata
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{model.path} has architecture {architecture!r}; only {list(SUPPORTED_ARCHITECTURES)} can be "
            "converted: use transformers' own GGUF loader for other architectures"
        )

    hidden_size = int(_require(metadata, "llama.embedding_length", model.path))
    n_head = int(_require(metadata, "llama.attention.head_count", model.path))
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    vocab_size = int(metadata.get("llama.vocab_size", len(tokens)))
    head_dim = int(metadata.get("llama.attention.key_length", hidden_size // n_head))
    names = {info.name for info in model.tensors}

    if "rope_freqs.weight" in names or "llama.rope.scaling.type" in metadata:
        # NOTE: Llama 3.1 style rope scaling is stored as rope_freqs; mapping it back is not implemented.
        raise GGUFError(
            f"{model.path} uses rope scaling, which gguf_to_hf does not convert: "
            "load it with transformers' GGUF loader instead"
        )

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=int(_require(metadata, "llama.feed_forward_length", model.path)),
        num_hidden_layers=int(_require(metadata, "llama.block_count", model.path)),
        num_attention_heads=n_head,
        num_key_value_heads=int(metadata.get("llama.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        max_position_embeddings=int(metadata.get("llama.context_length", 2048)),
        rms_norm_eps=float(metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        architectures=["LlamaForCausalLM"],
    )
    return config.to_dict()


def hf_to_gguf_name_map(config_dict: dict[str, Any]) -> dict[str, str]:
    """Map every Hugging Face tensor name of a llama model to its GGUF name, using ``gguf.TensorNameMap``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_dict(config_dict)
    with torch.device("meta"):
        hf_names = list(LlamaForCausalLM(config).state_dict())
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    mapping = {}
    for hf_name in hf_names:
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFError(f"no GGUF name for the llama tensor {hf_name!r} in gguf {_gguf_version()}")
        mapping[hf_name] = gguf_name
    return mapping


def build_tokenizer_from_gguf(model: GGUFModel):
    """Build a transformers fast tokenizer from a GGUF file's ``gpt2`` BPE vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    metadata = model.metadata
    tokenizer_model = metadata.get("tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise GGUFError(
            f"{model.path} has tokenizer model {tokenizer_model!r}; only the byte-level BPE 'gpt2' "
            "tokenizer is converted: load the tokenizer with transformers' GGUF loader instead"
        )

    tokens = list(_require(metadata, "tokenizer.ggml.tokens", model.path))
    token_types = list(metadata.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens)))
    merges = [tuple(merge.split(" ", 1)) for merge in _require(metadata, "tokenizer.ggml.merges", model.path)]

    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token in vocab:
            # NOTE: a repeated token string keeps its first id, so the later id never comes out of encode.
            logger.warning("token %r appears at ids %d and %d in %s; keeping id %d", token, vocab[token], index, model.path, vocab[token])
            continue
        vocab[token] = index

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    add_prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    pre_name = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre_name in DIGIT_SPLITTING_PRE_TOKENIZERS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        if pre_name not in ("gpt2", "default"):
            # NOTE: other llama.cpp pre-tokenizers use their own split regex; the GPT-2 regex is an approximation.
            logger.warning("pre-tokenizer %r of %s is converted as the GPT-2 byte-level split", pre_name, model.path)
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()

    special = [
        AddedToken(tokens[index], special=True, normalized=False)
        for index, kind in enumerate(token_types)
        if int(kind) == gguf.TokenType.CONTROL
    ]
    user_defined = [
        AddedToken(tokens[index], special=False, normalized=False)
        for index, kind in enumerate(token_types)
        if int(kind) == gguf.TokenType.USER_DEFINED
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)

    def token_for(key: str) -> str | None:
        token_id = metadata.get(key)
        return tokens[int(token_id)] if token_id is not None and int(token_id) < len(tokens) else None

    bos = token_for("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = int(metadata["tokenizer.ggml.bos_token_id"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=token_for("tokenizer.ggml.eos_token_id"),
        unk_token=token_for("tokenizer.ggml.unknown_token_id"),
        pad_token=token_for("tokenizer.ggml.padding_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
        model_max_length=int(metadata.get("llama.context_length", 2048)),
        clean_up_tokenization_spaces=False,
    )


def _staging_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"


def _write_weights(tensors: dict[str, torch.Tensor], config_dict: dict[str, Any], staging: Path) -> None:
    """Write safetensors and config.json, with evomerge.checkpoint.CheckpointWriter when that module exists."""
    try:
        from evomerge.checkpoint import CheckpointWriter
    except ImportError:
        CheckpointWriter = None

    if CheckpointWriter is not None:
        with CheckpointWriter(staging, max_shard_bytes=2 * 1024**3, dtype=None) as writer:
            for name, tensor in tensors.items():
                writer.add_tensor(name, tensor)
            writer.finalize(config=config_dict, side_files_from=None)
        return

    from safetensors.torch import save_file

    staging.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True), encoding="utf-8")


def gguf_to_hf(gguf_path: str | Path, output_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a llama GGUF file to a Hugging Face folder (safetensors, config, tokenizer).

    Tensors are dequantised one at a time and stored as ``dtype``. The folder
    is written beside ``output_dir`` and renamed into place at the end, so a
    failed conversion leaves no half-written model behind.
    """
    from transformers import GenerationConfig

    gguf_path = Path(gguf_path)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise GGUFError(f"output folder {output_dir} already exists and is not empty: remove it or pick another path")

    model = read_gguf(gguf_path)
    config_dict = llama_config_from_gguf(model)
    tokenizer = build_tokenizer_from_gguf(model)
    config_dict["dtype"] = str(dtype).removeprefix("torch.")

    name_map = hf_to_gguf_name_map(config_dict)
    available = {info.name for info in model.tensors}
    missing = sorted(gguf_name for gguf_name in name_map.values() if gguf_name not in available)
    if missing:
        raise GGUFError(f"{gguf_path} lacks the llama tensors {missing[:5]}: the file is incomplete or not a llama model")

    n_head = config_dict["num_attention_heads"]
    n_head_kv = config_dict["num_key_value_heads"]
    tensors: dict[str, torch.Tensor] = {}
    for hf_name, gguf_name in name_map.items():
        values = model.load_tensor(gguf_name)
        if gguf_name.endswith("attn_q.weight"):
            values = torch.from_numpy(reverse_permute_qk(values.numpy(), n_head))
        elif gguf_name.endswith("attn_k.weight"):
            values = torch.from_numpy(reverse_permute_qk(values.numpy(), n_head_kv))
        tensors[hf_name] = values.to(dtype).contiguous()

    staging = _staging_dir(output_dir)
    try:
        _write_weights(tensors, config_dict, staging)
        generation = GenerationConfig(
            bos_token_id=config_dict.get("bos_token_id"),
            eos_token_id=config_dict.get("eos_token_id"),
            pad_token_id=config_dict.get("pad_token_id"),
        )
        generation.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("converted %s (%d tensors) to %s", gguf_path, len(tensors), output_dir)
    return output_dir


class _StrictGGUFWriter(gguf.GGUFWriter):
    """A ``GGUFWriter`` that raises on a repeated metadata key instead of overwriting it."""

    def add_key_value(self, key, val, vtype, sub_type=None) -> None:
        if any(key in kv_data for kv_data in self.kv_data):
            raise GGUFError(
                f"metadata key {key!r} is set twice (new value {val!r}): remove it from extra_metadata, "
                "because hf_to_gguf already writes it"
            )
        super().add_key_value(key, val, vtype, sub_type)


def _load_hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"{model_dir} has no .safetensors files: save the model with safe_serialization=True")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def _rope_theta(config: dict[str, Any], model_dir: Path) -> float:
    rope = config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" or config.get("rope_scaling"):
        raise GGUFError(f"{model_dir} uses rope type {rope_type!r}; hf_to_gguf writes only default rotary embeddings")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Write the tokenizer.ggml.* keys for a byte-level BPE tokenizer.json."""
    from tokenizers import Tokenizer

    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise GGUFError(f"{model_dir} has no tokenizer.json: save a fast tokenizer in the folder first")
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    if tokenizer_json.get("model", {}).get("type") != "BPE":
        raise GGUFError(f"{tokenizer_file} is not a BPE tokenizer: only byte-level BPE tokenizers are exported")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))

    id_to_token = {index: token for token, index in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    size = max(vocab_size, max(id_to_token) + 1)
    tokens, types = [], []
    for index in range(size):
        if index not in id_to_token:
            # llama.cpp fills ids the tokenizer lacks up to the embedding size with unused [PAD<id>] tokens.
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(id_to_token[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(id_to_token[index])
            types.append(gguf.TokenType.NORMAL)

    pre_tokenizer = json.dumps(tokenizer_json.get("pre_tokenizer"))
    splits_digits = '"Digits"' in pre_tokenizer and '"individual_digits": true' in pre_tokenizer
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm" if splits_digits else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)

    special_vocab = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special_vocab.merges:
        raise GGUFError(f"{tokenizer_file} has no BPE merges: a gpt2-style GGUF tokenizer needs them")
    special_vocab.add_to_gguf(writer, quiet=True)


def _encode_tensor(values: np.ndarray, qtype: gguf.GGMLQuantizationType, name: str):
    """Return (array, raw_dtype) for ``GGUFWriter.add_tensor``; 1-D tensors (norm weights) stay F32."""
    if values.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16), gguf.GGMLQuantizationType.F16
    try:
        return gguf.quants.quantize(values, qtype), qtype
    except gguf.QuantError:
        # Q8_0 needs rows that are a multiple of 32 values, so other tensors fall back to F16.
        logger.warning("tensor %s of shape %s cannot be stored as %s; writing F16", name, values.shape, qtype.name)
        return values.astype(np.float16), gguf.GGMLQuantizationType.F16


def hf_to_gguf(
    model_dir: str | Path,
    output_path: str | Path,
    out_type: str = "f16",
    *,
    extra_metadata: dict[str, str | int | float | bool] | None = None,
) -> Path:
    """Export a Hugging Face llama folder to a GGUF file with the keys and layout of llama.cpp's converter.

    ``out_type`` is one of f32, f16, bf16, q8_0 for the 2-D weights; norm
    weights stay F32. ``extra_metadata`` adds keys; a key the exporter already
    writes raises GGUFError. The file is written beside ``output_path`` and
    renamed into place when complete.

    NOTE: the files are checked by reading them back here, not by loading them in llama.cpp itself.
    """
    model_dir = Path(model_dir)
    output_path = Path(output_path)
    if out_type not in EXPORT_TYPES:
        raise GGUFError(f"out_type {out_type!r} is not supported: use one of {sorted(EXPORT_TYPES)}")
    qtype, file_type = EXPORT_TYPES[out_type]

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise GGUFError(f"{model_dir} has no config.json: point model_dir at a Hugging Face model folder")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("model_type") not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{model_dir} has model_type {config.get('model_type')!r}; hf_to_gguf exports only {list(SUPPORTED_ARCHITECTURES)}"
        )

    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    hidden_size = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden_size // n_head)
    tensors = _load_hf_tensors(model_dir)
    vocab_size = int(config["vocab_size"])
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in tensors
    config_for_names = dict(config, tie_word_embeddings=tied)
    name_map = hf_to_gguf_name_map(config_for_names)

    temporary = output_path.with_name(f".{output_path.name}.partial-{uuid.uuid4().hex[:8]}")
    writer = _StrictGGUFWriter(temporary, "llama")
    try:
        writer.add_name(config.get("_name_or_path") or model_dir.name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(vocab_size)
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden_size)
        writer.add_block_count(int(config["num_hidden_layers"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden_size // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_freq_base(_rope_theta(config, model_dir))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        _add_tokenizer(writer, model_dir, vocab_size)
        for key, value in (extra_metadata or {}).items():
            _add_extra(writer, key, value)

        for hf_name, gguf_name in name_map.items():
            if hf_name not in tensors:
                raise GGUFError(f"{model_dir} lacks the tensor {hf_name!r} that a llama model with this config.json has")
            values = tensors[hf_name].to(torch.float32).numpy()
            if gguf_name.endswith("attn_q.weight"):
                values = permute_qk(values, n_head)
            elif gguf_name.endswith("attn_k.weight"):
                values = permute_qk(values, n_head_kv)
            encoded, raw_dtype = _encode_tensor(values, qtype, hf_name)
            writer.add_tensor(gguf_name, encoded, raw_dtype=raw_dtype)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, output_path)
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        raise
    logger.info("exported %s to %s as %s", model_dir, output_path, out_type)
    return output_path


def _add_extra(writer: gguf.GGUFWriter, key: str, value: str | int | float | bool) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        raise GGUFError(f"extra_metadata[{key!r}] has type {type(value).__name__}: use str, int, float or bool")
