"""Tests for checkpoint reading, validation, Hub cache resolution and atomic writing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from evomerge.checkpoint import (
    SAFETENSORS_INDEX,
    CheckpointReader,
    CheckpointWriter,
    copy_side_files,
    resolve_model_path,
    save_state_dict,
)
from evomerge.exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MergeError,
    UnsafeCheckpointError,
)
from evomerge.testing import make_tiny_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tiny_state(tiny_model) -> dict[str, torch.Tensor]:
    return load_file(tiny_model / "model.safetensors")


@pytest.fixture
def sharded_copy(tiny_model, tiny_state, tmp_path) -> Path:
    """Write the tiny model in shards of at most 50 000 tensor bytes."""
    return save_state_dict(tiny_state, tmp_path / "sharded", side_files_from=tiny_model, max_shard_bytes=50_000)


def float_tensors(count: int, numel: int) -> dict[str, torch.Tensor]:
    return {f"t{index}": torch.full((numel,), float(index)) for index in range(count)}


def read_index(folder: Path) -> dict:
    return json.loads((folder / SAFETENSORS_INDEX).read_text())


def write_index(folder: Path, index: dict) -> None:
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index))


# -- reading ----------------------------------------------------------------


def test_reader_single_file_values(tiny_model, tiny_state):
    with CheckpointReader(tiny_model) as reader:
        assert reader.path == tiny_model.resolve()
        assert reader.weight_files == ["model.safetensors"]
        assert set(reader.tensor_names) == set(tiny_state)
        assert reader.config["num_hidden_layers"] == 4
        assert reader.tensor_shape("model.embed_tokens.weight") == (320, 32)
        assert reader.tensor_dtype("model.embed_tokens.weight") == torch.float32
        for name, expected in tiny_state.items():
            assert torch.equal(reader.get_tensor(name), expected), name


def test_reader_missing_tensor_name(tiny_model):
    with CheckpointReader(tiny_model) as reader:
        assert not reader.has_tensor("model.layers.9.mlp.up_proj.weight")
        with pytest.raises(CheckpointError, match="model.layers.9.mlp.up_proj.weight"):
            reader.get_tensor("model.layers.9.mlp.up_proj.weight")


def test_reader_closed_rejects_reads(tiny_model):
    reader = CheckpointReader(tiny_model)
    tensor = reader.get_tensor("lm_head.weight")
    reader.close()
    assert tensor.shape == (320, 32)
    with pytest.raises(CheckpointError, match="closed"):
        reader.get_tensor("lm_head.weight")


def mapped_kib(path: Path) -> int:
    """Resident KiB of this process's memory maps of ``path``, from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:
            inside = line.endswith(str(path))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_reader_release_unmaps_pages(tmp_path):
    values = torch.arange(1_000_000, dtype=torch.float32)
    folder = save_state_dict({"big": values, "small": torch.ones(3)}, tmp_path / "model")
    weights = (folder / "model.safetensors").resolve()
    with CheckpointReader(folder) as reader:
        big = reader.get_tensor("big")
        reader.prefetch(["big", "small", "not-a-tensor"])
        assert torch.equal(big, values)
        resident = mapped_kib(weights)
        reader.release(["big", "not-a-tensor"])
        released = mapped_kib(weights)
        # Reading the tensor again maps its pages back from the file.
        assert torch.equal(big, values)
    assert resident >= 3900
    assert released <= 16


def test_reader_writes_stay_private(tiny_model, tiny_state):
    with CheckpointReader(tiny_model) as reader:
        tensor = reader.get_tensor("lm_head.weight")
        tensor.zero_()
        assert torch.equal(reader.get_tensor("lm_head.weight"), torch.zeros(320, 32))
    assert torch.equal(load_file(tiny_model / "model.safetensors")["lm_head.weight"], tiny_state["lm_head.weight"])


