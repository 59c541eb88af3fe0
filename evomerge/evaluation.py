"""Fitness evaluation of a candidate checkpoint: perplexity, coherence and task accuracy.

The metric definitions live in ``evomerge.metrics``; this module runs the model to feed them.

Tokens are whatever ``tokenizer(text)`` returns with its default special tokens. A tokenizer that
adds BOS by default (Llama, Mistral) thus has the first real token scored given BOS. One that adds
nothing (GPT-2, the test tokenizer) never scores the first token of a text.

Fitness is ``sum(weight * transform(metric))`` over ``settings.metric_weights``, and higher is better.
Perplexity enters as ``-log(perplexity)``, which is minus the mean NLL per token in nats. Every other
metric is already "higher is better" in [0, 1] and enters unchanged.

Failures split in two kinds:

* A *settings* problem that no candidate could pass raises ``EvaluationError`` or ``ConfigError``.
  These are an empty text set, a missing text or task file, a malformed task line, a held-out split
  without data, an unknown metric name or device, and a text shorter than two tokens. The last counts
  as a settings problem because all candidates share the base model's tokenizer.
* A *candidate* problem returns ``Scores(failed=True, fitness=WORST_FITNESS, error=...)``: an
  unreadable or missing checkpoint, a missing tokenizer, tokenizer ids beyond the embedding rows,
  NaN or inf logits, an overflowing perplexity, or running out of device memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydantic
import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from evomerge.config import EvaluationSettings
from evomerge.devices import configure_cpu_threads, select_device, select_dtype
from evomerge.exceptions import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    EvaluationError,
    EvoMergeException,
)
from evomerge.metrics import (
    PerplexityAccumulator,
    answers_match,
    average_statistics,
    continuation_statistics,
    normalize_answer,
    sliding_windows,
)

logger = logging.getLogger(__name__)

# Fitness of a failed candidate. With weights of ordinary size it is far below any real fitness,
# because perplexity contributes at least -709 per unit weight: a mean NLL above 709 nats overflows exp()
# and fails the candidate. Unlike -inf it stores in JSON and DuckDB without special cases.
WORST_FITNESS: float = -1.0e9

SPLITS = ("search", "heldout")

# Fitness transform of each metric that settings.metric_weights may name; all give "higher is better".
FITNESS_TRANSFORMS = {
    "perplexity": lambda value: -math.log(value),
    "coherence": lambda value: value,
    "distinct_2": lambda value: value,
    "non_repetition_4": lambda value: value,
    "confidence": lambda value: value,
    "task_accuracy": lambda value: value,
}

# Per-file accuracies are reported as "task_accuracy:<file stem>" and may be weighted as well.
TASK_METRIC_PREFIX = "task_accuracy:"

# Files whose presence shows that a model folder ships a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")

# Errors that mean "this candidate is broken", as opposed to a bug in EvoMerge. torch raises RuntimeError
# for device and out-of-memory failures and IndexError for token ids beyond the embedding rows on CPU.
_CANDIDATE_ERRORS = (EvoMergeException, OSError, ValueError, RuntimeError, IndexError, SafetensorError)

# Text entries this long, or containing a newline, are literal text and never looked up as paths.
_MAX_PATH_LENGTH = 4096

# Plain prose used only when parallel_evaluate_models gets no settings; a smoke test, not a benchmark.
SMOKE_TEXTS = [
    "The river runs through the middle of the town, and every morning the baker opens his shop beside the bridge.",
    "To add two numbers, write them one above the other and add the digits column by column from the right.",
    "A good merge keeps what each fine-tune learned while losing as little of the base model as it can.",
]


class Scores(pydantic.BaseModel):
    """The outcome of evaluating one checkpoint on one split."""

    model_config = pydantic.ConfigDict(frozen=True)

    metrics: dict[str, float] = pydantic.Field(description="Every raw metric computed, by name.")
    fitness: float = pydantic.Field(description="Weighted fitness; higher is better; WORST_FITNESS when failed.")
    split: str = pydantic.Field(description="'search' or 'heldout'.")
    settings_hash: str = pydantic.Field(description="EvaluationSettings.canonical_hash() of the settings used.")
    failed: bool = False
    error: str | None = pydantic.Field(default=None, description="Reason for the failure.")
    wall_seconds: float = 0.0
    device: str = "cpu"
    tokens: int = pydantic.Field(default=0, description="Tokens scored for perplexity.")


# --------------------------------------------------------------------------------------------------
# Inputs: text sets and task files


def load_texts(entries: list[str]) -> list[str]:
    """Read a text set from ``.txt`` files (one text per file), ``.jsonl`` files (``{"text": ...}``
    per line) or literal strings.

    An entry that ends in ``.txt`` or ``.jsonl`` but names no file is an error rather than a literal,
    because it is almost always a mistyped path.
    """
    texts: list[str] = []
    for entry in entries:
        path = Path(entry) if len(entry) < _MAX_PATH_LENGTH and "\n" not in entry else None
        suffix = path.suffix.lower() if path is not None else ""

        if path is not None and path.is_file():
            if suffix == ".jsonl":
                texts.extend(_read_jsonl_texts(path))
            else:
                texts.append(_read_text_file(path))
        elif suffix in (".txt", ".jsonl"):
            raise EvaluationError(f"text file {entry!r} not found: check the path in the evaluation settings")
        else:
            texts.append(entry)

    for index, text in enumerate(texts):
        if not text.strip():
            raise EvaluationError(f"text {index} of the text set is empty: remove it or give it content")
    if not texts:
        raise EvaluationError("the text set is empty: add files or strings to evaluation.search_texts or heldout_texts")
    return texts


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise EvaluationError(f"text file {str(path)!r} is not valid UTF-8 ({error}): re-save it as UTF-8") from None


def _read_jsonl_lines(path: Path) -> list[tuple[int, dict]]:
    """Parse a JSONL file into (line number, object) pairs, skipping blank lines."""
    rows = []
    for number, line in enumerate(_read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvaluationError(f"{path}:{number} is not valid JSON ({error.msg}): fix or remove the line") from None
        if not isinstance(row, dict):
            raise EvaluationError(f"{path}:{number} is a JSON {type(row).__name__}, expected an object")
        rows.append((number, row))
    return rows


def _read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, row in _read_jsonl_lines(path):
        text = row.get("text")
        if not isinstance(text, str):
            raise EvaluationError(f'{path}:{number} has no string "text" field: write lines as {{"text": "..."}}')
        texts.append(text)
    return texts


@dataclass(frozen=True)
class TaskItem:
    """One task question: generative when ``choices`` is empty, multiple choice otherwise."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()
    answer_index: int = -1


