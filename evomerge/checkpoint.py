"""Checkpoint I/O: lazy reading and atomic, sharded writing of Hugging Face model folders.

``CheckpointReader`` opens a local folder or a Hub id, validates every safetensors
header without reading tensor data, and reads one tensor at a time.
``CheckpointWriter`` streams tensors into shards of bounded size inside a hidden
temporary folder beside the output folder, and renames that folder into place
only when the weights, index, config and tokenizer files are all written.

The safetensors layout that the header checks rely on: an 8-byte little-endian
header length N, N bytes of JSON header, then the data buffer, where each tensor's
``data_offsets`` are ``[begin, end)`` relative to the start of the data buffer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import struct
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from evomerge.exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MergeError,
    UnsafeCheckpointError,
)

logger = logging.getLogger(__name__)

SIDE_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
CONFIG_FILE = "config.json"

# The safetensors library rejects headers above 100 MB, so a larger length means a bad header.
MAX_HEADER_BYTES = 100_000_000
LFS_POINTER_PREFIX = b"version https://git-lfs"

# Number and size of the data blocks that the fingerprint samples from each weight file.
FINGERPRINT_SAMPLES = 16
FINGERPRINT_BLOCK_BYTES = 4096

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    }.items()
    if dtype is not None
}

LAYER_INDEX_PATTERN = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---------------------------------------------------------------------------
# Resolving a model reference to a local folder
# ---------------------------------------------------------------------------


def _env_flag(value: str) -> bool:
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    """Read HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) now, not at import time of huggingface_hub."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(variable)
        if value is not None and value != "":
            return _env_flag(value)
    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> Path:
    """Return the Hub cache folder from HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE or HF_HOME, read now."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _looks_like_local_path(text: str) -> bool:
    # A Hub id is "name" or "org/name", so more slashes or a path prefix mean a local path.
    return (
        text.startswith(("/", "./", "../", "~", "."))
        or "\\" in text
        or text.count("/") > 1
        or Path(text).is_absolute()
    )


def resolve_model_path(
    model: str | os.PathLike,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
) -> Path:
    """Resolve a local model folder or a Hub id to a local folder.

    A Hub id is fetched with ``huggingface_hub.snapshot_download``, which reuses
    the cache and honours HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE (read at call
    time). Only safetensors, JSON and tokenizer files are fetched, plus
    ``pytorch_model*.bin`` when ``allow_pickle`` is true.
    """
    text = os.fspath(model)
    if not text.strip():
        raise CheckpointNotFoundError(
            "model path is empty: give a local model folder or a Hub id such as 'HuggingFaceTB/SmolLM2-135M'"
        )

    local = Path(text).expanduser()
    if local.is_dir():
        if revision is not None:
            logger.debug("Ignoring revision %r for local folder %s", revision, local)
        return local.resolve()
    if local.exists():
        raise CheckpointNotFoundError(
            f"model path {text!r} is a file, not a folder: give the folder that contains config.json and the weights"
        )
    if _looks_like_local_path(text):
        raise CheckpointNotFoundError(f"model folder {text!r} does not exist: check the path")

    return _download_snapshot(text, revision, allow_pickle=allow_pickle)


def _download_snapshot(repo_id: str, revision: str | None, *, allow_pickle: bool) -> Path:
    """Fetch (or find in the cache) the snapshot folder of a Hub model repository."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise CheckpointNotFoundError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub id ('org/name'): "
            f"check the path or the id ({error})"
        ) from error

    offline = _hub_offline()
    cache_dir = _hub_cache_dir()
    revision_text = revision or "main"
    allow_patterns = ["*.safetensors", "*.json", *SIDE_FILES]
    if allow_pickle:
        allow_patterns.append("pytorch_model*.bin")

    logger.info("Resolving Hub model %s (revision %s, offline=%s, cache %s)", repo_id, revision_text, offline, cache_dir)
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            allow_patterns=allow_patterns,
            # Mistral-style repos carry a second full copy of the weights for their own runtime.
            ignore_patterns=["consolidated*.safetensors", "original/*"],
        )
    except LocalEntryNotFoundError as error:
        if offline:
            raise CheckpointNotFoundError(
                f"Hub model {repo_id!r} (revision {revision_text}) is not in the cache {cache_dir} and HF_HUB_OFFLINE "
                f"is set: download it once with network access (`hf download {repo_id}`), point HF_HUB_CACHE at a "
                "cache that has it, or give a local folder"
            ) from error
        raise CheckpointNotFoundError(
            f"Hub model {repo_id!r} (revision {revision_text}) could not be downloaded and is not in the cache "
            f"{cache_dir}: check the network connection or give a local folder ({error})"
        ) from error
    except RevisionNotFoundError as error:
        raise CheckpointNotFoundError(
            f"revision {revision_text!r} of Hub model {repo_id!r} does not exist: give an existing branch, tag or commit"
        ) from error
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise CheckpointNotFoundError(
            f"Hub model {repo_id!r} was not found or access was denied: check the id, or log in with "
            "`hf auth login` for a private or gated repository"
        ) from error
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise CheckpointNotFoundError(
            f"fetching Hub model {repo_id!r} (revision {revision_text}) failed: {error}"
        ) from error

    return Path(snapshot)


