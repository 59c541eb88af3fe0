"""GGUF reading, dequantisation, conversion and export on files the tests write themselves."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from evomerge.exceptions import GGUFError
from evomerge.gguf_utils import (
    gguf_to_hf,
    hf_to_gguf,
    permute_qk,
    read_gguf,
    reverse_permute_qk,
)
from evomerge.testing import make_tiny_llama

Q = gguf.GGMLQuantizationType


def f16_bytes(value: float) -> bytes:
    return np.array([value], dtype=np.float16).tobytes()


def write_gguf(path, tensors, metadata=None):
    """Write raw tensors: ``tensors`` maps name -> (uint8 or float array, GGML type)."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in (metadata or {}).items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def blocks(*raw: bytes) -> np.ndarray:
    """Stack equal-length raw blocks as one row of uint8."""
    return np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(1, -1).copy()


def q8_0_block(scale: float, quants: list[int]) -> bytes:
    return f16_bytes(scale) + np.array(quants, dtype=np.int8).tobytes()


def q4_0_block(scale: float, nibbles: list[int]) -> bytes:
    # Byte j stores value j in its low nibble and value j + 16 in its high nibble.
    packed = bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))
    return f16_bytes(scale) + packed


def q4_1_block(scale: float, minimum: float, nibbles: list[int]) -> bytes:
    packed = bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))
    return f16_bytes(scale) + f16_bytes(minimum) + packed


def reference_q4_k(block: bytes) -> list[float]:
    """Dequantise one Q4_K block with the scalar loop of ggml's dequantize_row_q4_K."""
    d = float(np.frombuffer(block[0:2], dtype=np.float16)[0])
    dmin = float(np.frombuffer(block[2:4], dtype=np.float16)[0])
    scales = block[4:16]
    qs = block[16:144]

    def scale_min(j):
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)

    out = []
    for chunk in range(4):
        sc1, m1 = scale_min(2 * chunk)
        sc2, m2 = scale_min(2 * chunk + 1)
        q = qs[32 * chunk : 32 * chunk + 32]
        out += [d * sc1 * (q[l] & 0xF) - dmin * m1 for l in range(32)]
        out += [d * sc2 * (q[l] >> 4) - dmin * m2 for l in range(32)]
    return out


def reference_q6_k(block: bytes) -> list[float]:
    """Dequantise one Q6_K block with the scalar loop of ggml's dequantize_row_q6_K."""
    ql, qh = block[0:128], block[128:192]
    sc = np.frombuffer(block[192:208], dtype=np.int8).tolist()
    d = float(np.frombuffer(block[208:210], dtype=np.float16)[0])
    out = [0.0] * 256
    for half in range(2):
        lo, hi, s, y = ql[64 * half :], qh[32 * half :], sc[8 * half :], 128 * half
        for l in range(32):
            i = l // 16
            q1 = ((lo[l] & 0xF) | ((hi[l] & 3) << 4)) - 32
            q2 = ((lo[l + 32] & 0xF) | (((hi[l] >> 2) & 3) << 4)) - 32
            q3 = ((lo[l] >> 4) | (((hi[l] >> 4) & 3) << 4)) - 32
            q4 = ((lo[l + 32] >> 4) | (((hi[l] >> 6) & 3) << 4)) - 32
            out[y + l] = d * s[i] * q1
            out[y + l + 32] = d * s[i + 2] * q2
            out[y + l + 64] = d * s[i + 4] * q3
            out[y + l + 96] = d * s[i + 6] * q4
    return out


def test_q8_0_block_dequantises_exactly(tmp_path):
    quants = [q - 16 for q in range(32)]
    path = write_gguf(tmp_path / "q8.gguf", {"w": (blocks(q8_0_block(0.5, quants)), Q.Q8_0)})

    values = read_gguf(path).load_tensor("w")

    assert values.shape == (1, 32)
    assert values.dtype == torch.float32
    assert values[0].tolist() == [0.5 * q for q in quants]


def test_q4_0_block_dequantises_exactly(tmp_path):
    nibbles = [(3 * j) % 16 for j in range(32)]
    path = write_gguf(tmp_path / "q40.gguf", {"w": (blocks(q4_0_block(0.25, nibbles)), Q.Q4_0)})

    values = read_gguf(path).load_tensor("w")

    assert values[0].tolist() == [0.25 * (n - 8) for n in nibbles]