def load_task_items(task_file: str | os.PathLike) -> list[TaskItem]:
    """Read a JSONL task file.

    Each line is ``{"prompt": ..., "answer": "text"}`` (generated answer, exact match after
    normalisation) or ``{"prompt": ..., "choices": [...], "answer": index or choice text}`` (the choice
    with the highest summed log-likelihood wins, without length normalisation, like lm-evaluation-harness's
    ``acc``).
    """
    path = Path(task_file)
    if not path.is_file():
        raise EvaluationError(f"task file {str(path)!r} not found: check evaluation.task_files")

    items = [_parse_task_row(path, number, row) for number, row in _read_jsonl_lines(path)]
    if not items:
        raise EvaluationError(f"task file {str(path)!r} has no items: add JSONL lines with prompt and answer")
    return items


def _parse_task_row(path: Path, number: int, row: dict) -> TaskItem:
    location = f"{path}:{number}"
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise EvaluationError(f'{location} has no string "prompt" field')
    if "answer" not in row:
        raise EvaluationError(f'{location} has no "answer" field')
    answer = row["answer"]
    choices = row.get("choices")

    if choices is None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise EvaluationError(f'{location}: "answer" must be text or a number, got {answer!r}')
        return TaskItem(prompt=prompt, answer=str(answer))

    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise EvaluationError(f'{location}: "choices" must be a list of at least two non-empty strings')
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise EvaluationError(
                f"{location}: answer index {answer} is out of range for {len(choices)} choices "
                f"(0 to {len(choices) - 1})"
            )
        index = answer
    elif isinstance(answer, str):
        matches = [i for i, choice in enumerate(choices) if normalize_answer(choice) == normalize_answer(answer)]
        if not matches:
            raise EvaluationError(f"{location}: answer {answer!r} is not one of the choices {choices}")
        index = matches[0]
    else:
        raise EvaluationError(f'{location}: "answer" must be a choice index or the choice text, got {answer!r}')
    return TaskItem(prompt=prompt, answer=choices[index], choices=tuple(choices), answer_index=index)