# ---------------------------------------------------------------------------
# Safetensors header validation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorInfo:
    """Location, dtype and shape of one tensor, taken from a file header.

    ``offset`` and ``nbytes`` locate a safetensors tensor's data in its file; they are 0 for pickled tensors.
    """

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class _SafetensorsHeader:
    """A parsed safetensors header and the raw bytes it was parsed from."""

    raw: bytes
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    file_size: int


def _reject_lfs_pointer(path: Path, first_bytes: bytes) -> None:
    if first_bytes.startswith(LFS_POINTER_PREFIX):
        raise CorruptCheckpointError(
            f"{path} is a Git LFS pointer file, not the weights: run `git lfs pull` in {path.parent} "
            "or download the model with huggingface_hub"
        )


def _read_safetensors_header(path: Path) -> _SafetensorsHeader:
    """Parse and validate a safetensors header without reading tensor data."""
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        first_bytes = handle.read(8)
        _reject_lfs_pointer(path, first_bytes + handle.read(len(LFS_POINTER_PREFIX)))
        if len(first_bytes) < 8:
            raise CorruptCheckpointError(
                f"{path} is truncated: {file_size} bytes is shorter than the 8-byte header length. Download it again"
            )

        header_length = struct.unpack("<Q", first_bytes)[0]
        if 8 + header_length > file_size:
            raise CorruptCheckpointError(
                f"{path} is truncated or has a bad header: the header length {header_length} runs past the "
                f"file size {file_size}. Download the file again"
            )
        if header_length > MAX_HEADER_BYTES:
            raise CorruptCheckpointError(
                f"{path} has a bad header: header length {header_length} exceeds {MAX_HEADER_BYTES} bytes. "
                "Download the file again"
            )
        handle.seek(8)
        raw = handle.read(header_length)

    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(
            f"{path} has a bad header: it is not valid JSON ({error}). Download the file again"
        ) from error
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has a bad header: expected a JSON object. Download the file again")

    metadata = header.pop("__metadata__", None) or {}
    data_size = file_size - 8 - header_length
    for name, entry in header.items():
        _validate_header_entry(path, name, entry, data_size)

    return _SafetensorsHeader(raw=raw, tensors=header, metadata=dict(metadata), file_size=file_size)


