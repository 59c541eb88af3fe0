"""Tests for the tournament charts, their PNG export and the markdown summaries."""

from __future__ import annotations

import base64
import math
import struct

import numpy as np
import pandas as pd
import pytest

from evomerge import charts
from evomerge.exceptions import ReportError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

K0A = "aaaa0000111122223333"
K0B = "bbbb0000111122223333"
K0C = "cccc0000111122223333"
K1A = "dddd0000111122223333"
K1B = "eeee0000111122223333"
K1C = "ffff0000111122223333"
LONG_ERROR = (
    "MergeError: tensor model.layers.3.mlp.up_proj.weight has NaN after the TIES merge; "
    "lower density or check the inputs"
)


def make_generations() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": ["r1", "r1"],
            "generation": [0, 1],
            "best_key": [K0A, K1A],
            "best_fitness": [0.5, 0.7],
            "mean_fitness": [0.4, 0.6],
            "std_fitness": [0.1, 0.05],
            "candidates": [3, 3],
            "failed": [1, 0],
            "wall_seconds": [10.0, 12.0],
        }
    )


def make_candidates() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": ["r1"] * 6,
            "key": [K0A, K0B, K0C, K1A, K1B, K1C],
            "generation": [0, 0, 0, 1, 1, 1],
            "method": ["linear", "slerp", "ties", "ties", "linear", "slerp"],
            "parents": [[], [], [], [K0A, K0B], [K0A], [K0B]],
            "status": ["built", "built", "failed", "built", "built", "built"],
            "error": [None, None, LONG_ERROR, None, None, None],
            "fitness": [0.5, 0.3, np.nan, 0.7, 0.65, 0.45],
            "perplexity": [12.345678, 20.0, np.nan, 9.87654, 10.5, 15.0],
            "coherence": [0.61234, 0.5, np.nan, 0.7, 0.66, 0.55],
        }
    )


def make_lineage() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "parent_key": [K0A, K0B, K0A, K0B, "base-model"],
            "child_key": [K1A, K1A, K1B, K1C, K0A],
            "generation": [1, 1, 1, 1, 0],
            "child_fitness": [0.7, 0.7, 0.65, 0.45, 0.5],
        }
    )


def make_comparison() -> pd.DataFrame:
    rows = []
    for name, perplexity in [("org/base", 14.0), ("best merge", 9.9), ("org/math-ft", 12.0)]:
        rows.append({"name": name, "metric": "perplexity", "value": perplexity, "split": "search"})
        rows.append({"name": name, "metric": "perplexity", "value": perplexity + 1.0, "split": "heldout"})
    return pd.DataFrame(rows)


def layer_values(spec: dict, layer: dict) -> list[dict]:
    """Return the inline data rows of one layer of a compiled Altair spec."""
    return spec["datasets"][layer["data"]["name"]]


def png_size(data: bytes) -> tuple[int, int]:
    """Read width and height from a PNG's IHDR chunk."""
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------
# fitness_chart
# ---------------------------------------------------------------------------


def test_fitness_chart_axis_titles():
    spec = charts.fitness_chart(make_generations()).to_dict()
    line = spec["layer"][-1]

    assert line["encoding"]["x"]["axis"]["title"] == "Generation"
    assert line["encoding"]["y"]["title"] == "Fitness (higher is better)"


def test_fitness_chart_line_values():
    spec = charts.fitness_chart(make_generations()).to_dict()
    rows = layer_values(spec, spec["layer"][-1])
    by_series = {(row["series"], row["generation"]): row["fitness"] for row in rows}

    assert by_series[("best fitness", 0)] == 0.5
    assert by_series[("best fitness", 1)] == 0.7
    assert by_series[("mean fitness", 1)] == 0.6


def test_fitness_chart_band_values():
    spec = charts.fitness_chart(make_generations()).to_dict()
    band = spec["layer"][0]
    rows = {row["generation"]: row for row in layer_values(spec, band)}

    assert band["mark"]["type"] == "area"
    assert rows[0]["lower"] == pytest.approx(0.3)
    assert rows[0]["upper"] == pytest.approx(0.5)
    assert rows[1]["lower"] == pytest.approx(0.55)


def test_fitness_chart_drops_failed_points():
    spec = charts.fitness_chart(make_generations(), make_candidates()).to_dict()
    fitness = spec["vconcat"][0]
    points = layer_values(spec, fitness["layer"][1])

    assert sorted(row["key"] for row in points) == sorted([K0A, K0B, K1A, K1B, K1C])
    assert "1 failed and not drawn" in fitness["title"]["subtitle"]


def test_fitness_chart_jitter_within_generation():
    spec = charts.fitness_chart(make_generations(), make_candidates()).to_dict()
    points = layer_values(spec, spec["vconcat"][0]["layer"][1])
    offsets = sorted(row["x"] - row["generation"] for row in points if row["generation"] == 1)

    assert offsets == pytest.approx([-0.2, 0.0, 0.2])