# --------------------------------------------------------------------------------------------------
# Model loading


_LOAD_LOCK = threading.Lock()


def load_model_for_evaluation(model_path: str | os.PathLike, device, dtype: str | torch.dtype = "auto"):
    """Load a causal LM and its tokenizer for inference on ``device``.

    Raises ``CheckpointNotFoundError`` for a missing folder, ``EvaluationError`` for a missing tokenizer or
    a tokenizer with more tokens than the model has embedding rows, and ``CheckpointError`` when
    transformers cannot read the checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"model folder {str(path)!r} not found: check the candidate path")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise EvaluationError(
            f"model folder {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
            "copy the tokenizer files from the base model into it"
        )

    device = torch.device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else select_dtype(device, dtype)
    # transformers 5.25 is not thread-safe while loading: two concurrent
    # from_pretrained calls can leave a tied lm_head on the meta device
    # ("Cannot copy out of meta tensor"). Loading is short next to scoring.
    with _LOAD_LOCK:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise EvaluationError(f"tokenizer in {str(path)!r} cannot be loaded: {error}") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded: {error}") from None

    embedding_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_rows:
        raise EvaluationError(
            f"tokenizer in {str(path)!r} has {len(tokenizer)} tokens but the model has only {embedding_rows} "
            "embedding rows: use the tokenizer of the model the weights came from"
        )

    model = model.to(device).eval()
    return model, tokenizer


def _pad_id(tokenizer) -> int:
    """Return an id for padding; its positions are always masked, so any valid id works."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------------
# Log-likelihood scoring shared by perplexity and multiple choice


def score_sequences(
    model, sequences: list[tuple[list[int], int]], *, batch_size: int, pad_id: int, device
) -> list[float]:
    """Return the summed log-likelihood (nats) of each sequence's scored tail.

    Each sequence is ``(token_ids, first_scored)``: tokens at positions ``first_scored`` and later are
    scored given everything before them. Sequences are batched longest first with right padding, and
    padded positions are masked in attention and skipped in the sum.
    """
    device = torch.device(device)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]), reverse=True)
    results = [0.0] * len(sequences)

    for start in range(0, len(order), batch_size):
        batch_indices = order[start : start + batch_size]
        width = len(sequences[batch_indices[0]][0])
        input_ids = torch.full((len(batch_indices), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch_indices), width), dtype=torch.long)
        # target_mask[r, j] marks that token j+1 of row r is scored from the logits at position j.
        target_mask = torch.zeros((len(batch_indices), width - 1), dtype=torch.bool)
        for row, index in enumerate(batch_indices):
            ids, first_scored = sequences[index]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            target_mask[row, first_scored - 1 : len(ids) - 1] = True

        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        target_mask = target_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        # Only scored positions go through log-softmax, in float32, to save time and memory.
        scored_logits = logits[:, :-1][target_mask].float()
        targets = input_ids[:, 1:][target_mask]
        token_log_likelihood = -F.cross_entropy(scored_logits, targets, reduction="none")
        rows = torch.nonzero(target_mask, as_tuple=True)[0]
        sums = torch.zeros(len(batch_indices), dtype=torch.float64, device=device)
        sums.index_add_(0, rows, token_log_likelihood.double())

        # One device-to-host copy per batch instead of one per row.
        for index, value in zip(batch_indices, sums.tolist()):
            results[index] = value
    return results


# --------------------------------------------------------------------------------------------------
# Perplexity


def tokenize_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Tokenize with the tokenizer's default special tokens; every text must give at least two tokens."""
    if not texts:
        raise EvaluationError("the text set is empty: add files or strings to evaluation.search_texts or heldout_texts")
    token_ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    for index, ids in enumerate(token_ids):
        if len(ids) < 2:
            preview = texts[index][:60]
            raise EvaluationError(
                f"text {index} ({preview!r}) has {len(ids)} token(s); perplexity needs at least two: "
                "lengthen it or remove it from the text set"
            )
    return token_ids


