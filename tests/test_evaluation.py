"""Evaluation on tiny in-process models: metrics against direct transformers computations, bad inputs."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from evomerge.config import EvaluationSettings
from evomerge.devices import configure_cpu_threads, select_device, select_dtype
from evomerge.evaluation import (
    WORST_FITNESS,
    Scores,
    coherence,
    compute_fitness,
    evaluate_model,
    generate_text,
    load_model_for_evaluation,
    load_texts,
    parallel_evaluate_models,
    perplexity,
    task_accuracy,
)
from evomerge.exceptions import ConfigError, EvaluationError
from evomerge.metrics import continuation_statistics
from evomerge.testing import make_tiny_llama

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Merging models averages what several fine-tunes learned, and 1 + 2 = 3.",
]
LONG_TEXT = " ".join(TEXTS * 3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", seed=0, num_layers=2)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tokenizer = load_model_for_evaluation(tiny_dir, "cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def nan_dir(tiny_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("models") / "nan"
    shutil.copytree(tiny_dir, target)
    tensors = load_file(target / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _settings(**overrides) -> EvaluationSettings:
    values = {"search_texts": list(TEXTS), "max_length": 16, "stride": 8, "batch_size": 4, "max_new_tokens": 6}
    values.update(overrides)
    return EvaluationSettings(**values)


def _direct_log_likelihood(model, ids: list[int], first_scored: int) -> float:
    """Sum log p(ids[t] | ids[:t]) for t >= first_scored with one unbatched forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    log_probs = logits.log_softmax(-1)
    return sum(float(log_probs[t - 1, ids[t]]) for t in range(first_scored, len(ids)))


# ---------------------------------------------------------------- perplexity


def test_perplexity_matches_direct_loss(tiny):
    model, tokenizer = tiny
    total_nll = 0.0
    total_tokens = 0
    for text in TEXTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss
        total_nll += float(loss) * (ids.shape[1] - 1)
        total_tokens += ids.shape[1] - 1

    value, tokens = perplexity(model, tokenizer, TEXTS, max_length=64, stride=32, batch_size=4, device="cpu")
    assert tokens == total_tokens
    assert value == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)


def test_perplexity_batched_equals_unbatched(tiny):
    model, tokenizer = tiny
    batched, _ = perplexity(model, tokenizer, TEXTS, max_length=64, stride=32, batch_size=3, device="cpu")
    single, _ = perplexity(model, tokenizer, TEXTS, max_length=64, stride=32, batch_size=1, device="cpu")
    assert batched == pytest.approx(single, rel=1e-5)


def test_perplexity_padding_is_masked(tiny):
    model, tokenizer = tiny
    # The short text is padded to the long one's length in the same batch.
    window = {"max_length": 512, "stride": 256, "device": "cpu"}
    pair, _ = perplexity(model, tokenizer, [TEXTS[0], LONG_TEXT], batch_size=2, **window)
    alone_short, short_tokens = perplexity(model, tokenizer, [TEXTS[0]], batch_size=1, **window)
    alone_long, long_tokens = perplexity(model, tokenizer, [LONG_TEXT], batch_size=1, **window)
    total_nll = math.log(alone_short) * short_tokens + math.log(alone_long) * long_tokens
    expected_nll = total_nll / (short_tokens + long_tokens)
    assert math.log(pair) == pytest.approx(expected_nll, rel=1e-5)


def test_perplexity_stride_matches_recipe(tiny):
    model, tokenizer = tiny
    max_length, stride = 16, 6
    ids = torch.tensor([tokenizer(LONG_TEXT)["input_ids"]])
    num_tokens = ids.shape[1]

    # The Hugging Face "perplexity of fixed-length models" loop.
    nll_sum = 0.0
    scored = 0
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        target_length = end - previous_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        scored += valid
        previous_end = end
        if end == num_tokens:
            break

    value, tokens = perplexity(
        model, tokenizer, [LONG_TEXT], max_length=max_length, stride=stride, batch_size=4, device="cpu"
    )
    assert num_tokens > 3 * max_length
    assert tokens == scored
    assert tokens == num_tokens - 1
    assert value == pytest.approx(math.exp(nll_sum / scored), rel=1e-5)