def test_fitness_chart_metric_panels_use_best_key():
    spec = charts.fitness_chart(make_generations(), make_candidates()).to_dict()
    panels = spec["vconcat"][1]
    values = {(row["metric"], row["generation"]): row["value"] for row in spec["datasets"][panels["data"]["name"]]}

    assert panels["facet"]["field"] == "metric"
    assert values[("perplexity", 0)] == pytest.approx(12.345678)
    assert values[("coherence", 1)] == pytest.approx(0.7)
    assert panels["resolve"]["scale"]["y"] == "independent"


def test_fitness_chart_one_metric_no_panels():
    candidates = make_candidates().drop(columns=["coherence"])
    spec = charts.fitness_chart(make_generations(), candidates).to_dict()

    assert "vconcat" not in spec
    assert len(spec["layer"]) == 3


def test_fitness_chart_one_generation_rule():
    generations = make_generations().iloc[:1]
    candidates = make_candidates().iloc[:3]
    chart = charts.fitness_chart(generations, candidates, metrics=["perplexity"])
    spec = chart.to_dict()

    assert spec["layer"][0]["mark"]["type"] == "rule"
    assert spec["layer"][0]["encoding"]["x"]["scale"]["domain"] == [-0.5, 0.5]
    assert png_size(charts.chart_png(chart, scale=1.0))[0] > 100


def test_fitness_chart_all_failed_generation():
    generations = make_generations()
    generations.loc[1, ["best_key", "best_fitness", "mean_fitness", "std_fitness"]] = [None, np.nan, np.nan, np.nan]
    candidates = make_candidates()
    candidates.loc[candidates["generation"] == 1, "fitness"] = np.nan

    png = charts.chart_png(charts.fitness_chart(generations, candidates), scale=1.0)

    assert png.startswith(PNG_SIGNATURE)


def test_fitness_chart_missing_column():
    with pytest.raises(ReportError, match="best_fitness"):
        charts.fitness_chart(make_generations().drop(columns=["best_fitness"]))


def test_fitness_chart_empty_generations():
    with pytest.raises(ReportError, match="no rows"):
        charts.fitness_chart(make_generations().iloc[:0])


def test_fitness_chart_mixed_runs():
    generations = make_generations()
    generations.loc[1, "run_id"] = "r2"

    with pytest.raises(ReportError, match="one run_id"):
        charts.fitness_chart(generations)


def test_fitness_chart_unknown_metric():
    with pytest.raises(ReportError, match="bleu"):
        charts.fitness_chart(make_generations(), make_candidates(), metrics=["perplexity", "bleu"])


def test_metric_columns_skip_schema_and_seconds():
    candidates = make_candidates().assign(build_seconds=1.5)

    assert charts.metric_columns(candidates) == ["perplexity", "coherence"]


# ---------------------------------------------------------------------------
# comparison_chart
# ---------------------------------------------------------------------------


def test_comparison_chart_best_merge_first():
    spec = charts.comparison_chart(make_comparison()).to_dict()
    bars = spec["spec"]["layer"][0]

    assert bars["encoding"]["x"]["sort"] == ["best merge", "org/base", "org/math-ft"]
    assert bars["encoding"]["xOffset"]["field"] == "split"
    assert spec["facet"]["field"] == "metric"


def test_comparison_chart_keeps_values():
    spec = charts.comparison_chart(make_comparison()).to_dict()
    rows = spec["datasets"][spec["data"]["name"]]
    values = {(row["name"], row["split"]): row["value"] for row in rows}

    assert values[("best merge", "heldout")] == pytest.approx(10.9)
    assert len(rows) == 6


def test_comparison_chart_missing_column():
    with pytest.raises(ReportError, match="split"):
        charts.comparison_chart(make_comparison().drop(columns=["split"]))


# ---------------------------------------------------------------------------
# lineage_chart
# ---------------------------------------------------------------------------


def test_lineage_chart_ranks_and_edges():
    spec = charts.lineage_chart(make_candidates(), make_lineage()).to_dict()
    grey, red, built, failed = spec["layer"]
    ranks = {row["key"]: row["rank"] for row in layer_values(spec, built)}
    red_edges = {(row["parent_key"], row["child_key"]) for row in layer_values(spec, red)}

    assert ranks == {K0A: 1, K0B: 2, K1A: 1, K1B: 2, K1C: 3}
    assert [row["key"] for row in layer_values(spec, failed)] == [K0C]
    assert red_edges == {(K0A, K1A), (K0B, K1A)}
    assert len(layer_values(spec, grey)) == 2


def test_lineage_chart_edge_coordinates():
    spec = charts.lineage_chart(make_candidates(), make_lineage()).to_dict()
    red_rows = layer_values(spec, spec["layer"][1])
    edge = next(row for row in red_rows if row["parent_key"] == K0B)

    assert (edge["generation"], edge["rank"]) == (0, 2)
    assert (edge["child_generation"], edge["child_rank"]) == (1, 1)


def test_lineage_chart_counts_undrawn_edges():
    spec = charts.lineage_chart(make_candidates(), make_lineage()).to_dict()

    assert "1 edge(s) from parents outside the candidate table are not drawn" in spec["title"]["subtitle"]