def perplexity_of_token_ids(
    model, token_ids: list[list[int]], *, max_length: int, stride: int, batch_size: int, pad_id: int, device
) -> tuple[float, int]:
    """Return the token-weighted perplexity of pre-tokenized texts and the number of predicted tokens."""
    windows = []
    for ids in token_ids:
        for window in sliding_windows(len(ids), max_length, stride):
            windows.append((ids[window.begin : window.end], window.first_scored - window.begin))

    log_likelihoods = score_sequences(model, windows, batch_size=batch_size, pad_id=pad_id, device=device)

    accumulator = PerplexityAccumulator()
    for (ids, first_scored), log_likelihood in zip(windows, log_likelihoods):
        accumulator.add(-log_likelihood, len(ids) - first_scored)
    return accumulator.perplexity(), accumulator.total_tokens


def perplexity(
    model, tokenizer, texts: list[str], *, max_length: int, stride: int, batch_size: int, device
) -> tuple[float, int]:
    """Compute the perplexity of ``model`` on ``texts`` and the number of predicted tokens.

    See ``evomerge.metrics`` for the definition. Raises ``EvaluationError`` for an empty set, a text of
    fewer than two tokens, or non-finite logits.
    """
    token_ids = tokenize_texts(tokenizer, texts)
    window = _window_length(model, max_length)
    with torch.inference_mode():
        return perplexity_of_token_ids(
            model,
            token_ids,
            max_length=window,
            stride=min(stride, window),
            batch_size=batch_size,
            pad_id=_pad_id(tokenizer),
            device=device,
        )