def test_reader_sharded_from_writer(sharded_copy, tiny_state):
    index = read_index(sharded_copy)
    with CheckpointReader(sharded_copy) as reader:
        assert len(reader.weight_files) > 1
        assert reader.tensor_names == list(index["weight_map"])
        for name, expected in tiny_state.items():
            assert torch.equal(reader.get_tensor(name), expected), name


def test_reader_sharded_from_transformers(tiny_model, tiny_state, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = read_index(tmp_path / "hf")

    with CheckpointReader(tmp_path / "hf") as reader:
        assert len(set(index["weight_map"].values())) > 1
        assert reader.tensor_names == list(index["weight_map"])
        for name in reader.tensor_names:
            assert torch.equal(reader.get_tensor(name), tiny_state[name]), name


def test_index_lists_missing_tensor(sharded_copy):
    index = read_index(sharded_copy)
    first_shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.7.ghost.weight"] = first_shard
    write_index(sharded_copy, index)

    with pytest.raises(CorruptCheckpointError, match="model.layers.7.ghost.weight") as error:
        CheckpointReader(sharded_copy)
    assert "missing from that shard" in str(error.value)


def test_index_points_wrong_shard(sharded_copy):
    index = read_index(sharded_copy)
    shards = sorted(set(index["weight_map"].values()))
    actual_shard = index["weight_map"]["lm_head.weight"]
    wrong_shard = next(shard for shard in shards if shard != actual_shard)
    index["weight_map"]["lm_head.weight"] = wrong_shard
    write_index(sharded_copy, index)

    with pytest.raises(CorruptCheckpointError, match="lm_head.weight") as error:
        CheckpointReader(sharded_copy)
    assert f"but stored in {actual_shard}" in str(error.value)


def test_index_shard_file_missing(sharded_copy):
    last_shard = sorted(set(read_index(sharded_copy)["weight_map"].values()))[-1]
    (sharded_copy / last_shard).unlink()
    with pytest.raises(CorruptCheckpointError, match=last_shard):
        CheckpointReader(sharded_copy)


# -- corrupt files ------------------------------------------------------------


@pytest.fixture
def single_copy(tiny_model, tmp_path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(tiny_model, folder)
    return folder


def test_lfs_pointer_rejected(single_copy):
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 163840\n"
    (single_copy / "model.safetensors").write_text(pointer)
    with pytest.raises(CorruptCheckpointError, match="Git LFS pointer") as error:
        CheckpointReader(single_copy)
    assert "model.safetensors" in str(error.value)


def test_truncated_data_rejected(single_copy):
    weights = single_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match="truncated") as error:
        CheckpointReader(single_copy)
    assert "model.safetensors" in str(error.value)


def test_truncated_header_rejected(single_copy):
    weights = single_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(CorruptCheckpointError, match="header length"):
        CheckpointReader(single_copy)


def test_bad_header_json_rejected(single_copy):
    header = b"{not json at all}"
    (single_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        CheckpointReader(single_copy)


def test_header_size_mismatch_rejected(single_copy):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    (single_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CorruptCheckpointError, match="needs 16 bytes"):
        CheckpointReader(single_copy)


# -- pickled and missing weights ------------------------------------------------


@pytest.fixture
def pickled_copy(single_copy, tiny_state) -> Path:
    (single_copy / "model.safetensors").unlink()
    torch.save(tiny_state, single_copy / "pytorch_model.bin")
    return single_copy


def test_pickle_refused_without_opt_in(pickled_copy):
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        CheckpointReader(pickled_copy)


def test_pickle_loaded_with_opt_in(pickled_copy, tiny_state):
    with CheckpointReader(pickled_copy, allow_pickle=True) as reader:
        assert reader.format == "pickle"
        assert set(reader.tensor_names) == set(tiny_state)
        assert reader.tensor_shape("lm_head.weight") == (320, 32)
        assert torch.equal(reader.get_tensor("lm_head.weight"), tiny_state["lm_head.weight"])


def test_pickle_sharded_index(single_copy, tiny_state):
    (single_copy / "model.safetensors").unlink()
    names = list(tiny_state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    weight_map = {}
    for file_name, shard_names in halves.items():
        torch.save({name: tiny_state[name] for name in shard_names}, single_copy / file_name)
        weight_map.update({name: file_name for name in shard_names})
    (single_copy / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    with CheckpointReader(single_copy, allow_pickle=True) as reader:
        assert reader.tensor_names == names
        assert torch.equal(reader.get_tensor(names[-1]), tiny_state[names[-1]])


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="no model weights"):
        CheckpointReader(tmp_path)


def test_missing_local_folder(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "absent")


# -- Hub cache resolution ----------------------------------------------------


@pytest.fixture
def hub_cache(tiny_model, tmp_path, monkeypatch) -> Path:
    """Lay out the tiny model as the Hub cache entry of 'tiny-org/tiny-llama' and go offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot.mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)

    for file in tiny_model.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return snapshot


def test_hub_id_resolves_from_cache(hub_cache, tiny_state):
    assert resolve_model_path("tiny-org/tiny-llama") == hub_cache
    with CheckpointReader("tiny-org/tiny-llama") as reader:
        assert torch.equal(reader.get_tensor("lm_head.weight"), tiny_state["lm_head.weight"])


def test_hub_commit_revision_resolves(hub_cache):
    assert resolve_model_path("tiny-org/tiny-llama", revision=COMMIT) == hub_cache


def test_hub_id_not_cached(hub_cache):
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE") as error:
        resolve_model_path("tiny-org/other-model")
    assert "tiny-org/other-model" in str(error.value)


def test_invalid_hub_id(hub_cache):
    with pytest.raises(CheckpointNotFoundError, match="neither an existing folder nor a valid Hub id"):
        resolve_model_path("bad id with spaces")


# -- fingerprint -------------------------------------------------------------


def test_fingerprint_identity_and_change(tiny_model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    tuned = make_tiny_llama(tmp_path / "tuned", seed=1, base_dir=tiny_model, with_tokenizer=False)

    original_print = CheckpointReader(tiny_model).fingerprint()
    assert CheckpointReader(copy).fingerprint() == original_print
    assert CheckpointReader(tuned).fingerprint() != original_print

    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(config))
    assert CheckpointReader(copy).fingerprint() != original_print


# -- writing -----------------------------------------------------------------


def test_writer_shard_limit(tmp_path):
    # Five tensors of 100 float32 values are 400 bytes each, so a 1000-byte limit fits two per shard.
    output = save_state_dict(float_tensors(5, 100), tmp_path / "out", max_shard_bytes=1000)
    index = read_index(output)
    shards = sorted(set(index["weight_map"].values()))

    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [sorted(load_file(output / shard)) for shard in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    for shard in shards:
        with safe_open(str(output / shard), framework="pt") as handle:
            tensor_bytes = sum(handle.get_tensor(key).nbytes for key in handle.keys())
        assert tensor_bytes <= 1000, shard


def test_writer_keeps_handed_over_tensor(tmp_path):
    tensor = torch.arange(10.0)
    with CheckpointWriter(tmp_path / "out", dtype=torch.float32) as writer:
        writer.add_tensor("kept", tensor, copy=False)
        writer.add_tensor("copied", tensor)
        writer.add_tensor("view", tensor[:5], copy=False)
        kept_pointer = writer._pending["kept"].data_ptr()
        copied_pointer = writer._pending["copied"].data_ptr()
        view_storage = writer._pending["view"].untyped_storage().nbytes()
        output = writer.finalize()
    assert kept_pointer == tensor.data_ptr()
    assert copied_pointer != tensor.data_ptr()
    # A view of a larger storage is copied even when handed over, so only its own bytes are written.
    assert view_storage == 20
    assert torch.equal(load_file(output / "model.safetensors")["view"], torch.arange(5.0))


def test_writer_oversized_tensor_alone(tmp_path):
    tensors = {"small": torch.zeros(10), "large": torch.zeros(1000), "tail": torch.zeros(10)}
    output = save_state_dict(tensors, tmp_path / "out", max_shard_bytes=200)
    weight_map = read_index(output)["weight_map"]
    assert len(set(weight_map.values())) == 3
    assert weight_map["large"] == "model-00002-of-00003.safetensors"


def test_writer_streams_full_shards(tmp_path):
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=1000) as writer:
        for name, tensor in float_tensors(5, 100).items():
            writer.add_tensor(name, tensor)
        written_early = sorted(path.name for path in writer.temp_dir.iterdir())
        writer.finalize()

    # t0..t3 fill two shards on disk and t4 is still pending in memory.
    assert written_early == ["shard-00001.safetensors", "shard-00002.safetensors"]


def test_writer_rejects_second_finalize(tmp_path):
    writer = CheckpointWriter(tmp_path / "out")
    writer.add_tensor("w", torch.zeros(2))
    writer.finalize()
    with pytest.raises(CheckpointError, match="already finalized"):
        writer.finalize()
    with pytest.raises(CheckpointError, match="already finalized"):
        writer.add_tensor("v", torch.zeros(2))


def test_writer_rejects_empty_finalize(tmp_path):
    with CheckpointWriter(tmp_path / "out") as writer:
        with pytest.raises(CheckpointError, match="no tensors"):
            writer.finalize()
    assert list(tmp_path.iterdir()) == []


def test_sharded_metadata_in_index(tmp_path):
    output = save_state_dict(float_tensors(3, 100), tmp_path / "out", max_shard_bytes=400, metadata={"recipe": "r1"})
    assert read_index(output)["metadata"] == {"recipe": "r1", "total_size": 1200}
    with CheckpointReader(output) as reader:
        assert reader.metadata == {"recipe": "r1"}
        assert reader.tensor_names == ["t0", "t1", "t2"]


def test_index_total_size_exact(tmp_path):
    tensors = {
        "a": torch.zeros(100, dtype=torch.float32),
        "b": torch.zeros(30, dtype=torch.float16),
        "c": torch.zeros(7, dtype=torch.int64),
    }
    output = save_state_dict(tensors, tmp_path / "out", max_shard_bytes=100)
    index = read_index(output)
    # 100 * 4 + 30 * 2 + 7 * 8 bytes
    assert index["metadata"]["total_size"] == 516
    assert index["weight_map"] == {
        "a": "model-00001-of-00003.safetensors",
        "b": "model-00002-of-00003.safetensors",
        "c": "model-00003-of-00003.safetensors",
    }


def test_single_file_without_index(tmp_path):
    output = save_state_dict(float_tensors(2, 4), tmp_path / "out", metadata={"recipe": "abc"})
    assert sorted(path.name for path in output.iterdir()) == ["model.safetensors"]
    with safe_open(str(output / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "recipe": "abc"}


def test_config_fields_made_consistent(tiny_model, tmp_path):
    stale = {"model_type": "llama", "vocab_size": 999, "num_hidden_layers": 9, "tie_word_embeddings": False,
             "dtype": "float32", "hidden_size": 4}
    tensors = {
        "model.embed_tokens.weight": torch.zeros(10, 4),
        "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4),
        "model.layers.2.mlp.up_proj.weight": torch.zeros(4, 4),
        "model.norm.weight": torch.ones(4),
    }
    output = save_state_dict(tensors, tmp_path / "out", config=stale, side_files_from=tiny_model, dtype=torch.float16)
    config = json.loads((output / "config.json").read_text())

    assert config["vocab_size"] == 10
    assert config["num_hidden_layers"] == 3
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "float16"
    assert config["torch_dtype"] == "float16"
    assert config["hidden_size"] == 4
    assert stale["vocab_size"] == 999


def test_config_object_with_dtype(tiny_model, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    output = save_state_dict({"model.embed_tokens.weight": torch.zeros(5, 2)}, tmp_path / "out", config=config)
    written = json.loads((output / "config.json").read_text())
    assert written["vocab_size"] == 5
    assert written["dtype"] == "float32"
    assert written["model_type"] == "llama"


def test_config_and_side_files_from_source(tiny_model, tmp_path):
    output = save_state_dict({"lm_head.weight": torch.zeros(2, 2)}, tmp_path / "out", side_files_from=tiny_model)
    config = json.loads((output / "config.json").read_text())
    names = sorted(path.name for path in output.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_copy_side_files_names(tiny_model, tmp_path):
    copied = copy_side_files(tiny_model, tmp_path / "dest")
    assert copied == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    assert (tmp_path / "dest" / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()


def test_shared_storage_written_as_copies(tmp_path):
    base = torch.arange(8, dtype=torch.float32)
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add_tensor("layer_a", base)
        writer.add_tensor("layer_b", base)
        writer.add_tensor("middle", base[2:6])
        base.mul_(100)
        output = writer.finalize()

    loaded = load_file(output / "model.safetensors")
    assert torch.equal(loaded["layer_a"], torch.arange(8, dtype=torch.float32))
    assert torch.equal(loaded["layer_b"], torch.arange(8, dtype=torch.float32))
    assert torch.equal(loaded["middle"], torch.tensor([2.0, 3.0, 4.0, 5.0]))


def test_fp16_overflow_reported(tmp_path):
    with CheckpointWriter(tmp_path / "out", dtype=torch.float16) as writer:
        with pytest.raises(MergeError, match="model.norm.weight") as error:
            writer.add_tensor("model.norm.weight", torch.tensor([1.0, 70000.0, -1e6]))
    assert "2 finite values" in str(error.value)
    assert "bfloat16" in str(error.value)


def test_fp16_existing_inf_allowed(tmp_path):
    output = save_state_dict({"w": torch.tensor([1.5, float("inf")])}, tmp_path / "out", dtype=torch.float16)
    assert torch.equal(load_file(output / "model.safetensors")["w"], torch.tensor([1.5, float("inf")]).half())


def test_dtype_cast_floats_only(tmp_path):
    values = torch.tensor([1.0, 1.0 / 3.0, -2.5e-3])
    tensors = {"w": values, "ids": torch.tensor([1, 2, 3])}
    output = save_state_dict(tensors, tmp_path / "out", dtype="bfloat16")
    loaded = load_file(output / "model.safetensors")
    assert loaded["w"].dtype == torch.bfloat16
    assert torch.equal(loaded["w"], values.to(torch.bfloat16))
    assert loaded["ids"].dtype == torch.int64


def test_duplicate_name_rejected(tmp_path):
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add_tensor("w", torch.zeros(2))
        with pytest.raises(MergeError, match="added twice"):
            writer.add_tensor("w", torch.ones(2))


def test_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="merge failed"):
        with CheckpointWriter(tmp_path / "out", max_shard_bytes=16) as writer:
            writer.add_tensor("a", torch.zeros(8))
            writer.add_tensor("b", torch.zeros(8))
            raise RuntimeError("merge failed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        CheckpointWriter(tmp_path / "out")

    save_state_dict({"w": torch.ones(2)}, tmp_path / "out", overwrite=True)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_round_trip_matches_transformers(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    with CheckpointReader(tiny_model) as reader:
        with CheckpointWriter(tmp_path / "out", max_shard_bytes=30_000) as writer:
            for name in reader.tensor_names:
                writer.add_tensor(name, reader.get_tensor(name))
            output = writer.finalize(config=reader.config, side_files_from=tiny_model)

    source = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    written = AutoModelForCausalLM.from_pretrained(output).eval()
    tokens = torch.tensor([[0, 5, 17, 42, 100, 319]])
    with torch.no_grad():
        source_logits = source(tokens).logits
        written_logits = written(tokens).logits

    assert len(read_index(output)["weight_map"]) == len(source.state_dict())
    for name, tensor in source.state_dict().items():
        assert torch.equal(written.state_dict()[name], tensor), name
    assert torch.equal(written_logits, source_logits)