def test_perplexity_short_text_raises(tiny):
    model, tokenizer = tiny
    with pytest.raises(EvaluationError, match="at least two"):
        perplexity(model, tokenizer, ["a"], max_length=16, stride=8, batch_size=1, device="cpu")


def test_perplexity_empty_set_raises(tiny):
    model, tokenizer = tiny
    with pytest.raises(EvaluationError, match="empty"):
        perplexity(model, tokenizer, [], max_length=16, stride=8, batch_size=1, device="cpu")


# ---------------------------------------------------------------- coherence and generation


def test_generate_text_matches_generate(tiny):
    model, tokenizer = tiny
    ids = tokenizer("The quick", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=1
        )
    continuation = output[0, ids.shape[1] :].tolist()
    if 0 in continuation:
        continuation = continuation[: continuation.index(0)]
    expected = tokenizer.decode(continuation, skip_special_tokens=True)
    assert generate_text(model, tokenizer, "The quick", max_length=8) == expected


def test_coherence_deterministic(tiny):
    model, tokenizer = tiny
    prompts = ["The quick", "def add(a", "Merging"]
    first = coherence(model, tokenizer, prompts, max_new_tokens=8, seed=3, device="cpu")
    second = coherence(model, tokenizer, prompts, max_new_tokens=8, seed=3, device="cpu")
    assert first == second


def test_coherence_matches_rescoring(tiny):
    model, tokenizer = tiny
    prompt_ids = tokenizer("The quick")["input_ids"]
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=8, do_sample=False, pad_token_id=1,
        )
    generated = output[0, len(prompt_ids) :].tolist()
    kept = generated[: generated.index(0)] if 0 in generated else generated
    scored = generated[: len(kept) + 1] if 0 in generated else generated

    log_likelihood = _direct_log_likelihood(model, prompt_ids + scored, len(prompt_ids))
    expected = continuation_statistics(kept, log_likelihood / len(scored))
    result = coherence(model, tokenizer, ["The quick"], max_new_tokens=8, seed=0, device="cpu")
    for name in ("distinct_2", "non_repetition_4", "confidence", "coherence"):
        assert result[name] == pytest.approx(expected[name], rel=1e-4), name


def test_coherence_no_prompts_raises(tiny):
    model, tokenizer = tiny
    with pytest.raises(EvaluationError, match="no prompts"):
        coherence(model, tokenizer, [], max_new_tokens=4, seed=0, device="cpu")


# ---------------------------------------------------------------- task accuracy


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_task_multiple_choice_known_answers(tiny, tmp_path):
    model, tokenizer = tiny
    prompt = "The quick brown"
    choices = [" fox", " dog", " lazy"]
    context_ids = tokenizer(prompt)["input_ids"]
    scores = []
    for choice in choices:
        whole = tokenizer(prompt + choice)["input_ids"]
        assert whole[: len(context_ids)] == context_ids
        scores.append(_direct_log_likelihood(model, whole, len(context_ids)))
    best = max(range(3), key=scores.__getitem__)
    wrong = (best + 1) % 3

    task_file = _write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"prompt": prompt, "choices": choices, "answer": best},
            {"prompt": prompt, "choices": choices, "answer": choices[best].strip()},
            {"prompt": prompt, "choices": choices, "answer": wrong},
            {"prompt": prompt, "choices": choices, "answer": choices[wrong]},
        ],
    )
    assert task_accuracy(model, tokenizer, task_file, device="cpu", batch_size=3) == pytest.approx(0.5)