def _window_length(model, max_length: int) -> int:
    """Clamp the window to the model's position limit so long windows do not go out of range."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and 2 <= limit < max_length:
        logger.warning("max_length %d exceeds the model's %d positions; using %d", max_length, limit, limit)
        return limit
    return max_length


# --------------------------------------------------------------------------------------------------
# Greedy generation and coherence


@dataclass(frozen=True)
class Continuation:
    """A greedy continuation: token ids up to the first EOS and the mean log-likelihood of the
    generated tokens including that EOS."""

    token_ids: list[int]
    mean_log_likelihood: float


def greedy_continuations(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 8
) -> list[Continuation]:
    """Generate greedy continuations of ``prompts``, batched with left padding.

    The model's own generation config is overridden to plain greedy decoding (no repetition penalty, no
    n-gram blocking), so coherence measures the weights rather than decoding tricks.
    """
    device = _model_device(model)
    pad_id = _pad_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    prompt_ids = [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]
    for index, ids in enumerate(prompt_ids):
        if not ids:
            raise EvaluationError(f"prompt {index} ({prompts[index][:60]!r}) has no tokens: give a non-empty prompt")

    continuations = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1

        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            pad_token_id=pad_id,
            eos_token_id=sorted(eos_ids) if eos_ids else None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        generated = output.sequences[:, width:]
        # logits[t] are the raw logits that chose generated token t.
        step_log_probs = torch.stack(output.logits, dim=1).float().log_softmax(dim=-1)
        chosen = step_log_probs.gather(-1, generated.unsqueeze(-1)).squeeze(-1)

        for row in range(len(batch)):
            tokens = generated[row].tolist()
            length = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
            kept = tokens if length is None else tokens[:length]
            scored = len(tokens) if length is None else length + 1
            mean = float(chosen[row, :scored].mean()) if scored else float("nan")
            continuations.append(Continuation(token_ids=kept, mean_log_likelihood=mean))
    return continuations


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def generate_text(model, tokenizer, prompt: str, max_length: int = 64) -> str:
    """Generate a greedy continuation of ``prompt`` of at most ``max_length`` new tokens and decode it."""
    with torch.inference_mode():
        continuation = greedy_continuations(model, tokenizer, [prompt], max_new_tokens=max_length, batch_size=1)[0]
    return tokenizer.decode(continuation.token_ids, skip_special_tokens=True)


def coherence(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int, device, batch_size: int = 8
) -> dict[str, float]:
    """Score greedy continuations of ``prompts``: ``coherence`` and its parts, averaged over prompts.

    Decoding is greedy, so ``seed`` only pins torch's global generator for model code that draws random
    numbers. ``device`` must be the device the model is on.
    """
    if not prompts:
        raise EvaluationError("no prompts to score: add at least one entry to evaluation.prompts")
    torch.manual_seed(seed)

    with torch.inference_mode():
        continuations = greedy_continuations(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    rows = [continuation_statistics(c.token_ids, c.mean_log_likelihood) for c in continuations]
    return average_statistics(rows)


# --------------------------------------------------------------------------------------------------
# Task accuracy


def _choice_sequences(tokenizer, item: TaskItem) -> list[tuple[list[int], int]]:
    """Build ``(ids, first_scored)`` per choice, splitting context and continuation as lm-evaluation-harness does.

    Trailing spaces move from the prompt to the choice, and the continuation tokens are those of
    ``prompt + choice`` after the prompt's tokens, so BPE merges across the boundary stay intact.
    """
    context_text = item.prompt.rstrip(" ")
    moved_spaces = item.prompt[len(context_text) :]
    context_ids = tokenizer(context_text, add_special_tokens=True)["input_ids"]
    if not context_ids:
        # An empty prompt still needs one context token: BOS, else EOS as lm-evaluation-harness uses.
        fallback = tokenizer.bos_token_id
        if fallback is None:
            fallback = tokenizer.eos_token_id
        if fallback is None:
            fallback = _pad_id(tokenizer)
        context_ids = [fallback]

    sequences = []
    for choice in item.choices:
        continuation = moved_spaces + choice
        whole_ids = tokenizer(context_text + continuation, add_special_tokens=True)["input_ids"]
        if whole_ids[: len(context_ids)] != context_ids or len(whole_ids) <= len(context_ids):
            # The tokenizer merged across the boundary; score the continuation tokenized on its own.
            whole_ids = context_ids + tokenizer(continuation, add_special_tokens=False)["input_ids"]
        sequences.append((whole_ids, len(context_ids)))
    return sequences


def score_task_items(
    model, tokenizer, items: list[TaskItem], *, batch_size: int, max_new_tokens: int = 32
) -> list[bool]:
    """Score each item and return whether the model got it right."""
    device = _model_device(model)
    correct = [False] * len(items)

    choice_items = [i for i, item in enumerate(items) if item.choices]
    sequences = []
    owners = []
    for index in choice_items:
        for sequence in _choice_sequences(tokenizer, items[index]):
            sequences.append(sequence)
            owners.append(index)

    with torch.inference_mode():
        if sequences:
            scores = score_sequences(model, sequences, batch_size=batch_size, pad_id=_pad_id(tokenizer), device=device)
            if not all(math.isfinite(score) for score in scores):
                raise EvaluationError("choice log-likelihood is not finite: the model produced NaN or inf logits")
            by_item: dict[int, list[float]] = {}
            for owner, score in zip(owners, scores):
                by_item.setdefault(owner, []).append(score)
            for index, choice_scores in by_item.items():
                best = max(range(len(choice_scores)), key=choice_scores.__getitem__)
                correct[index] = best == items[index].answer_index

        generative = [i for i, item in enumerate(items) if not item.choices]
        if generative:
            prompts = [items[i].prompt for i in generative]
            continuations = greedy_continuations(
                model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            for index, continuation in zip(generative, continuations):
                text = tokenizer.decode(continuation.token_ids, skip_special_tokens=True)
                correct[index] = answers_match(text, items[index].answer)
    return correct


def task_accuracy(
    model, tokenizer, task_file: str | os.PathLike, *, device, batch_size: int, max_new_tokens: int = 32
) -> float:
    """Score a JSONL task file and return the fraction of items the model gets right.

    ``device`` must be the device the model is on. It is accepted for symmetry with ``perplexity``.
    """
    items = load_task_items(task_file)
    correct = score_task_items(model, tokenizer, items, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return sum(correct) / len(correct)


# --------------------------------------------------------------------------------------------------
# Fitness


def _is_weightable(name: str) -> bool:
    return name in FITNESS_TRANSFORMS or (name.startswith(TASK_METRIC_PREFIX) and len(name) > len(TASK_METRIC_PREFIX))


def compute_fitness(metrics: dict[str, float], weights: dict[str, float]) -> float:
    """Combine metrics into one fitness, higher is better: ``sum(weight * transform(metric))``.

    Perplexity is transformed to ``-log(perplexity)``; every other metric enters unchanged. Raises
    ``ConfigError`` for a weight on an unknown metric or on one that was not computed.
    """
    if not weights:
        raise ConfigError(f"evaluation.metric_weights is empty: weight at least one of {sorted(FITNESS_TRANSFORMS)}")

    fitness = 0.0
    for name, weight in weights.items():
        if not _is_weightable(name):
            raise ConfigError(
                f"unknown metric {name!r} in evaluation.metric_weights: valid names are "
                f"{', '.join(sorted(FITNESS_TRANSFORMS))} and '{TASK_METRIC_PREFIX}<task file stem>'"
            )
        if name not in metrics:
            raise ConfigError(
                f"metric {name!r} has a weight but was not computed (computed: {sorted(metrics) or 'none'}): "
                "add the texts, prompts or task files it needs, or drop its weight"
            )
        transform = FITNESS_TRANSFORMS.get(name, FITNESS_TRANSFORMS["task_accuracy"])
        fitness += weight * transform(metrics[name])
    return fitness


# --------------------------------------------------------------------------------------------------
# Whole-model evaluation


@dataclass
class _SplitInputs:
    texts: list[str]
    prompts: list[str]
    task_files: list[str]


def _split_inputs(settings: EvaluationSettings, split: str) -> _SplitInputs:
    """Select and load the texts, prompts and task files of ``split``; raise on a settings problem."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use 'search' or 'heldout'")

    if split == "search":
        text_entries, task_files = settings.search_texts, settings.task_files
        prompts = settings.prompts
    else:
        text_entries, task_files = settings.heldout_texts, settings.heldout_task_files
        prompts = settings.heldout_prompts or settings.prompts
        if not text_entries and not task_files:
            raise EvaluationError(
                "split 'heldout' has no data: set evaluation.heldout_texts or evaluation.heldout_task_files"
            )

    texts = load_texts(text_entries) if text_entries else []
    return _SplitInputs(texts=texts, prompts=list(prompts), task_files=list(task_files))


