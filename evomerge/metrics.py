"""Pure metric arithmetic: perplexity windows and accumulation, coherence statistics, answer matching.

Nothing here touches a model, so every function can be checked by hand.

Perplexity
    ``exp(total NLL / total predicted tokens)`` over a whole text set, in nats, so long texts weigh more
    than short ones. A text of ``n`` tokens has ``n - 1`` predicted tokens because the first token has no
    context. Texts longer than the window are scored with the sliding-window recipe of the Hugging Face
    guide "Perplexity of fixed-length models": windows of ``max_length`` tokens start every ``stride``
    tokens, and the tokens an earlier window already scored are context only (label ``-100``).
    Each window costs ``max_length`` tokens of compute for about ``stride`` scored tokens.

Coherence
    Three statistics of a greedy continuation, each in [0, 1] and higher is better:
    ``distinct_2`` (unique bigrams / bigrams), ``non_repetition_4`` (1 - repeated 4-grams / 4-grams) and
    ``confidence`` (``exp`` of the model's mean token log-likelihood of its own continuation, which is the
    geometric mean token probability). ``coherence`` is their unweighted mean.

Answer matching
    A generated answer matches a reference after ``normalize_answer`` (first line, lower case, collapsed
    whitespace, no trailing punctuation). When the reference is a number, the first number in the
    generated text is compared instead, so "The answer is 12." matches "12".
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

from evomerge.exceptions import EvaluationError

# Label value that torch's cross-entropy and transformers' loss functions skip.
IGNORE_INDEX = -100

_NUMBER_PATTERN = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


@dataclass(frozen=True)
class Window:
    """One perplexity window over a token sequence.

    ``begin`` and ``end`` bound the tokens fed to the model. Positions ``first_scored`` to ``end - 1``
    (absolute indices into the sequence) are predicted in this window; earlier ones are context only.
    """

    begin: int
    end: int
    first_scored: int

    @property
    def scored_tokens(self) -> int:
        return self.end - self.first_scored


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Plan the perplexity windows over a sequence of ``num_tokens`` tokens.

    Follows the Hugging Face fixed-length perplexity recipe: windows start at 0, stride, 2*stride, ...
    and the loop stops after the first window that reaches the end of the sequence. Token 0 is never
    scored because nothing precedes it. With ``stride < max_length`` every token after the first is
    scored exactly once. With ``stride == max_length`` the windows do not overlap, so the first token of each
    later window has no context and is skipped, as in the recipe.
    """
    if num_tokens < 2:
        raise EvaluationError(
            f"a sequence of {num_tokens} token(s) has nothing to predict: every text needs at least two tokens"
        )
    if max_length < 2:
        raise EvaluationError(f"max_length {max_length} is too small: a window needs at least two tokens")
    if stride < 1 or stride > max_length:
        raise EvaluationError(
            f"stride {stride} is invalid for max_length {max_length}: use 1 <= stride <= max_length "
            "so that no token is skipped"
        )

    windows = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        first_scored = max(previous_end, begin + 1)
        windows.append(Window(begin=begin, end=end, first_scored=first_scored))
        previous_end = end
        if end == num_tokens:
            break
    return windows


@dataclass
class PerplexityAccumulator:
    """Running sum of negative log-likelihood (nats) and of predicted tokens."""

    total_nll: float = 0.0
    total_tokens: int = 0

    def add(self, nll_sum: float, tokens: int) -> None:
        """Add the summed NLL of ``tokens`` predicted tokens."""
        if not math.isfinite(nll_sum):
            raise EvaluationError(
                f"negative log-likelihood is {nll_sum}: the model produced non-finite logits (NaN or inf weights)"
            )
        self.total_nll += nll_sum
        self.total_tokens += tokens

    def mean_nll(self) -> float:
        """Return the token-weighted mean NLL in nats per token."""
        if self.total_tokens == 0:
            raise EvaluationError("no tokens were scored: give texts of at least two tokens")
        return self.total_nll / self.total_tokens

    def perplexity(self) -> float:
        """Return ``exp(mean NLL)``."""
        mean = self.mean_nll()
        try:
            return math.exp(mean)
        except OverflowError:
            raise EvaluationError(
                f"mean NLL {mean:.1f} nats per token overflows exp(): the model assigns near-zero probability "
                "to the text and is broken"
            ) from None


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    """Return the ``n``-grams of ``tokens`` in order."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: list[int], n: int = 2) -> float:
    """Return unique ``n``-grams / ``n``-grams, or 0.0 when the sequence has no ``n``-gram.

    An empty or one-token continuation scores 0.0 because it shows no fluent text at all.
    """
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


def repeated_ngram_fraction(tokens: list[int], n: int = 4) -> float:
    """Return the fraction of ``n``-grams that repeat an earlier one; 0.0 when there are none."""
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def squash_log_likelihood(mean_log_likelihood: float) -> float:
    """Map a mean token log-likelihood (nats, <= 0) to [0, 1] as ``exp(value)``."""
    if math.isnan(mean_log_likelihood):
        raise EvaluationError("mean log-likelihood is NaN: the model produced non-finite logits")
    return math.exp(min(mean_log_likelihood, 0.0))


def continuation_statistics(tokens: list[int], mean_log_likelihood: float) -> dict[str, float]:
    """Compute the coherence parts and their mean for one continuation."""
    parts = {
        "distinct_2": distinct_n(tokens, 2),
        "non_repetition_4": 1.0 - repeated_ngram_fraction(tokens, 4),
        "confidence": squash_log_likelihood(mean_log_likelihood),
    }
    parts["coherence"] = sum(parts.values()) / 3.0
    return parts


def average_statistics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Average each key over ``rows`` (one row per prompt)."""
    if not rows:
        raise EvaluationError("no prompts to score: add at least one entry to evaluation.prompts")
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


def normalize_answer(text: str) -> str:
    """Normalise an answer: first non-empty line, lower case, collapsed whitespace, no trailing punctuation.

    Only trailing punctuation goes, so a leading minus sign or a quoted phrase survives.
    """
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    collapsed = " ".join(first.lower().split())
    return collapsed.rstrip(string.punctuation + " ")


def first_number(text: str) -> float | None:
    """Return the first number in ``text`` (thousands commas allowed), or None."""
    match = _NUMBER_PATTERN.search(text)
    if match is None:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def answers_match(prediction: str, reference: str) -> bool:
    """Compare a generated answer with a reference, numerically when the reference is a number."""
    reference_normalized = normalize_answer(reference)
    reference_number = first_number(reference_normalized)
    if reference_number is not None and _NUMBER_PATTERN.fullmatch(reference_normalized):
        predicted_number = first_number(normalize_answer(prediction))
        return predicted_number is not None and math.isclose(predicted_number, reference_number, rel_tol=1e-9)
    return normalize_answer(prediction) == reference_normalized