def test_q4_1_block_dequantises_exactly(tmp_path):
    nibbles = [(5 * j + 1) % 16 for j in range(32)]
    raw = blocks(q4_1_block(0.5, -2.0, nibbles), q4_1_block(1.0, 3.0, nibbles[::-1]))
    path = write_gguf(tmp_path / "q41.gguf", {"w": (raw, Q.Q4_1)})

    values = read_gguf(path).load_tensor("w")

    assert values.shape == (1, 64)
    assert values[0, :32].tolist() == [0.5 * n - 2.0 for n in nibbles]
    assert values[0, 32:].tolist() == [1.0 * n + 3.0 for n in nibbles[::-1]]


def test_q4_k_block_matches_reference(tmp_path):
    # Scale bytes with the top two bits set exercise the 6-bit packing of sub-blocks 4..7.
    scales = bytes([0xC1, 0x42, 0x83, 0x04, 0x45, 0x86, 0xC7, 0x08, 0x21, 0x32, 0x43, 0x54])
    qs = bytes((7 * i + 3) % 256 for i in range(128))
    block = f16_bytes(0.5) + f16_bytes(0.25) + scales + qs
    path = write_gguf(tmp_path / "q4k.gguf", {"w": (blocks(block), Q.Q4_K)})

    values = read_gguf(path).load_tensor("w")

    expected = reference_q4_k(block)
    assert values.shape == (1, 256)
    assert values[0].tolist() == expected
    assert expected[0] == 0.5 * 1 * 3 - 0.25 * 5


def test_q6_k_block_matches_reference(tmp_path):
    ql = bytes((11 * i + 5) % 256 for i in range(128))
    qh = bytes((13 * i + 7) % 256 for i in range(64))
    sc = np.array([3, -2, 1, 4, -5, 2, 7, -1, 6, 1, -3, 2, 5, -4, 3, 1], dtype=np.int8).tobytes()
    block = ql + qh + sc + f16_bytes(0.5)
    path = write_gguf(tmp_path / "q6k.gguf", {"w": (blocks(block), Q.Q6_K)})

    values = read_gguf(path).load_tensor("w")

    expected = reference_q6_k(block)
    assert values[0].tolist() == expected
    # ql[0] = 5, qh[0] = 7: q = (5 | (3 << 4)) - 32 = 21, scale 3, d 0.5.
    assert expected[0] == 0.5 * 3 * 21


def test_float_types_dequantise_exactly(tmp_path):
    plain = np.array([[1.5, -2.25, 0.0, 65280.0]], dtype=np.float32)
    # BF16 keeps the top 16 bits of the float32 pattern; these values are exact in F16 and BF16.
    bf16_raw = (plain.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(1, -1)
    path = write_gguf(
        tmp_path / "floats.gguf",
        {
            "f32": (plain, Q.F32),
            "f16": (plain.astype(np.float16), Q.F16),
            "bf16": (bf16_raw, Q.BF16),
        },
    )

    model = read_gguf(path)

    for name in ("f32", "f16", "bf16"):
        assert model.load_tensor(name).tolist() == plain.tolist(), name
    assert [info.type for info in model.tensors] == ["F32", "F16", "BF16"]


def test_read_metadata_and_shapes(tmp_path):
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = write_gguf(
        tmp_path / "meta.gguf",
        {"w": (weights, Q.F32)},
        metadata={"test.tokens": ["a", "bb", "ccc"], "test.name": "tiny", "test.count": 7},
    )

    model = read_gguf(path)

    assert model.metadata["general.architecture"] == "llama"
    assert model.metadata["test.tokens"] == ["a", "bb", "ccc"]
    assert model.metadata["test.name"] == "tiny"
    assert model.metadata["test.count"] == 7
    assert model.tensors[0].shape == (2, 3)
    assert model.load_tensor("w").tolist() == weights.tolist()


def test_read_rejects_non_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")

    with pytest.raises(GGUFError, match="broken.gguf"):
        read_gguf(path)


def test_read_rejects_truncated(tmp_path):
    path = write_gguf(tmp_path / "whole.gguf", {"w": (np.ones((64, 64), np.float32), Q.F32)})
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(GGUFError, match="truncated.gguf"):
        read_gguf(truncated)


def test_read_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")


def test_load_unknown_tensor(tmp_path):
    path = write_gguf(tmp_path / "one.gguf", {"w": (np.zeros((1, 4), np.float32), Q.F32)})

    with pytest.raises(GGUFError, match="'missing' not found"):
        read_gguf(path).load_tensor("missing")


def test_qk_permutation_round_trip():
    weights = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)

    permuted = permute_qk(weights, n_head=2)

    # Head 0 rows 0..3 are two halves [0, 1] and [2, 3]; llama.cpp interleaves them as 0, 2, 1, 3.
    assert permuted[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]
    assert reverse_permute_qk(permuted, n_head=2).tolist() == weights.tolist()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", seed=3)