def test_task_generative_known_answers(tiny, tmp_path):
    model, tokenizer = tiny
    produced = generate_text(model, tokenizer, "1 + 2 =", max_length=5)
    task_file = _write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {"prompt": "1 + 2 =", "answer": produced},
            {"prompt": "1 + 2 =", "answer": "an answer this model never writes"},
        ],
    )
    accuracy = task_accuracy(model, tokenizer, task_file, device="cpu", batch_size=1, max_new_tokens=5)
    assert accuracy == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"answer": "x"}', '"prompt"'),
        ('{"prompt": "q", "choices": ["a", "b"], "answer": 2}', "out of range"),
        ('{"prompt": "q", "choices": ["a", "b"], "answer": "c"}', "not one of the choices"),
        ('{"prompt": "q", "choices": ["a"], "answer": 0}', "at least two"),
    ],
)
def test_task_file_bad_lines(tiny, tmp_path, line, message):
    model, tokenizer = tiny
    task_file = tmp_path / "bad.jsonl"
    task_file.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(EvaluationError, match=message):
        task_accuracy(model, tokenizer, task_file, device="cpu", batch_size=1)


# ---------------------------------------------------------------- inputs and fitness


def test_load_texts_files_and_literals(tmp_path):
    (tmp_path / "a.txt").write_text("first document", encoding="utf-8")
    _write_jsonl(tmp_path / "b.jsonl", [{"text": "second"}, {"text": "third"}])
    texts = load_texts([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "a literal sentence"])
    assert texts == ["first document", "second", "third", "a literal sentence"]


def test_load_texts_missing_file_raises(tmp_path):
    with pytest.raises(EvaluationError, match="not found"):
        load_texts([str(tmp_path / "missing.txt")])


def test_load_texts_empty_raises():
    with pytest.raises(EvaluationError, match="empty"):
        load_texts([])


def test_fitness_hand_computed():
    metrics = {"perplexity": math.exp(2.0), "coherence": 0.5, "task_accuracy": 0.25}
    weights = {"perplexity": 1.0, "coherence": 2.0, "task_accuracy": 4.0}
    assert compute_fitness(metrics, weights) == pytest.approx(-2.0 + 1.0 + 1.0)


def test_fitness_unknown_metric_raises():
    with pytest.raises(ConfigError, match="'accuracy'.*valid names are"):
        compute_fitness({"perplexity": 2.0}, {"accuracy": 1.0})


def test_fitness_uncomputed_metric_raises():
    with pytest.raises(ConfigError, match="'coherence' has a weight but was not computed"):
        compute_fitness({"perplexity": 2.0}, {"coherence": 1.0})


def test_scores_frozen_and_json_safe():
    scores = Scores(metrics={}, fitness=WORST_FITNESS, split="search", settings_hash="x", failed=True, error="e")
    with pytest.raises(Exception):
        scores.fitness = 1.0
    assert math.isfinite(WORST_FITNESS)
    assert Scores.model_validate_json(scores.model_dump_json()) == scores


# ---------------------------------------------------------------- evaluate_model


def test_evaluate_model_metrics_and_fitness(tiny_dir, tiny):
    model, tokenizer = tiny
    settings = _settings(prompts=["The quick"], metric_weights={"perplexity": 1.0, "coherence": 0.5})
    scores = evaluate_model(tiny_dir, settings, device="cpu")
    expected_perplexity, tokens = perplexity(
        model, tokenizer, TEXTS, max_length=16, stride=8, batch_size=4, device="cpu"
    )
    assert not scores.failed
    assert scores.tokens == tokens
    assert scores.metrics["perplexity"] == pytest.approx(expected_perplexity, rel=1e-5)
    assert scores.fitness == pytest.approx(-math.log(expected_perplexity) + 0.5 * scores.metrics["coherence"])
    assert scores.settings_hash == settings.canonical_hash()


