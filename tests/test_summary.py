"""The closing summary: score tables and the verdict against the input models on each split."""

from __future__ import annotations

from evomerge.summary import compare_with_inputs, format_summary


def summary_with(search: dict[str, float], heldout: dict[str, float]) -> dict:
    rows = []
    for split, scores in (("search", search), ("heldout", heldout)):
        for name, value in scores.items():
            key = "best" if name == "best merge" else f"input-{name}"
            rows.append({"split": split, "metric": "fitness", "name": name, "key": key, "value": value})
    return {
        "run_id": "run-1",
        "best_path": "/store/checkpoints/abc",
        "best_key": "abc",
        "best_fitness": search["best merge"],
        "comparison": rows,
    }


def test_summary_verdict_on_both_splits():
    search = {"a": -2.0, "b": -1.5, "best merge": -1.2}
    heldout = {"a": -2.1, "b": -1.7, "best merge": -1.6}
    text = format_summary(summary_with(search, heldout))
    assert "beats every input model on the search split (best input: b, fitness -1.5000)" in text
    assert "beats every input model on the held-out split (best input: b, fitness -1.7000)" in text


def test_summary_heldout_loss_is_noted():
    summary = summary_with({"a": -2.0, "best merge": -1.2}, {"a": -1.0, "best merge": -1.6})
    note = compare_with_inputs(summary, "heldout")
    assert note.startswith("  NOTE: the best merge does not beat the input model a (fitness -1.0000)")
    assert "held-out split" in note
    assert "beats every input model on the search split" in format_summary(summary)


def test_summary_verdict_without_scores():
    summary = summary_with({"a": -2.0, "best merge": -1.2}, {})
    assert compare_with_inputs(summary, "heldout") is None
    assert compare_with_inputs({"comparison": []}) is None
