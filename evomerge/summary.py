"""The closing summary a finished tournament prints for the user."""

from __future__ import annotations

from typing import Any


def format_summary(summary: dict[str, Any]) -> str:
    """Format a flow summary: the best model's path, the score table by split, and the output files."""
    lines = [f"Run {summary['run_id']} finished."]
    if summary.get("best_path"):
        lines.append(f"Best model: {summary['best_path']}")
        lines.append(f"  key {summary['best_key']}, search fitness {summary['best_fitness']:.4f}")
        for split in ("search", "heldout"):
            note = compare_with_inputs(summary, split)
            if note:
                lines.append(note)
    else:
        lines.append("No candidate was built successfully; see evomerge.log for the reasons.")

    rows = summary.get("comparison") or []
    for split in ("search", "heldout"):
        split_rows = [row for row in rows if row["split"] == split]
        if not split_rows:
            continue
        metrics = sorted({row["metric"] for row in split_rows}, key=lambda m: (m != "fitness", m))
        names = list(dict.fromkeys(row["name"] for row in split_rows))
        values = {(row["name"], row["metric"]): row["value"] for row in split_rows}
        width = max(len(name) for name in names) + 2
        columns = [max(12, len(metric)) + 2 for metric in metrics]
        lines.append("")
        lines.append(f"Scores on the {split} split (fitness: higher is better):")
        lines.append("  " + "model".ljust(width) + "".join(m.rjust(c) for m, c in zip(metrics, columns)))
        for name in names:
            cells = []
            for metric, column in zip(metrics, columns):
                value = values.get((name, metric))
                cells.append(("failed" if value is None else f"{value:.4f}").rjust(column))
            lines.append("  " + name.ljust(width) + "".join(cells))

    files = summary.get("files") or {}
    if files:
        lines.append("")
        lines.append("Charts and report:")
        for name, path in files.items():
            lines.append(f"  {name}: {path}")
    return "\n".join(lines)


SPLIT_NAMES = {"search": "search", "heldout": "held-out"}


def compare_with_inputs(summary: dict[str, Any], split: str = "search") -> str | None:
    """Return a line saying whether the best merge beat the best input model on ``split``, or None without scores."""
    rows = [row for row in summary.get("comparison") or [] if row["split"] == split and row["metric"] == "fitness"]
    best = next((row["value"] for row in rows if row["name"] == "best merge"), None)
    inputs = [row for row in rows if row["key"].startswith("input-") and row["value"] is not None]
    if best is None or not inputs:
        return None

    top = max(inputs, key=lambda row: row["value"])
    where = SPLIT_NAMES.get(split, split)
    if best > top["value"]:
        return f"  beats every input model on the {where} split (best input: {top['name']}, fitness {top['value']:.4f})"
    if split == "search":
        advice = "try more generations or a larger population"
    else:
        advice = "the search texts may be too narrow, so add more varied ones"
    return (
        f"  NOTE: the best merge does not beat the input model {top['name']} (fitness {top['value']:.4f}) "
        f"on the {where} split: {advice}"
    )


def print_summary(summary: dict[str, Any]) -> None:
    """Print ``format_summary(summary)`` to standard output."""
    print(format_summary(summary))