def test_evaluate_model_heldout_split(tiny_dir, tiny):
    model, tokenizer = tiny
    heldout = ["A language model predicts the next token from the ones before it."]
    settings = _settings(heldout_texts=heldout)
    scores = evaluate_model(tiny_dir, settings, split="heldout", device="cpu")
    expected, _ = perplexity(model, tokenizer, heldout, max_length=16, stride=8, batch_size=4, device="cpu")
    assert scores.split == "heldout"
    assert scores.metrics["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_evaluate_model_heldout_without_data(tiny_dir):
    with pytest.raises(EvaluationError, match="heldout_texts"):
        evaluate_model(tiny_dir, _settings(), split="heldout", device="cpu")


def test_evaluate_model_short_text_raises(tiny_dir):
    with pytest.raises(EvaluationError, match="at least two"):
        evaluate_model(tiny_dir, _settings(search_texts=["a"]), device="cpu")


def test_evaluate_model_empty_texts_raises(tiny_dir):
    with pytest.raises(EvaluationError, match="text set is empty"):
        evaluate_model(tiny_dir, _settings(search_texts=[]), device="cpu")


def test_evaluate_model_blank_file_raises(tiny_dir, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n", encoding="utf-8")
    with pytest.raises(EvaluationError, match="text 0 of the text set is empty"):
        evaluate_model(tiny_dir, _settings(search_texts=[str(blank)]), device="cpu")


def test_evaluate_model_unknown_weight_raises(tiny_dir):
    with pytest.raises(ConfigError, match="'bleu'"):
        evaluate_model(tiny_dir, _settings(metric_weights={"bleu": 1.0}), device="cpu")


def test_evaluate_model_nan_weights_fail(nan_dir):
    scores = evaluate_model(nan_dir, _settings(prompts=["The"], metric_weights={"perplexity": 1.0}), device="cpu")
    assert scores.failed
    assert scores.fitness == WORST_FITNESS
    assert "non-finite" in scores.error


def test_evaluate_model_nan_coherence_only(nan_dir):
    settings = _settings(search_texts=[], prompts=["The"], metric_weights={"coherence": 1.0})
    scores = evaluate_model(nan_dir, settings, device="cpu")
    assert scores.failed
    assert "NaN" in scores.error


def test_evaluate_model_missing_tokenizer(tiny_dir, tmp_path):
    target = tmp_path / "no_tokenizer"
    target.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(tiny_dir / name, target / name)
    scores = evaluate_model(target, _settings(), device="cpu")
    assert scores.failed
    assert "has no tokenizer" in scores.error


def test_evaluate_model_vocab_mismatch(tiny_dir, tmp_path):
    target = make_tiny_llama(tmp_path / "small_vocab", seed=1, num_layers=1, vocab_size=64, with_tokenizer=False)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(target)
    scores = evaluate_model(target, _settings(), device="cpu")
    assert scores.failed
    assert "320 tokens but the model has only 64" in scores.error


def test_evaluate_model_corrupt_checkpoint(tiny_dir, tmp_path):
    target = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, target)
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    scores = evaluate_model(target, _settings(), device="cpu")
    assert scores.failed
    assert "cannot be loaded" in scores.error


def test_evaluate_model_missing_folder(tmp_path):
    scores = evaluate_model(tmp_path / "absent", _settings(), device="cpu")
    assert scores.failed
    assert "not found" in scores.error


def test_parallel_isolates_nan_model(tiny_dir, nan_dir):
    settings = _settings()
    results = parallel_evaluate_models([tiny_dir, nan_dir, tiny_dir], settings, max_workers=2)
    single = evaluate_model(tiny_dir, settings, device="cpu")
    assert [scores.failed for scores in results] == [False, True, False]
    assert results[0].fitness == pytest.approx(single.fitness, rel=1e-6)
    assert results[2].fitness == pytest.approx(single.fitness, rel=1e-6)


# ---------------------------------------------------------------- devices


def test_select_device_cpu():
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_select_device_missing_cuda():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        select_device("cuda", worker_index=1)


def test_select_device_unknown_raises():
    with pytest.raises(ConfigError, match="'tpu'"):
        select_device("tpu")


def test_select_dtype_choices():
    assert select_dtype("cpu") == torch.float32
    assert select_dtype("cpu", "bfloat16") == torch.bfloat16


def test_cpu_threads_follow_env(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        assert configure_cpu_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_lm_eval_adapter_needs_package():
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed; the adapter is optional")
    from evomerge.lm_eval_adapter import lm_eval_available

    assert lm_eval_available()


def test_lm_eval_flatten_results():
    from evomerge.lm_eval_adapter import flatten_results

    results = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": float("nan")},
    }
    assert flatten_results(results) == {
        "lm_eval:arc_easy:acc": 0.5,
        "lm_eval:arc_easy:acc_norm": 0.75,
        "lm_eval:gsm8k:exact_match/strict-match": 0.25,
    }


def test_lm_eval_missing_package_raises(tiny):
    if __import__("importlib").util.find_spec("lm_eval") is not None:
        pytest.skip("lm-evaluation-harness is installed; this checks the error raised without it")
    from evomerge.lm_eval_adapter import evaluate_lm_eval_tasks

    model, tokenizer = tiny
    with pytest.raises(EvaluationError, match="pip install"):
        evaluate_lm_eval_tasks(model, tokenizer, ["arc_easy"])


def test_coherence_batched_equals_single(tiny):
    model, tokenizer = tiny
    prompts = ["The quick brown fox", "def", "1 + 2 = 3. 4 +"]
    batched = coherence(model, tokenizer, prompts, max_new_tokens=8, seed=0, device="cpu", batch_size=3)
    single = coherence(model, tokenizer, prompts, max_new_tokens=8, seed=0, device="cpu", batch_size=1)
    for name in batched:
        assert batched[name] == pytest.approx(single[name], rel=1e-4), name


def test_evaluate_model_task_metrics(tiny_dir, tiny, tmp_path):
    model, tokenizer = tiny
    rows = [
        {"prompt": "The quick brown", "choices": [" fox", " dog"], "answer": 0},
        {"prompt": "def add(a, b): ", "choices": ["return", "print"], "answer": "print"},
        {"prompt": "1 + 2 =", "answer": "3"},
    ]
    task_file = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    settings = _settings(task_files=[str(task_file)], metric_weights={"perplexity": 1.0, "task_accuracy:mixed": 2.0})
    scores = evaluate_model(tiny_dir, settings, device="cpu")
    expected = task_accuracy(model, tokenizer, task_file, device="cpu", batch_size=4, max_new_tokens=6)
    assert scores.metrics["task_accuracy:mixed"] == pytest.approx(expected)
    assert scores.metrics["task_accuracy"] == pytest.approx(expected)
    assert scores.fitness == pytest.approx(-math.log(scores.metrics["perplexity"]) + 2.0 * expected)


def test_evaluate_model_heldout_prompts(tiny_dir, tiny):
    model, tokenizer = tiny
    settings = _settings(prompts=["The quick"], heldout_prompts=["def add"], heldout_texts=[TEXTS[0]])
    scores = evaluate_model(tiny_dir, settings, split="heldout", device="cpu")
    expected = coherence(model, tokenizer, ["def add"], max_new_tokens=6, seed=0, device="cpu")
    assert scores.metrics["coherence"] == pytest.approx(expected["coherence"], rel=1e-5)


def test_select_device_auto_without_accelerator():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("checks the CPU fallback on a machine without an accelerator")
    assert select_device("auto", worker_index=3) == torch.device("cpu")


def test_task_empty_prompt_uses_bos(tiny, tmp_path):
    model, tokenizer = tiny
    choices = ["The quick", "zzzz qqqq"]
    scores = [_direct_log_likelihood(model, [tokenizer.bos_token_id] + tokenizer(c)["input_ids"], 1) for c in choices]
    best = max(range(2), key=scores.__getitem__)
    rows = [{"prompt": "", "choices": choices, "answer": best}, {"prompt": "", "choices": choices, "answer": 1 - best}]
    task_file = _write_jsonl(tmp_path / "empty_prompt.jsonl", rows)
    assert task_accuracy(model, tokenizer, task_file, device="cpu", batch_size=2) == 0.5


def test_check_settings_duplicate_task_names(tmp_path):
    from evomerge.evaluation import check_settings

    rows = [{"prompt": "q", "answer": "a"}]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = _write_jsonl(tmp_path / "one" / "tasks.jsonl", rows)
    second = _write_jsonl(tmp_path / "two" / "tasks.jsonl", rows)
    with pytest.raises(ConfigError, match="collide"):
        check_settings(_settings(task_files=[str(first), str(second)]))


def test_evaluate_model_unknown_split(tiny_dir):
    with pytest.raises(ConfigError, match="'validation'"):
        evaluate_model(tiny_dir, _settings(), split="validation", device="cpu")
