"""Smoke tests of the benchmark harness on tiny models; no timing is asserted."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from evomerge import benchmarks
from evomerge.benchmarks import (
    QUICK_SHAPE,
    llama_config,
    main,
    markdown_table,
    merge_spec,
    plain_perplexity,
    run_child,
    section_markers,
    update_record,
)


def test_markdown_table_layout():
    table = markdown_table(["a", "b"], [["1", "2"]])
    assert table == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_update_record_replaces_section(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nHand-written intro.\n", encoding="utf-8")

    update_record(doc, "merge", "first")
    update_record(doc, "evaluate", "other")
    update_record(doc, "merge", "second")

    text = doc.read_text(encoding="utf-8")
    start, _ = section_markers("merge")
    assert "Hand-written intro." in text
    assert text.count(start) == 1
    assert "second" in text
    assert "first" not in text
    assert "other" in text


def test_merge_spec_ties_parameters(tmp_path):
    spec = merge_spec("ties", tmp_path / "base", [tmp_path / "ft1", tmp_path / "ft2"])
    assert spec["base_model"] == str(tmp_path / "base")
    assert [entry["model"] for entry in spec["models"]] == [str(tmp_path / "ft1"), str(tmp_path / "ft2")]
    assert spec["models"][0]["parameters"] == {"weight": 0.5, "density": 0.5}


def test_merge_spec_linear_reads_three(tmp_path):
    spec = merge_spec("linear", tmp_path / "base", [tmp_path / "ft1", tmp_path / "ft2"])
    assert "base_model" not in spec
    assert len(spec["models"]) == 3


def test_run_child_peak_rss():
    # A 300 MiB bytearray, held for 0.3 s so the 20 ms sampling sees it, must show in both peaks,
    # while a bare child stays small although this test process has torch loaded.
    code = "import time; data = bytearray(300 * 1024 * 1024); time.sleep(0.3); print(len(data))"
    big = run_child([sys.executable, "-c", code])
    small = run_child([sys.executable, "-c", "print(1)"])
    assert big.returncode == 0
    assert big.last_line == str(300 * 1024 * 1024)
    assert big.peak_rss_bytes >= 300 * 1024 * 1024
    assert big.peak_anon_bytes >= 300 * 1024 * 1024
    assert small.peak_rss_bytes < 100 * 1024 * 1024


def test_plain_perplexity_one_window():
    torch.manual_seed(0)
    model = benchmarks_model()
    ids = list(range(2, 12))

    value, tokens = plain_perplexity(model, [ids], max_length=16, stride=8)

    # One window covers all 10 tokens, so 9 are scored and the perplexity is exp(mean NLL).
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    assert tokens == 9
    assert value == pytest.approx(math.exp(float(nll)), rel=1e-5)


def benchmarks_model():
    """Return a random model of the quick shape."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(QUICK_SHAPE)).eval()


def test_merge_quick_writes_record(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    argv = [
        "--quick", "--cache", str(tmp_path / "cache"), "--doc", str(doc),
        "merge", "--methods", "linear", "--mergekit", "none", "--scaling-layers", "--no-drop-caches",
    ]

    assert main(argv) == 0

    text = doc.read_text(encoding="utf-8")
    printed = capsys.readouterr().out
    assert "| linear |" in printed
    assert section_markers("merge")[0] in text
    assert "Command: `python -m evomerge.benchmarks --quick" in text
    assert f"- torch: {torch.__version__}" in text
    assert "| linear |" in text
    assert "linear merge time <= 3x the I/O floor" in text
    assert "mergekit 0.1.5: skipped: --mergekit none" in text
    assert "EvoMerge linear failed" not in text


def test_merge_quick_builds_family(tmp_path):
    paths = benchmarks.build_family(tmp_path, QUICK_SHAPE.with_layers(2))
    names = set(benchmarks.tensor_shapes(QUICK_SHAPE.with_layers(2)))
    assert [path.name for path in paths] == ["base", "ft1", "ft2"]
    assert "lm_head.weight" not in names
    assert "model.layers.1.mlp.up_proj.weight" in names
    assert (paths[1] / "tokenizer.json").is_file()


def test_evaluate_quick_writes_record(tmp_path):
    doc = tmp_path / "benchmarks.md"
    argv = [
        "--quick", "--cache", str(tmp_path / "cache"), "--doc", str(doc),
        "evaluate", "--texts", "1", "--tokens-per-text", "40", "--candidate-texts", "1", "--workers", "1",
    ]

    assert main(argv) == 0

    text = doc.read_text(encoding="utf-8")
    assert section_markers("evaluate")[0] in text
    assert "| plain transformers loop, batch 1 |" in text
    assert "perplexities agree within 1e-4 relative" in text
    assert "every candidate scored both one by one and in parallel: 0 failures, met" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="records the CPU-only case")
def test_gpu_records_no_cuda(tmp_path):
    doc = tmp_path / "benchmarks.md"

    assert main(["--doc", str(doc), "gpu"]) == 0

    assert "no CUDA device" in doc.read_text(encoding="utf-8")