def logits_of(model_dir, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize(
    ("out_type", "tolerance"),
    [("f32", 1e-5), ("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)],
)
def test_export_import_same_logits(tiny_model, tmp_path, out_type, tolerance):
    input_ids = torch.tensor([[5, 17, 42, 101, 250, 3, 77, 8]])

    exported = hf_to_gguf(tiny_model, tmp_path / f"tiny-{out_type}.gguf", out_type=out_type)
    converted = gguf_to_hf(exported, tmp_path / "converted")

    expected = logits_of(tiny_model, input_ids)
    actual = logits_of(converted, input_ids)
    assert torch.allclose(actual, expected, atol=tolerance, rtol=0)


def test_export_types_and_metadata(tiny_model, tmp_path):
    model = read_gguf(hf_to_gguf(tiny_model, tmp_path / "tiny.gguf", out_type="bf16"))

    types = {info.name: info.type for info in model.tensors}
    assert types["blk.0.attn_q.weight"] == "BF16"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" in types
    assert model.metadata["general.architecture"] == "llama"
    assert model.metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_BF16)
    assert model.metadata["llama.block_count"] == 4
    assert model.metadata["llama.attention.head_count_kv"] == 2
    assert model.metadata["tokenizer.ggml.model"] == "gpt2"
    assert len(model.metadata["tokenizer.ggml.tokens"]) == 320
    assert model.metadata["tokenizer.ggml.token_type"][0] == int(gguf.TokenType.CONTROL)


def test_export_rejects_duplicate_key(tiny_model, tmp_path):
    output = tmp_path / "dup.gguf"

    with pytest.raises(GGUFError, match="llama.block_count"):
        hf_to_gguf(tiny_model, output, extra_metadata={"llama.block_count": 9})
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_unknown_type(tiny_model, tmp_path):
    with pytest.raises(GGUFError, match="q4_9"):
        hf_to_gguf(tiny_model, tmp_path / "x.gguf", out_type="q4_9")


def test_converted_tokenizer_round_trip(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    converted = gguf_to_hf(hf_to_gguf(tiny_model, tmp_path / "t.gguf", "f32"), tmp_path / "converted")
    original = AutoTokenizer.from_pretrained(tiny_model)
    rebuilt = AutoTokenizer.from_pretrained(converted)
    text = "def add(a, b):\n    return a + b  # 12 + 7 = 19 <|endoftext|>"

    assert rebuilt(text)["input_ids"] == original(text)["input_ids"]
    assert rebuilt.eos_token == "<|endoftext|>"
    assert rebuilt.decode(rebuilt(text)["input_ids"]) == text


def test_convert_refuses_nonempty_output(tiny_model, tmp_path):
    exported = hf_to_gguf(tiny_model, tmp_path / "t.gguf", "f16")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")

    with pytest.raises(GGUFError, match="not empty"):
        gguf_to_hf(exported, occupied)


def test_convert_rejects_other_architecture(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("w", np.zeros((1, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(GGUFError, match="'gpt2'"):
        gguf_to_hf(tmp_path / "gpt2.gguf", tmp_path / "out")



def test_tokenizer_matches_transformers_loader(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    exported = hf_to_gguf(tiny_model, tmp_path / "t.gguf", "f16")
    converted = gguf_to_hf(exported, tmp_path / "converted")
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    rebuilt = AutoTokenizer.from_pretrained(converted)
    text = "The quick brown fox: 12 + 7 = 19.\n    return a + b"

    assert rebuilt(text)["input_ids"] == reference(text)["input_ids"]