def _planned_metrics(inputs: _SplitInputs) -> set[str]:
    names = set()
    if inputs.texts:
        names.add("perplexity")
    if inputs.prompts:
        names.update({"coherence", "distinct_2", "non_repetition_4", "confidence"})
    if inputs.task_files:
        names.add("task_accuracy")
        names.update(f"{TASK_METRIC_PREFIX}{Path(task_file).stem}" for task_file in inputs.task_files)
    return names


def _check_inputs(inputs: _SplitInputs, settings: EvaluationSettings) -> None:
    stems = [Path(task_file).stem for task_file in inputs.task_files]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise ConfigError(
            f"task files share the name(s) {repeated}, so their 'task_accuracy:<name>' metrics would collide: "
            "rename the files"
        )
    if "perplexity" in settings.metric_weights and not inputs.texts:
        raise EvaluationError(
            "the text set is empty but metric_weights weights perplexity: add files or strings to "
            "evaluation.search_texts (or heldout_texts for the held-out split), or drop the perplexity weight"
        )
    for task_file in inputs.task_files:
        load_task_items(task_file)
    # Placeholder values: only the names matter for the weight check.
    compute_fitness({name: 1.0 for name in _planned_metrics(inputs)}, settings.metric_weights)


def check_settings(settings: EvaluationSettings, split: str = "search") -> None:
    """Raise ``EvaluationError`` or ``ConfigError`` for settings that no candidate could pass.

    Tokenizer-dependent checks (texts of fewer than two tokens) need a model and run in ``evaluate_model``.
    """
    _check_inputs(_split_inputs(settings, split), settings)


def _compute_metrics(model, tokenizer, inputs: _SplitInputs, token_ids, settings: EvaluationSettings, device):
    """Run every metric the split has inputs for; return (metrics, perplexity tokens)."""
    metrics: dict[str, float] = {}
    tokens = 0
    with torch.inference_mode():
        if token_ids:
            window = _window_length(model, settings.max_length)
            metrics["perplexity"], tokens = perplexity_of_token_ids(
                model,
                token_ids,
                max_length=window,
                stride=min(settings.stride, window),
                batch_size=settings.batch_size,
                pad_id=_pad_id(tokenizer),
                device=device,
            )

    if inputs.prompts:
        metrics.update(
            coherence(
                model,
                tokenizer,
                inputs.prompts,
                max_new_tokens=settings.max_new_tokens,
                seed=settings.seed,
                device=device,
                batch_size=settings.batch_size,
            )
        )

    if inputs.task_files:
        all_correct: list[bool] = []
        for task_file in inputs.task_files:
            items = load_task_items(task_file)
            correct = score_task_items(
                model, tokenizer, items, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens
            )
            metrics[f"{TASK_METRIC_PREFIX}{Path(task_file).stem}"] = sum(correct) / len(correct)
            all_correct.extend(correct)
        # Pooled over items, so a file with more items weighs more.
        metrics["task_accuracy"] = sum(all_correct) / len(all_correct)
    return metrics, tokens