def test_lineage_chart_without_edges():
    candidates = make_candidates().iloc[:3]
    spec = charts.lineage_chart(candidates, pd.DataFrame()).to_dict()

    assert len(spec["layer"]) == 4
    assert spec["title"]["subtitle"] == []


# ---------------------------------------------------------------------------
# PNG export
# ---------------------------------------------------------------------------


def test_save_png_writes_png(tmp_path):
    path = charts.save_png(charts.comparison_chart(make_comparison()), tmp_path / "sub" / "cmp.png", scale=1.0)
    data = path.read_bytes()

    assert data.startswith(PNG_SIGNATURE)
    assert png_size(data)[0] > 200
    assert png_size(data)[1] > 200


def test_png_scale_doubles_width():
    chart = charts.lineage_chart(make_candidates(), make_lineage())
    width_1 = png_size(charts.chart_png(chart, scale=1.0))[0]
    width_2 = png_size(charts.chart_png(chart, scale=2.0))[0]

    assert abs(width_2 - 2 * width_1) <= 2


def test_png_rejects_zero_scale():
    with pytest.raises(ReportError, match="scale"):
        charts.chart_png(charts.fitness_chart(make_generations()), scale=0)


def test_data_uri_decodes_to_png():
    uri = charts.chart_png_data_uri(charts.fitness_chart(make_generations()))
    prefix = "data:image/png;base64,"

    assert uri.startswith(prefix)
    assert base64.b64decode(uri[len(prefix):]).startswith(PNG_SIGNATURE)


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def test_format_number_cases():
    assert charts.format_number(12.345678) == "12.35"
    assert charts.format_number(0.000123456) == "0.0001235"
    assert charts.format_number(float("nan")) == "n/a"
    assert charts.format_number(None) == "n/a"
    assert charts.format_number(3) == "3"


def test_shorten_cases():
    assert charts.shorten(K0A, 10) == "aaaa00001…"
    assert charts.shorten("short", 10) == "short"
    assert charts.shorten(math.nan, 10) == ""


def test_generation_markdown_rows():
    text = charts.generation_markdown("r1", 0, make_generations(), make_candidates())

    assert text.startswith("## Run `r1`: generation 0")
    assert "| 1 | aaaa00001… | linear | built | 0.5 | 12.35 | 0.6123 |  |  |" in text
    assert "| 2 | bbbb00001… | slerp | built | 0.3 | 20 | 0.5 |  |  |" in text


def test_generation_markdown_failed_row_last():
    text = charts.generation_markdown("r1", 0, make_generations(), make_candidates())
    last_row = text.strip().splitlines()[-1]

    assert last_row.startswith("| 3 | cccc00001… | ties | failed | n/a | n/a | n/a |")
    assert charts.shorten(LONG_ERROR, charts.ERROR_WIDTH) in last_row


def test_generation_markdown_embeds_png():
    text = charts.generation_markdown("r1", 1, make_generations(), make_candidates())

    assert "![Fitness per generation](data:image/png;base64," in text
    assert "aaaa00001… | linear" not in text
    assert "| 1 | dddd00001… | ties | built | 0.7 | 9.877 | 0.7 | aaaa00001…, bbbb00001… |  |" in text


def test_generation_markdown_escapes_pipes():
    candidates = make_candidates()
    candidates.loc[2, "error"] = "bad | value"
    text = charts.generation_markdown("r1", 0, make_generations(), candidates)

    assert "bad \\| value" in text


def test_generation_markdown_unknown_generation():
    with pytest.raises(ReportError, match="generation 5"):
        charts.generation_markdown("r1", 5, make_generations(), make_candidates())


def test_heldout_gap_long_form():
    table = charts.heldout_gap_table(make_comparison())
    row = table[table["name"] == "best merge"].iloc[0]

    assert row["search"] == pytest.approx(9.9)
    assert row["heldout"] == pytest.approx(10.9)
    assert row["gap"] == pytest.approx(1.0)


def test_heldout_gap_wide_form():
    wide = pd.DataFrame({"metric": ["coherence"], "search": [0.8], "heldout": [0.75]})
    table = charts.heldout_gap_table(wide)

    assert table.loc[0, "name"] == "best merge"
    assert table.loc[0, "gap"] == pytest.approx(-0.05)


def test_heldout_gap_bad_columns():
    with pytest.raises(ReportError, match="metric, search and heldout"):
        charts.heldout_gap_table(pd.DataFrame({"x": [1]}))


def test_final_markdown_sections():
    best = {"key": K1A, "fitness": 0.712345, "method": "ties", "recipe": {"merge_method": "ties", "density": 0.5}}
    heldout = pd.DataFrame({"metric": ["perplexity"], "search": [9.87654], "heldout": [11.0]})
    text = charts.final_markdown("r1", best, [K0A, K1A], heldout)

    assert "| fitness | 0.7123 |" in text
    assert "merge_method: ties" in text
    assert "`aaaa00001…` → `dddd00001…`" in text
    assert "| best merge | perplexity | 9.877 | 11 | 1.123 |" in text


def test_final_markdown_rejects_non_dict():
    with pytest.raises(ReportError, match="not a dict"):
        charts.final_markdown("r1", ["best"], [], make_comparison())