def _validate_header_entry(path: Path, name: str, entry: Any, data_size: int) -> None:
    """Check one tensor entry of a header against the size of the data buffer."""
    try:
        dtype_name = entry["dtype"]
        shape = [int(dim) for dim in entry["shape"]]
        begin, end = (int(offset) for offset in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptCheckpointError(
            f"{path} has a bad header: entry {name!r} lacks a valid dtype, shape or data_offsets ({error}). "
            "Download the file again"
        ) from error

    if begin < 0 or end < begin or any(dim < 0 for dim in shape):
        raise CorruptCheckpointError(
            f"{path} has a bad header: tensor {name!r} has shape {shape} and data_offsets [{begin}, {end}]. "
            "Download the file again"
        )
    if end > data_size:
        raise CorruptCheckpointError(
            f"{path} is truncated: tensor {name!r} ends at data offset {end} but the data section has "
            f"{data_size} bytes. Download the file again"
        )

    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise CorruptCheckpointError(
            f"{path} has a bad header: tensor {name!r} has unsupported dtype {dtype_name!r}"
        )
    expected_bytes = math.prod(shape) * dtype.itemsize
    if end - begin != expected_bytes:
        raise CorruptCheckpointError(
            f"{path} has a bad header: tensor {name!r} of shape {shape} and dtype {dtype_name} needs "
            f"{expected_bytes} bytes but data_offsets span {end - begin}. Download the file again"
        )


def _sample_data_blocks(path: Path, data_start: int, file_size: int) -> bytes:
    """Read evenly spaced blocks of the data section, or all of it when it is small."""
    data_size = file_size - data_start
    with open(path, "rb") as handle:
        if data_size <= FINGERPRINT_SAMPLES * FINGERPRINT_BLOCK_BYTES:
            handle.seek(data_start)
            return handle.read()

        blocks = []
        last_start = data_size - FINGERPRINT_BLOCK_BYTES
        for sample in range(FINGERPRINT_SAMPLES):
            handle.seek(data_start + last_start * sample // (FINGERPRINT_SAMPLES - 1))
            blocks.append(handle.read(FINGERPRINT_BLOCK_BYTES))
        return b"".join(blocks)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({error}): restore or regenerate the file") from error


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


class CheckpointReader:
    """Lazy reader of one model folder: headers on open, tensor data on request.

    The index file, when present, decides which tensors exist and where they are.
    Safetensors files are opened on first use and stay open until ``close``.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        revision: str | None = None,
        *,
        allow_pickle: bool = False,
    ) -> None:
        self.path: Path = resolve_model_path(model, revision, allow_pickle=allow_pickle)
        self.allow_pickle = allow_pickle
        self.config: dict = self._load_config()
        self.metadata: dict[str, str] = {}
        self.weight_files: list[str] = []
        self.format: str = "safetensors"

        self._tensors: dict[str, _TensorInfo] = {}
        self._headers: dict[str, _SafetensorsHeader] = {}
        self._handles: dict[str, mmap.mmap] = {}
        self._pickle_shards: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self._closed = False

        self._scan_weights()
        self.tensor_names: list[str] = list(self._tensors)
        logger.debug(
            "Opened %s: %d tensors in %d %s file(s)",
            self.path, len(self.tensor_names), len(self.weight_files), self.format,
        )

    def _load_config(self) -> dict:
        config_path = self.path / CONFIG_FILE
        if not config_path.is_file():
            return {}
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise CorruptCheckpointError(f"{config_path} must contain a JSON object: restore or regenerate it")
        return config

    # -- discovery -----------------------------------------------------------

    def _scan_weights(self) -> None:
        """Find the weight files, validate them and map every tensor to its file."""
        safetensors_files = sorted(path.name for path in self.path.glob("*.safetensors"))
        if (self.path / SAFETENSORS_INDEX).is_file():
            self._scan_indexed(self.path / SAFETENSORS_INDEX, self._safetensors_keys)
        elif SAFETENSORS_SINGLE in safetensors_files or len(safetensors_files) == 1:
            name = SAFETENSORS_SINGLE if SAFETENSORS_SINGLE in safetensors_files else safetensors_files[0]
            self._scan_single(name, self._safetensors_keys)
        elif safetensors_files:
            raise CorruptCheckpointError(
                f"{self.path} has several safetensors files ({', '.join(safetensors_files)}) but no "
                f"{SAFETENSORS_INDEX}: add the index or keep a single {SAFETENSORS_SINGLE}"
            )
        else:
            self._scan_pickle()

    def _scan_pickle(self) -> None:
        has_index = (self.path / PICKLE_INDEX).is_file()
        if not has_index and not (self.path / PICKLE_SINGLE).is_file():
            pickled = sorted(path.name for path in self.path.glob("pytorch_model*.bin"))
            if not pickled:
                raise CheckpointNotFoundError(
                    f"{self.path} contains no model weights (no *.safetensors and no {PICKLE_SINGLE}): "
                    "give a folder with a model.safetensors file or a sharded checkpoint with its index"
                )
            raise CorruptCheckpointError(
                f"{self.path} has pickled shards ({', '.join(pickled)}) but no {PICKLE_INDEX}: restore the index"
            )
        if not self.allow_pickle:
            raise UnsafeCheckpointError(
                f"{self.path} contains only pickled PyTorch weights (pytorch_model*.bin), which can run code on load: "
                "convert them to safetensors, or opt in with allow_pickle=True (merge.allow_pickle: true in the config)"
            )

        self.format = "pickle"
        if has_index:
            self._scan_indexed(self.path / PICKLE_INDEX, self._pickle_keys)
        else:
            self._scan_single(PICKLE_SINGLE, self._pickle_keys)

    def _scan_single(self, file_name: str, read_keys) -> None:
        self.weight_files = [file_name]
        for name, info in read_keys(file_name).items():
            self._tensors[name] = info
        if self.format == "safetensors":
            self.metadata = dict(self._headers[file_name].metadata)

    def _scan_indexed(self, index_path: Path, read_keys) -> None:
        """Map tensors from an index file and check that every shard agrees with it."""
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(
                f"{index_path} has no weight_map: restore the index file that came with the shards"
            )

        shard_names = list(dict.fromkeys(weight_map.values()))
        shard_contents: dict[str, dict[str, _TensorInfo]] = {}
        for shard in shard_names:
            if not isinstance(shard, str) or not (self.path / shard).is_file():
                raise CorruptCheckpointError(
                    f"shard {shard!r} listed in {index_path.name} is missing from {self.path}: download it again"
                )
            shard_contents[shard] = read_keys(shard)

        for name, shard in weight_map.items():
            info = shard_contents[shard].get(name)
            if info is None:
                self._read_unlisted_shards(index_path, shard_contents, read_keys)
                holders = [other for other, content in shard_contents.items() if name in content]
                if holders:
                    raise CorruptCheckpointError(
                        f"tensor {name!r} is listed in {shard} by {index_path.name} but stored in "
                        f"{', '.join(holders)}: regenerate the index or download the checkpoint again"
                    )
                raise CorruptCheckpointError(
                    f"tensor {name!r} is listed in {shard} by {index_path.name} but missing from that shard: "
                    "download the shard again"
                )
            self._tensors[name] = info

        unlisted = sum(len(set(content) - set(weight_map)) for content in shard_contents.values())
        if unlisted:
            logger.warning("%s: ignoring %d tensors that the index does not list", self.path, unlisted)

        self.weight_files = shard_names
        metadata = index.get("metadata") or {}
        self.metadata = {key: str(value) for key, value in metadata.items() if key != "total_size"}

    def _read_unlisted_shards(self, index_path: Path, shard_contents: dict, read_keys) -> None:
        """Add the weight files that the index does not name, to report where a misplaced tensor is."""
        pattern = "*.safetensors" if index_path.name == SAFETENSORS_INDEX else "pytorch_model*.bin"
        for path in sorted(self.path.glob(pattern)):
            if path.name not in shard_contents:
                try:
                    shard_contents[path.name] = read_keys(path.name)
                except CheckpointError:
                    continue

    def _safetensors_keys(self, file_name: str) -> dict[str, _TensorInfo]:
        header = _read_safetensors_header(self.path / file_name)
        self._headers[file_name] = header
        data_start = 8 + len(header.raw)
        keys = {}
        for name, entry in header.tensors.items():
            begin, end = (int(offset) for offset in entry["data_offsets"])
            shape = tuple(int(dim) for dim in entry["shape"])
            keys[name] = _TensorInfo(file_name, SAFETENSORS_DTYPES[entry["dtype"]], shape, data_start + begin, end - begin)
        return keys

    def _pickle_keys(self, file_name: str) -> dict[str, _TensorInfo]:
        state_dict = self._load_pickle(file_name)
        return {
            name: _TensorInfo(file_name, tensor.dtype, tuple(tensor.shape))
            for name, tensor in state_dict.items()
            if isinstance(tensor, torch.Tensor)
        }

    def _load_pickle(self, file_name: str) -> dict[str, torch.Tensor]:
        """Load one pickled shard with weights_only=True, memory-mapped when the file format allows it."""
        if file_name in self._pickle_shards:
            return self._pickle_shards[file_name]

        path = self.path / file_name
        with open(path, "rb") as handle:
            _reject_lfs_pointer(path, handle.read(len(LFS_POINTER_PREFIX)))
        try:
            try:
                state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                # Files from torch.save(..., _use_new_zipfile_serialization=False) cannot be memory-mapped.
                if "mmap" not in str(error):
                    raise
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types for a damaged or hostile file.
            raise CorruptCheckpointError(
                f"{path} could not be loaded with torch.load(weights_only=True) ({error}): download it again "
                "or convert it to safetensors"
            ) from error
        if not isinstance(state_dict, dict):
            raise CorruptCheckpointError(f"{path} does not contain a state dict: give a model checkpoint")

        self._pickle_shards[file_name] = state_dict
        return state_dict

    # -- tensor access -------------------------------------------------------

    def _info(self, name: str) -> _TensorInfo:
        info = self._tensors.get(name)
        if info is None:
            raise CheckpointError(
                f"tensor {name!r} is not in {self.path}: use one of its {len(self._tensors)} tensor_names"
            )
        return info

    def has_tensor(self, name: str) -> bool:
        """Return whether the checkpoint contains a tensor of this name."""
        return name in self._tensors

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Return a tensor's shape from the file header, without reading its data."""
        return self._info(name).shape

    def tensor_dtype(self, name: str) -> torch.dtype:
        """Return a tensor's dtype from the file header, without reading its data."""
        return self._info(name).dtype

    def get_tensor(self, name: str) -> torch.Tensor:
        """Return one tensor on the CPU.

        A safetensors tensor is a view of a copy-on-write memory map of its
        file: nothing is copied until it is read, and writing to it changes only
        this process's copy. See ``release`` for giving its pages back.
        """
        if self._closed:
            raise CheckpointError(f"reader for {self.path} is closed: open a new CheckpointReader")
        info = self._info(name)
        if self.format == "pickle":
            return self._load_pickle(info.file)[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)

        data = torch.frombuffer(self._mapping(info.file), dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return data.view(info.dtype).reshape(info.shape)

    def _mapping(self, file_name: str) -> mmap.mmap:
        with self._lock:
            if self._closed:
                raise CheckpointError(f"reader for {self.path} is closed: open a new CheckpointReader")
            mapping = self._handles.get(file_name)
            if mapping is None:
                with open(self.path / file_name, "rb") as handle:
                    mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                self._handles[file_name] = mapping
            return mapping

    def _page_ranges(self, names: list[str]):
        """Yield ``(mapping, start, length)`` for the whole pages inside each named safetensors tensor."""
        if self.format != "safetensors" or self._closed:
            return
        for name in names:
            info = self._tensors.get(name)
            if info is None or not info.nbytes:
                continue
            start = -(-info.offset // mmap.PAGESIZE) * mmap.PAGESIZE
            end = (info.offset + info.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
            if end > start:
                yield self._mapping(info.file), start, end - start

    def prefetch(self, names: list[str]) -> None:
        """Ask the OS to start reading these tensors from disk in the background.

        Does nothing for pickled checkpoints or where ``madvise`` is missing. Unknown names are skipped.
        """
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        for mapping, start, length in self._page_ranges(names):
            mapping.madvise(mmap.MADV_WILLNEED, start, length)

    def release(self, names: list[str]) -> None:
        """Unmap the pages of these tensors from this process, so they stop counting in its resident set.

        Reading a released tensor again reads the file again. In-place changes
        made to a released tensor's pages are lost, so release only tensors
        that nothing will write to or read from again. The OS may keep the file
        pages in its page cache. Does nothing for pickled checkpoints or where
        ``madvise`` is missing.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for mapping, start, length in self._page_ranges(names):
            mapping.madvise(mmap.MADV_DONTNEED, start, length)

    # -- identity and lifetime ----------------------------------------------

    def fingerprint(self) -> str:
        """Hash the weight files' names, sizes, headers and sampled data blocks, plus config.json.

        Safetensors files are sampled at FINGERPRINT_SAMPLES evenly spaced blocks
        of the data section (the whole section when it is small), so two
        fine-tunes with identical headers still differ. Pickled files are hashed
        whole.
        """
        # NOTE: a change confined to unsampled bytes of a large safetensors file keeps the fingerprint.
        digest = hashlib.sha256()
        for file_name in sorted(self.weight_files):
            path = self.path / file_name
            size = path.stat().st_size
            digest.update(f"{file_name}\0{size}\0".encode())
            header = self._headers.get(file_name)
            if header is not None:
                digest.update(header.raw)
                digest.update(_sample_data_blocks(path, 8 + len(header.raw), size))
            else:
                with open(path, "rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)

        config_path = self.path / CONFIG_FILE
        digest.update(b"\0config\0")
        if config_path.is_file():
            digest.update(config_path.read_bytes())
        return digest.hexdigest()

    def close(self) -> None:
        """Close every open shard handle, after which get_tensor raises CheckpointError."""
        with self._lock:
            for mapping in self._handles.values():
                try:
                    mapping.close()
                except BufferError:
                    # Tensors still view this map; it is unmapped when the last of them is freed.
                    pass
            self._handles.clear()
            self._pickle_shards.clear()
            self._closed = True

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, tensors={len(self.tensor_names)}, format={self.format!r})"


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def copy_side_files(source: str | os.PathLike, destination: str | os.PathLike) -> list[str]:
    """Copy the SIDE_FILES that exist in ``source`` into ``destination`` and return their names."""
    source_path = resolve_model_path(source)
    destination_path = Path(destination)
    destination_path.mkdir(parents=True, exist_ok=True)

    copied = []
    for file_name in SIDE_FILES:
        candidate = source_path / file_name
        if candidate.is_file():
            # copyfile follows symlinks, which Hub cache snapshots use for every file.
            shutil.copyfile(candidate, destination_path / file_name)
            copied.append(file_name)
    logger.debug("Copied %d side files from %s to %s", len(copied), source_path, destination_path)
    return copied


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(resolved, torch.dtype) and resolved.is_floating_point:
            return resolved
    raise CheckpointError(
        f"output dtype {dtype!r} is invalid: use torch.float32, torch.float16, torch.bfloat16 or None to keep each "
        "tensor's dtype"
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_json(config: dict) -> str:
    """Serialise a config as transformers does: indented JSON with sorted keys."""

    def encode_extra(value: Any) -> Any:
        if isinstance(value, torch.dtype):
            return _dtype_name(value)
        raise CheckpointError(
            f"config value {value!r} of type {type(value).__name__} cannot be written to config.json: "
            "convert it to a JSON type"
        )

    return json.dumps(config, indent=2, sort_keys=True, default=encode_extra) + "\n"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# Shards of 256 MiB keep a merge's memory bounded by one shard rather than by
# the model size, because the writer keeps the pending shard in memory.
DEFAULT_MAX_SHARD_BYTES = 256 * 1024**2


def _sort_header_metadata(path: Path) -> None:
    """Rewrite the ``__metadata__`` of a safetensors header in sorted key order, in place.

    safetensors 0.8 writes metadata keys in hash-map order, which changes from
    one save to the next. Two builds of one candidate must give identical
    bytes, because concurrent writers of one key in a remote store may each
    upload some of the files.
    """
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = handle.read(length)
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None)
        if not metadata:
            return
        ordered = {"__metadata__": dict(sorted(metadata.items())), **header}
        encoded = json.dumps(ordered, separators=(",", ":")).encode()
        if len(encoded) > length:
            raise CheckpointError(f"{path}: the sorted safetensors header is longer than the original; cannot rewrite it")
        handle.seek(8)
        handle.write(encoded + b" " * (length - len(encoded)))


class CheckpointWriter:
    """Streaming writer of a safetensors model folder, published atomically.

    Tensors collect in a pending shard. When the next tensor would push the
    pending tensor bytes past ``max_shard_bytes``, the pending shard is written
    to a hidden temporary folder beside ``output_dir``, so memory keeps at most
    one shard. A tensor larger than the limit gets a shard of its own. Shard
    sizes count tensor bytes only, as huggingface_hub's
    ``split_torch_state_dict_into_shards`` (used by ``save_pretrained``) does.

    As a context manager, an exception inside the block, or leaving the block
    without ``finalize``, removes the temporary folder and publishes nothing.
    Without the context manager, call ``finalize`` or ``abort``, because the
    temporary folder exists from construction on.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        dtype: torch.dtype | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise CheckpointError(
                f"max_shard_bytes {max_shard_bytes!r} is invalid: give a positive number of bytes"
            )
        self.output_dir = Path(output_dir).expanduser().absolute()
        self.max_shard_bytes = max_shard_bytes
        self.dtype = _resolve_dtype(dtype)
        self.overwrite = overwrite
        self._check_output_free()

        # The temporary folder sits beside output_dir so the final rename stays on one filesystem.
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        self.temp_dir = self.output_dir.parent / f".{self.output_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.temp_dir.mkdir()

        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shard_files: list[str] = []
        self._weight_map: dict[str, int] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._bytes_by_dtype: Counter[torch.dtype] = Counter()
        self._total_size = 0
        self._state = "open"
        logger.debug("Writing checkpoint for %s in %s", self.output_dir, self.temp_dir)

    def _check_output_free(self) -> None:
        if self.output_dir.exists() and not self.overwrite:
            raise CheckpointError(
                f"output folder {self.output_dir} already exists: choose another folder or pass overwrite=True"
            )

    def _check_open(self) -> None:
        if self._state != "open":
            raise CheckpointError(
                f"writer for {self.output_dir} is already {self._state}: create a new CheckpointWriter"
            )

    # -- adding tensors -----------------------------------------------------

    def add_tensor(self, name: str, tensor: torch.Tensor, *, copy: bool = True) -> None:
        """Cast, copy and queue one tensor, writing the pending shard first when it is full.

        The writer keeps its own contiguous CPU copy, so tensors that share
        storage (tied or repeated layers) are written as independent tensors and
        the caller may modify ``tensor`` afterwards. With ``copy=False`` the
        caller hands ``tensor`` over: when it is already a contiguous CPU tensor
        in the output dtype that owns all of its storage, the writer keeps it
        without a copy, and the caller must not modify it. Only floating-point
        tensors are cast to the output dtype.
        """
        self._check_open()
        if not isinstance(name, str) or not name:
            raise MergeError(f"tensor name {name!r} is invalid: give a non-empty string")
        if name in self._weight_map:
            raise MergeError(f"tensor {name!r} was added twice to {self.output_dir}: give each tensor a unique name")
        if not isinstance(tensor, torch.Tensor):
            raise MergeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.device.type == "meta":
            raise MergeError(f"tensor {name!r} is on the meta device and has no data: materialise it before writing")

        owned = self._owned_copy(name, tensor, copy)
        size = owned.numel() * owned.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush_pending()
        if size > self.max_shard_bytes:
            logger.warning(
                "Tensor %s has %d bytes, more than max_shard_bytes %d: it gets a shard of its own",
                name, size, self.max_shard_bytes,
            )

        self._pending[name] = owned
        self._pending_bytes += size
        self._weight_map[name] = len(self._shard_files)
        self._shapes[name] = tuple(owned.shape)
        self._total_size += size
        if owned.is_floating_point():
            self._bytes_by_dtype[owned.dtype] += size

    def _owned_copy(self, name: str, tensor: torch.Tensor, copy: bool) -> torch.Tensor:
        """Return a contiguous CPU tensor in the output dtype that owns its whole storage.

        With ``copy`` the result also shares no memory with ``tensor``.
        """
        source = tensor.detach()
        result = source.to("cpu")
        if self.dtype is not None and result.is_floating_point() and result.dtype != self.dtype:
            result = result.to(self.dtype)
            self._check_cast_overflow(name, source, result)
        result = result.contiguous()

        shares_input = copy and result.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
        if shares_input or result.untyped_storage().nbytes() != result.numel() * result.element_size():
            result = result.clone()
        return result

    def _check_cast_overflow(self, name: str, source: torch.Tensor, result: torch.Tensor) -> None:
        """Raise MergeError where the cast turned finite values into inf."""
        if bool(torch.isfinite(result).all()):
            return
        source_cpu = source.to("cpu")
        overflowed = torch.isfinite(source_cpu) & ~torch.isfinite(result)
        count = int(overflowed.sum())
        if count == 0:
            return
        largest = float(source_cpu[overflowed].abs().max())
        limit = torch.finfo(result.dtype).max
        raise MergeError(
            f"tensor {name!r}: casting {_dtype_name(source.dtype)} to {_dtype_name(result.dtype)} turns {count} finite "
            f"values into inf (largest magnitude {largest:.6g}, {_dtype_name(result.dtype)} max {limit:.6g}): "
            "write with dtype bfloat16 or float32"
        )

    def _flush_pending(self, metadata: dict[str, str] | None = None) -> None:
        """Write the pending tensors as the next shard file in the temporary folder."""
        if not self._pending:
            return
        file_name = f"shard-{len(self._shard_files) + 1:05d}.safetensors"
        path = self.temp_dir / file_name
        save_file(self._pending, str(path), metadata={"format": "pt", **(metadata or {})})
        # safetensors creates the file with mode 0600; give it the mode the other files get.
        os.chmod(path, 0o666 & ~_UMASK)
        _sort_header_metadata(path)
        _fsync_file(path)
        logger.debug("Wrote %s: %d tensors, %d bytes", path, len(self._pending), self._pending_bytes)

        self._shard_files.append(file_name)
        self._pending = {}
        self._pending_bytes = 0

    # -- finishing ----------------------------------------------------------

    def finalize(
        self,
        config: dict | None = None,
        side_files_from: str | os.PathLike | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Path:
        """Write the last shard, the index, config.json and side files, then publish the folder.

        ``config`` defaults to config.json of ``side_files_from`` when that has
        one. The written config gets dtype, vocab_size, num_hidden_layers and
        tie_word_embeddings that match the written tensors. ``metadata`` goes
        into the header of a single-file checkpoint, or into the index metadata
        of a sharded one.
        """
        self._check_open()
        if not self._weight_map:
            raise CheckpointError(f"no tensors were added for {self.output_dir}: add tensors before finalize")
        metadata = self._validated_metadata(metadata)

        try:
            sharded = bool(self._shard_files)
            self._flush_pending(metadata=None if sharded else metadata)
            weight_files = self._name_shards()
            if len(weight_files) > 1:
                self._write_index(weight_files, metadata)

            source_config = None
            if side_files_from is not None:
                copy_side_files(side_files_from, self.temp_dir)
                source_config = self._source_config(side_files_from)
            base_config = config if config is not None else source_config
            if base_config is not None:
                written_config = self._consistent_config(base_config)
                (self.temp_dir / CONFIG_FILE).write_text(_config_json(written_config))
            else:
                logger.warning("No config given for %s: writing weights without config.json", self.output_dir)

            self._publish()
        except BaseException:
            self.abort()
            raise

        self._state = "finalized"
        logger.info(
            "Published %s: %d tensors, %d bytes in %d file(s)",
            self.output_dir, len(self._weight_map), self._total_size, len(self._shard_files),
        )
        return self.output_dir

    @staticmethod
    def _validated_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
        metadata = dict(metadata or {})
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise CheckpointError(
                    f"metadata entry {key!r}: {value!r} is invalid: safetensors metadata keys and values must be strings"
                )
        return metadata

    @staticmethod
    def _source_config(side_files_from: str | os.PathLike) -> dict | None:
        config_path = resolve_model_path(side_files_from) / CONFIG_FILE
        if not config_path.is_file():
            return None
        return _read_json(config_path)

    def _name_shards(self) -> list[str]:
        """Rename the temporary shard files to their final names and return those names."""
        count = len(self._shard_files)
        if count == 1:
            final_names = [SAFETENSORS_SINGLE]
        else:
            final_names = [f"model-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]
        for temporary, final in zip(self._shard_files, final_names):
            os.replace(self.temp_dir / temporary, self.temp_dir / final)
        self._shard_files = final_names
        return final_names

    def _write_index(self, weight_files: list[str], metadata: dict[str, str]) -> None:
        index = {
            "metadata": {**metadata, "total_size": self._total_size},
            "weight_map": {name: weight_files[shard] for name, shard in self._weight_map.items()},
        }
        (self.temp_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def _output_dtype(self) -> torch.dtype | None:
        if self.dtype is not None:
            return self.dtype
        if not self._bytes_by_dtype:
            return None
        return self._bytes_by_dtype.most_common(1)[0][0]

    def _consistent_config(self, config: dict | Any) -> dict:
        """Return a copy of ``config`` whose shape and dtype fields match the written tensors."""
        # A transformers PretrainedConfig is accepted as well as a plain dict.
        if not isinstance(config, dict) and hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, dict):
            raise CheckpointError(
                f"config of type {type(config).__name__} is invalid: give a dict or a transformers PretrainedConfig"
            )
        result = copy.deepcopy(config)
        output_dtype = self._output_dtype()
        if output_dtype is not None:
            # transformers 5 reads "dtype" and transformers 4 reads "torch_dtype".
            result["dtype"] = _dtype_name(output_dtype)
            result["torch_dtype"] = _dtype_name(output_dtype)

        embedding = next((name for name in self._weight_map if name.endswith("embed_tokens.weight")), None)
        if embedding is not None:
            result["vocab_size"] = self._shapes[embedding][0]
            has_lm_head = any(name == "lm_head.weight" or name.endswith(".lm_head.weight") for name in self._weight_map)
            result["tie_word_embeddings"] = not has_lm_head

        layer_indices = [int(match.group(1)) for name in self._weight_map if (match := LAYER_INDEX_PATTERN.search(name))]
        if layer_indices:
            layer_count = max(layer_indices) + 1
            result["num_hidden_layers"] = layer_count
            layer_types = result.get("layer_types")
            # NOTE: per-layer lists such as layer_types are not rebuilt when the layer count changes.
            if isinstance(layer_types, list) and len(layer_types) != layer_count:
                logger.warning(
                    "config layer_types has %d entries but %d layers were written to %s",
                    len(layer_types), layer_count, self.output_dir,
                )
        return result

    def _publish(self) -> None:
        """Rename the temporary folder to output_dir, replacing an old folder only with overwrite."""
        _fsync_directory(self.temp_dir)
        self._check_output_free()
        old_dir = None
        try:
            if self.output_dir.exists():
                old_dir = self.output_dir.parent / f".{self.output_dir.name}.old-{uuid.uuid4().hex[:12]}"
                os.replace(self.output_dir, old_dir)
            os.replace(self.temp_dir, self.output_dir)
        except OSError as error:
            if old_dir is not None and not self.output_dir.exists():
                os.replace(old_dir, self.output_dir)
            raise CheckpointError(
                f"publishing {self.output_dir} failed ({error}): check that the folder is writable and not in use"
            ) from error
        _fsync_directory(self.output_dir.parent)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)

    def abort(self) -> None:
        """Remove the temporary folder and discard pending tensors, unless finalize already published them."""
        if self._state == "finalized":
            return
        self._pending = {}
        self._pending_bytes = 0
        if self.temp_dir.exists():
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._state == "open":
            logger.debug("Aborted checkpoint for %s", self.output_dir)
        self._state = "aborted"

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if self._state == "open":
            if exc_type is None:
                logger.warning("CheckpointWriter for %s left without finalize: nothing was published", self.output_dir)
            self.abort()


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    output_dir: str | os.PathLike,
    *,
    config: dict | None = None,
    side_files_from: str | os.PathLike | None = None,
    **writer_kwargs: Any,
) -> Path:
    """Write a whole state dict as a model folder with CheckpointWriter and return the folder.

    ``writer_kwargs`` go to CheckpointWriter, except ``metadata``, which goes to ``finalize``.
    """
    metadata = writer_kwargs.pop("metadata", None)
    with CheckpointWriter(output_dir, **writer_kwargs) as writer:
        for name, tensor in state_dict.items():
            writer.add_tensor(name, tensor)
        return writer.finalize(config=config, side_files_from=side_files_from, metadata=metadata)