def _failed_scores(error: BaseException, split, settings_hash, started, device) -> Scores:
    return Scores(
        metrics={},
        fitness=WORST_FITNESS,
        split=split,
        settings_hash=settings_hash,
        failed=True,
        error=str(error) or type(error).__name__,
        wall_seconds=time.perf_counter() - started,
        device=str(device),
    )


def evaluate_model(
    model_path: str | os.PathLike, settings: EvaluationSettings, *, split: str = "search", device: str | None = None
) -> Scores:
    """Score one checkpoint on ``split`` and return its metrics and fitness.

    Raises for settings problems (see the module docstring); a broken candidate returns failed Scores.
    ``device`` overrides ``settings.device``.
    """
    started = time.perf_counter()
    settings_hash = settings.canonical_hash()
    inputs = _split_inputs(settings, split)
    _check_inputs(inputs, settings)

    torch_device = select_device(device or settings.device)
    if torch_device.type == "cpu":
        configure_cpu_threads()

    try:
        model, tokenizer = load_model_for_evaluation(model_path, torch_device, settings.dtype)
    except _CANDIDATE_ERRORS as error:
        logger.warning("evaluation of %s failed while loading: %s", model_path, error)
        return _failed_scores(error, split, settings_hash, started, torch_device)

    # Tokenization errors are settings problems: every candidate carries the base model's tokenizer.
    token_ids = tokenize_texts(tokenizer, inputs.texts) if inputs.texts else []

    try:
        metrics, tokens = _compute_metrics(model, tokenizer, inputs, token_ids, settings, torch_device)
        fitness = compute_fitness(metrics, settings.metric_weights)
        if not math.isfinite(fitness):
            raise EvaluationError(f"fitness is {fitness} for metrics {metrics}: the model output is not finite")
    except ConfigError:
        # The weights were checked before loading, so a ConfigError here is a bug, not a bad candidate.
        raise
    except _CANDIDATE_ERRORS as error:
        logger.warning("evaluation of %s failed: %s", model_path, error)
        return _failed_scores(error, split, settings_hash, started, torch_device)
    finally:
        del model
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()

    wall_seconds = time.perf_counter() - started
    logger.info(
        "evaluated %s on %s split: fitness %.4f, %d tokens in %.2f s (%.0f tokens/s) on %s",
        model_path,
        split,
        fitness,
        tokens,
        wall_seconds,
        tokens / wall_seconds if wall_seconds > 0 else 0.0,
        torch_device,
    )
    return Scores(
        metrics=metrics,
        fitness=fitness,
        split=split,
        settings_hash=settings_hash,
        wall_seconds=wall_seconds,
        device=str(torch_device),
        tokens=tokens,
    )


def parallel_evaluate_models(
    model_paths: list,
    settings: EvaluationSettings | None = None,
    max_workers: int = 1,
    split: str = "search",
) -> list[Scores]:
    """Evaluate several checkpoints with up to ``max_workers`` threads; results follow ``model_paths``.

    Each running evaluation borrows a free worker index ``i`` from a pool of ``max_workers`` and, with
    ``n`` CUDA GPUs, runs on ``cuda:(i % n)``. Two concurrent models thus never share a GPU while
    ``max_workers <= n``. On CPU the workers share torch's thread pool, so more than one worker rarely
    helps. ``settings=None`` scores perplexity on ``SMOKE_TEXTS``. Settings problems raise before any
    model is loaded, and a broken candidate gets failed Scores while the others finish.
    """
    if max_workers < 1:
        raise ConfigError(f"max_workers {max_workers} is invalid: use 1 or more")
    if settings is None:
        settings = EvaluationSettings(search_texts=list(SMOKE_TEXTS))
    check_settings(settings, split)
    if not model_paths:
        return []

    worker_indices: queue.Queue[int] = queue.Queue()
    for index in range(max_workers):
        worker_indices.put(index)
    preference = settings.device

    def evaluate_one(model_path) -> Scores:
        worker_index = worker_indices.get()
        try:
            device = str(select_device(preference, worker_index=worker_index))
            return evaluate_model(model_path, settings, split=split, device=device)
        finally:
            worker_indices.put(worker_index)

    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="evaluate") as executor:
        return list(executor.map(evaluate_one, model_paths))
