"""Hand-checked cases for the pure metric arithmetic in evomerge.metrics."""

import math

import pytest

from evomerge.exceptions import EvaluationError
from evomerge.metrics import (
    PerplexityAccumulator,
    Window,
    answers_match,
    average_statistics,
    continuation_statistics,
    distinct_n,
    first_number,
    normalize_answer,
    repeated_ngram_fraction,
    sliding_windows,
    squash_log_likelihood,
)


def test_windows_short_text_single():
    assert sliding_windows(5, max_length=8, stride=4) == [Window(begin=0, end=5, first_scored=1)]


def test_windows_long_text_overlap():
    # 10 tokens, window 4, stride 2: the Hugging Face recipe scores end - previous_end tokens per window.
    windows = sliding_windows(10, max_length=4, stride=2)
    assert windows == [
        Window(0, 4, 1),
        Window(2, 6, 4),
        Window(4, 8, 6),
        Window(6, 10, 8),
    ]


def test_windows_score_each_token_once():
    for num_tokens, max_length, stride in [(2, 2, 1), (17, 5, 3), (100, 16, 15), (33, 8, 1)]:
        windows = sliding_windows(num_tokens, max_length, stride)
        scored = [position for w in windows for position in range(w.first_scored, w.end)]
        assert scored == list(range(1, num_tokens))


def test_windows_without_overlap_skip_first():
    # stride == max_length: tokens 4 and 8 open a window with no context and are not scored.
    windows = sliding_windows(10, max_length=4, stride=4)
    scored = [position for w in windows for position in range(w.first_scored, w.end)]
    assert scored == [1, 2, 3, 5, 6, 7, 9]


def test_windows_stop_at_sequence_end():
    windows = sliding_windows(9, max_length=8, stride=4)
    assert windows[-1].end == 9
    assert len(windows) == 2


def test_windows_reject_one_token():
    with pytest.raises(EvaluationError, match="at least two tokens"):
        sliding_windows(1, max_length=8, stride=4)


def test_windows_reject_stride_above_length():
    with pytest.raises(EvaluationError, match="stride 9"):
        sliding_windows(20, max_length=8, stride=9)


def test_accumulator_token_weighted():
    accumulator = PerplexityAccumulator()
    accumulator.add(6.0, 3)
    accumulator.add(2.0, 1)
    assert accumulator.mean_nll() == pytest.approx(2.0)
    assert accumulator.perplexity() == pytest.approx(math.exp(2.0))


def test_accumulator_rejects_nan():
    with pytest.raises(EvaluationError, match="non-finite"):
        PerplexityAccumulator().add(float("nan"), 3)


def test_accumulator_empty_raises():
    with pytest.raises(EvaluationError, match="no tokens"):
        PerplexityAccumulator().mean_nll()


def test_accumulator_overflow_raises():
    accumulator = PerplexityAccumulator()
    accumulator.add(800.0, 1)
    with pytest.raises(EvaluationError, match="overflows"):
        accumulator.perplexity()


def test_distinct_two_known_sequence():
    # Bigrams of 1 2 1 2 3: (1,2) (2,1) (1,2) (2,3) -> 3 unique of 4.
    assert distinct_n([1, 2, 1, 2, 3], 2) == pytest.approx(0.75)


def test_distinct_two_too_short():
    assert distinct_n([7], 2) == 0.0


def test_repeated_four_gram_fraction():
    # 4-grams of 1 2 3 4 1 2 3 4: 5 grams, (1,2,3,4) repeats once -> 1/5.
    assert repeated_ngram_fraction([1, 2, 3, 4, 1, 2, 3, 4], 4) == pytest.approx(0.2)


def test_repeated_constant_sequence():
    # Six identical tokens give three identical 4-grams, two of them repeats.
    assert repeated_ngram_fraction([5] * 6, 4) == pytest.approx(2 / 3)


def test_squash_log_likelihood_values():
    assert squash_log_likelihood(0.0) == 1.0
    assert squash_log_likelihood(math.log(0.25)) == pytest.approx(0.25)


def test_squash_rejects_nan():
    with pytest.raises(EvaluationError, match="NaN"):
        squash_log_likelihood(float("nan"))


def test_continuation_statistics_hand_checked():
    stats = continuation_statistics([1, 2, 3, 4, 1, 2, 3, 4], math.log(0.5))
    # Bigrams: 7, unique (1,2) (2,3) (3,4) (4,1) -> 4/7.
    assert stats["distinct_2"] == pytest.approx(4 / 7)
    assert stats["non_repetition_4"] == pytest.approx(0.8)
    assert stats["confidence"] == pytest.approx(0.5)
    assert stats["coherence"] == pytest.approx((4 / 7 + 0.8 + 0.5) / 3)


def test_average_statistics_per_key():
    rows = [{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 0.5}]
    assert average_statistics(rows) == {"a": 0.5, "b": 0.25}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Paris.  ", "paris"),
        ("New   York\tCity!", "new york city"),
        ("yes\nbecause the sky", "yes"),
        ("\n\n  Blue?!\nred", "blue"),
        ("-12", "-12"),
        ("3.5.", "3.5"),
        ("", ""),
    ],
)
def test_normalize_answer_table(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("The answer is 12.", 12.0), ("-3 apples", -3.0), ("cost: 1,250.5 dollars", 1250.5), ("none", None)],
)
def test_first_number_table(text, expected):
    assert first_number(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Paris.", "paris", True),
        ("Paris is the capital", "paris", False),
        ("The answer is 12.\nNext question", "12", True),
        ("12.0", "12", True),
        ("13", "12", False),
        ("no number", "12", False),
        ("-4", "-4", True),
        ("4", "-4", False),
    ],
)
def test_answers_match_table(prediction, reference, expected):
    assert answers_match(prediction, reference) is expected
