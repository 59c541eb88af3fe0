"""Altair charts of a tournament, their PNG export, and the markdown summaries built on them.

The inputs are the pandas frames that the fitness ledger returns:

- generations: run_id, generation, best_key, best_fitness, mean_fitness, std_fitness, candidates, failed,
  wall_seconds
- candidates: run_id, key, generation, method, parents (list of keys), status ("built" or "failed"), error,
  fitness, plus one float column per metric, NaN where a metric was not measured
- lineage: parent_key, child_key, generation (of the child), child_fitness
- comparison: name (an input model or "best merge"), metric, value, split

PNG export runs the Vega-Lite compiler and renderer bundled in ``vl_convert``, so it needs no browser and no
network. Fitness is higher-is-better throughout, as the tournament maximises it.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import vl_convert
import yaml

from evomerge.exceptions import ReportError

logger = logging.getLogger(__name__)

GENERATION_COLUMNS = (
    "run_id",
    "generation",
    "best_key",
    "best_fitness",
    "mean_fitness",
    "std_fitness",
    "candidates",
    "failed",
    "wall_seconds",
)
CANDIDATE_COLUMNS = ("run_id", "key", "generation", "method", "parents", "status", "error", "fitness")
LINEAGE_COLUMNS = ("parent_key", "child_key")
COMPARISON_COLUMNS = ("name", "metric", "value", "split")
BEST_MERGE_NAME = "best merge"

# Vega-Lite version that the installed altair writes specs for, e.g. "6.4" for altair 6.3.
VEGA_LITE_VERSION = ".".join(alt.VEGALITE_VERSION.split(".")[:2])

FITNESS_TITLE = "Fitness (higher is better)"
KEY_WIDTH = 10
ERROR_WIDTH = 60
SIGNIFICANT_DIGITS = 4
MISSING_TEXT = "n/a"

SERIES_BEST = "best fitness"
SERIES_MEAN = "mean fitness"
SERIES_SPREAD = "mean ± 1 std"
SERIES_CANDIDATE = "candidate"
SERIES_COLORS = {
    SERIES_BEST: "#1f77b4",
    SERIES_MEAN: "#ff7f0e",
    SERIES_SPREAD: "#ffbb78",
    SERIES_CANDIDATE: "#7f7f7f",
}
PATH_EDGE_COLOR = "#c0392b"
FAILED_COLOR = "#8c8c8c"


# ---------------------------------------------------------------------------
# Input checks and small formatting helpers
# ---------------------------------------------------------------------------


def _require_columns(frame: Any, columns: Iterable[str], name: str) -> None:
    """Raise ReportError unless ``frame`` is a DataFrame with every column in ``columns``."""
    if not isinstance(frame, pd.DataFrame):
        raise ReportError(f"{name} is a {type(frame).__name__}, not a pandas DataFrame: pass the ledger's {name} frame")

    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ReportError(
            f"{name} frame lacks columns {missing} (it has {list(frame.columns)}): "
            f"pass the frame returned by the ledger's {name} query"
        )


def _require_rows(frame: pd.DataFrame, name: str) -> None:
    if frame.empty:
        raise ReportError(f"{name} frame has no rows: record at least one {name} row before drawing this chart")


def _require_one_run(frame: pd.DataFrame, name: str) -> None:
    if "run_id" not in frame.columns:
        return
    run_ids = frame["run_id"].dropna().unique()
    if len(run_ids) > 1:
        raise ReportError(
            f"{name} frame mixes runs {sorted(map(str, run_ids))}: filter it to one run_id before charting"
        )


def metric_columns(candidates: pd.DataFrame) -> list[str]:
    """Return the metric columns of a candidates frame: numeric columns beyond the fixed schema.

    Columns that end in ``_seconds`` are durations, not metrics, and are left out.
    """
    metrics = []
    for column in candidates.columns:
        if column in CANDIDATE_COLUMNS or str(column).endswith("_seconds"):
            continue
        if pd.api.types.is_numeric_dtype(candidates[column]) and not pd.api.types.is_bool_dtype(candidates[column]):
            metrics.append(str(column))
    return metrics


def format_number(value: Any, digits: int = SIGNIFICANT_DIGITS) -> str:
    """Format a number to ``digits`` significant digits, and None or NaN as "n/a"."""
    if value is None:
        return MISSING_TEXT
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return MISSING_TEXT
    return f"{number:.{digits}g}"


def shorten(text: Any, width: int) -> str:
    """Cut ``text`` to at most ``width`` characters, ending in "…" when cut. None and NaN give ""."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    return text[: width - 1] + "…"


def _parents_text(parents: Any) -> str:
    """Join a parents list into short keys separated by commas."""
    if parents is None or (isinstance(parents, float) and math.isnan(parents)):
        return ""
    if isinstance(parents, str):
        return shorten(parents, KEY_WIDTH)
    return ", ".join(shorten(parent, KEY_WIDTH) for parent in parents)


def _generation_scale(generations: pd.Series) -> alt.Scale:
    """Pad the generation axis by half a generation so one generation still gets a visible range."""
    low = int(generations.min())
    high = int(generations.max())
    return alt.Scale(domain=[low - 0.5, high + 0.5], nice=False, zero=False)


def _generation_axis() -> alt.Axis:
    return alt.Axis(title="Generation", tickMinStep=1, format="d")


def _jittered_generation(candidates: pd.DataFrame) -> pd.Series:
    """Spread the candidates of one generation over ±0.2 generations, in key order, so points do not stack."""
    order = candidates.groupby("generation")["key"].rank(method="first") - 1
    counts = candidates.groupby("generation")["key"].transform("count")
    offset = (order / (counts - 1).clip(lower=1) - 0.5) * 0.4
    offset = offset.where(counts > 1, 0.0)
    return candidates["generation"] + offset


# ---------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------


def fitness_chart(
    generations: pd.DataFrame,
    candidates: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] | None = None,
) -> alt.TopLevelMixin:
    """Draw best and mean fitness per generation, the mean ± 1 std band and, with candidates, every candidate.

    With candidates and two or more metric columns, a second row of panels shows each metric of each
    generation's fittest candidate (``best_key``), one panel per metric on its own y scale. ``metrics``
    overrides the metric columns found by ``metric_columns``. Failed candidates have no fitness, so they
    are counted in the subtitle and the tooltips and not drawn.
    """
    _require_columns(generations, GENERATION_COLUMNS, "generations")
    _require_rows(generations, "generations")
    _require_one_run(generations, "generations")
    if candidates is not None:
        _require_columns(candidates, CANDIDATE_COLUMNS, "candidates")
        _require_one_run(candidates, "candidates")

    gens = generations.sort_values("generation").reset_index(drop=True)
    x_scale = _generation_scale(gens["generation"])
    layers = [_spread_layer(gens, x_scale)]

    series = [SERIES_BEST, SERIES_MEAN, SERIES_SPREAD]
    if candidates is not None and not candidates.empty:
        layers.append(_candidate_layer(candidates, x_scale))
        series.append(SERIES_CANDIDATE)
    layers.append(_fitness_line_layer(gens, x_scale))

    failed = int(gens["failed"].fillna(0).sum())
    subtitle = f"{len(gens)} generation(s), {int(gens['candidates'].fillna(0).sum())} candidates"
    if failed:
        subtitle += f", {failed} failed and not drawn (no fitness)"
    color_scale = alt.Scale(domain=series, range=[SERIES_COLORS[name] for name in series])
    fitness = (
        alt.layer(*layers)
        .encode(color=alt.Color("series:N", scale=color_scale, legend=alt.Legend(title=None, orient="right")))
        .properties(
            width=560,
            height=300,
            title=alt.TitleParams("Fitness per generation", subtitle=subtitle, anchor="start"),
        )
    )

    if candidates is None:
        return fitness

    metric_names = list(metrics) if metrics is not None else metric_columns(candidates)
    if len(metric_names) < 2:
        return fitness
    panels = _best_metric_panels(gens, candidates, metric_names, x_scale)
    if panels is None:
        return fitness
    return alt.vconcat(fitness, panels).resolve_scale(color="independent")


def _spread_layer(gens: pd.DataFrame, x_scale: alt.Scale) -> alt.Chart:
    band = gens[["generation", "mean_fitness", "std_fitness"]].copy()
    band["lower"] = band["mean_fitness"] - band["std_fitness"]
    band["upper"] = band["mean_fitness"] + band["std_fitness"]
    band["series"] = SERIES_SPREAD
    band = band.dropna(subset=["lower", "upper"])

    # An area needs two x positions, so a single generation gets a thick vertical bar instead.
    mark = alt.Chart(band).mark_area(opacity=0.45) if len(gens) > 1 else alt.Chart(band).mark_rule(
        strokeWidth=14, opacity=0.6
    )
    return mark.encode(
        x=alt.X("generation:Q", scale=x_scale, axis=_generation_axis()),
        y=alt.Y("lower:Q", title=FITNESS_TITLE, scale=alt.Scale(zero=False)),
        y2="upper:Q",
        tooltip=[
            alt.Tooltip("generation:Q", title="generation"),
            alt.Tooltip("lower:Q", title="mean − std", format=".4g"),
            alt.Tooltip("upper:Q", title="mean + std", format=".4g"),
        ],
    )


def _candidate_layer(candidates: pd.DataFrame, x_scale: alt.Scale) -> alt.Chart:
    points = candidates.loc[candidates["fitness"].notna(), ["key", "generation", "method", "fitness"]].copy()
    points["x"] = _jittered_generation(points) if not points.empty else points["generation"]
    points["series"] = SERIES_CANDIDATE
    return (
        alt.Chart(points)
        .mark_circle(size=28, opacity=0.55)
        .encode(
            x=alt.X("x:Q", scale=x_scale, axis=_generation_axis()),
            y=alt.Y("fitness:Q", title=FITNESS_TITLE),
            tooltip=[
                alt.Tooltip("key:N"),
                alt.Tooltip("generation:Q"),
                alt.Tooltip("method:N"),
                alt.Tooltip("fitness:Q", format=".4g"),
            ],
        )
    )


def _fitness_line_layer(gens: pd.DataFrame, x_scale: alt.Scale) -> alt.Chart:
    columns = ["generation", "best_key", "candidates", "failed", "wall_seconds"]
    lines = gens.melt(
        id_vars=columns,
        value_vars=["best_fitness", "mean_fitness"],
        var_name="series",
        value_name="fitness",
    )
    lines["series"] = lines["series"].map({"best_fitness": SERIES_BEST, "mean_fitness": SERIES_MEAN})
    return (
        alt.Chart(lines)
        .mark_line(point=True, strokeWidth=2)
        .encode(
            x=alt.X("generation:Q", scale=x_scale, axis=_generation_axis()),
            y=alt.Y("fitness:Q", title=FITNESS_TITLE),
            tooltip=[
                alt.Tooltip("generation:Q"),
                alt.Tooltip("series:N"),
                alt.Tooltip("fitness:Q", format=".4g"),
                alt.Tooltip("best_key:N", title="best key"),
                alt.Tooltip("candidates:Q"),
                alt.Tooltip("failed:Q"),
                alt.Tooltip("wall_seconds:Q", title="wall time (s)", format=".1f"),
            ],
        )
        .add_params(alt.selection_interval(bind="scales"))
    )


def _best_metric_panels(
    gens: pd.DataFrame, candidates: pd.DataFrame, metric_names: list[str], x_scale: alt.Scale
) -> alt.FacetChart | None:
    """Chart each metric of each generation's fittest candidate, one panel per metric."""
    missing = [name for name in metric_names if name not in candidates.columns]
    if missing:
        raise ReportError(
            f"metrics {missing} are not columns of the candidates frame (it has {list(candidates.columns)}): "
            "pass metric names that the ledger recorded"
        )

    best = gens[["generation", "best_key"]].merge(
        candidates[["key", *metric_names]], left_on="best_key", right_on="key", how="inner"
    )
    values = best.melt(
        id_vars=["generation", "best_key"], value_vars=metric_names, var_name="metric", value_name="value"
    ).dropna(subset=["value"])
    if values.empty:
        logger.debug("no metric values for the best candidates of %d generations; metric panels skipped", len(gens))
        return None

    columns = min(len(metric_names), 3)
    width = max(150, 560 // columns - 40)
    return (
        alt.Chart(values)
        .mark_line(point=True, color=SERIES_COLORS[SERIES_BEST])
        .encode(
            x=alt.X("generation:Q", scale=x_scale, axis=_generation_axis()),
            # An explicit format: a constant series has a zero-width domain, and
            # Vega's default tick format then rounds 0.5417 to "1".
            y=alt.Y("value:Q", title="Metric value", scale=alt.Scale(zero=False), axis=alt.Axis(format=".4~g")),
            tooltip=[
                alt.Tooltip("generation:Q"),
                alt.Tooltip("metric:N"),
                alt.Tooltip("value:Q", format=".4g"),
                alt.Tooltip("best_key:N", title="best key"),
            ],
        )
        .properties(width=width, height=140)
        .facet(
            facet=alt.Facet("metric:N", title=None, sort=metric_names, header=alt.Header(labelFontWeight="bold")),
            columns=columns,
            title=alt.TitleParams("Metrics of each generation's fittest candidate", anchor="start"),
        )
        .resolve_scale(y="independent")
    )


def comparison_chart(comparison: pd.DataFrame) -> alt.TopLevelMixin:
    """Draw the best merge beside each input model on every metric, one panel per metric.

    Each panel has its own y scale because metrics have different units and directions. Bars are grouped
    by model and coloured by split. The best merge comes first and has a black outline.
    """
    _require_columns(comparison, COMPARISON_COLUMNS, "comparison")
    _require_rows(comparison, "comparison")

    frame = comparison[list(COMPARISON_COLUMNS)].copy()
    frame["name"] = frame["name"].astype(str)
    frame["split"] = frame["split"].fillna(MISSING_TEXT).astype(str)
    frame["metric"] = frame["metric"].astype(str)
    names = list(dict.fromkeys(frame["name"]))
    if BEST_MERGE_NAME in names:
        names.remove(BEST_MERGE_NAME)
        names.insert(0, BEST_MERGE_NAME)
    metrics = list(dict.fromkeys(frame["metric"]))
    splits = list(dict.fromkeys(frame["split"]))

    bar_width = 56 if len(splits) > 1 else 36
    width = min(400, max(140, bar_width * len(names)))
    base = alt.Chart().encode(
        x=alt.X("name:N", sort=names, title=None, axis=alt.Axis(labelAngle=-30, labelLimit=150)),
        y=alt.Y("value:Q", title="Value"),
        xOffset=alt.XOffset("split:N", sort=splits),
        color=alt.Color("split:N", title="Split", sort=splits),
        tooltip=[
            alt.Tooltip("name:N", title="model"),
            alt.Tooltip("metric:N"),
            alt.Tooltip("split:N"),
            alt.Tooltip("value:Q", format=".4g"),
        ],
    )
    is_best = alt.datum.name == BEST_MERGE_NAME
    bars = base.mark_bar().encode(
        stroke=alt.condition(is_best, alt.value("black"), alt.value(None)),
        strokeWidth=alt.condition(is_best, alt.value(1.5), alt.value(0)),
    )
    labels = base.mark_text(dy=-5, fontSize=9, color="#333").encode(
        text=alt.Text("value:Q", format=".3g"), color=alt.value("#333")
    )
    return (
        alt.layer(bars, labels, data=frame)
        .properties(width=width, height=220)
        .facet(
            facet=alt.Facet("metric:N", title=None, sort=metrics, header=alt.Header(labelFontWeight="bold")),
            columns=min(len(metrics), 3),
            title=alt.TitleParams("Best merge against the input models", anchor="start"),
        )
        .resolve_scale(y="independent")
    )


def _rank_nodes(candidates: pd.DataFrame) -> pd.DataFrame:
    """Rank candidates within their generation by fitness, 1 = fittest, failed ones last."""
    nodes = candidates.sort_values(["generation", "fitness", "key"], ascending=[True, False, True], na_position="last")
    nodes = nodes.reset_index(drop=True)
    nodes["rank"] = nodes.groupby("generation").cumcount() + 1
    nodes["parents_text"] = nodes["parents"].map(_parents_text)
    nodes["error_text"] = nodes["error"].map(lambda error: shorten(error, ERROR_WIDTH))
    return nodes


def _ancestors(key: str, lineage: pd.DataFrame) -> set[str]:
    """Return ``key`` and every key it descends from, following lineage edges from child to parent."""
    parents_of: dict[str, list[str]] = {}
    for parent, child in zip(lineage["parent_key"], lineage["child_key"]):
        parents_of.setdefault(str(child), []).append(str(parent))

    seen = {key}
    pending = [key]
    while pending:
        for parent in parents_of.get(pending.pop(), []):
            if parent not in seen:
                seen.add(parent)
                pending.append(parent)
    return seen


def lineage_chart(candidates: pd.DataFrame, lineage: pd.DataFrame) -> alt.TopLevelMixin:
    """Draw which candidates bred which: generation on x, rank within the generation on y.

    Nodes are coloured by fitness and failed candidates are grey crosses. Lines join each parent to its
    child, and the edges of the fittest candidate's ancestry are drawn thicker and red. Edges whose parent
    or child is not in ``candidates`` (an input model, for example) are not drawn and are counted in the subtitle.
    """
    _require_columns(candidates, CANDIDATE_COLUMNS, "candidates")
    if isinstance(lineage, pd.DataFrame) and lineage.empty:
        lineage = pd.DataFrame({"parent_key": pd.Series(dtype=str), "child_key": pd.Series(dtype=str)})
    _require_columns(lineage, LINEAGE_COLUMNS, "lineage")
    _require_rows(candidates, "candidates")
    _require_one_run(candidates, "candidates")

    nodes = _rank_nodes(candidates)
    nodes["key"] = nodes["key"].astype(str)
    positions = nodes.set_index("key")[["generation", "rank"]]

    edges = lineage[["parent_key", "child_key"]].astype(str)
    edges = edges.join(positions.add_prefix("parent_"), on="parent_key").join(
        positions.add_prefix("child_"), on="child_key"
    )
    undrawn = int(edges[["parent_rank", "child_rank"]].isna().any(axis=1).sum())
    edges = edges.dropna(subset=["parent_rank", "child_rank"])

    built = nodes[nodes["fitness"].notna()]
    subtitle = []
    if not built.empty:
        best_key = str(built.loc[built["fitness"].idxmax(), "key"])
        ancestry = _ancestors(best_key, lineage)
        edges["on_best_path"] = edges["parent_key"].isin(ancestry) & edges["child_key"].isin(ancestry)
        if edges["on_best_path"].any():
            subtitle.append(f"Red edges trace the ancestry of the fittest candidate {shorten(best_key, KEY_WIDTH)}")
    else:
        edges["on_best_path"] = False
    if undrawn:
        subtitle.append(f"{undrawn} edge(s) from parents outside the candidate table are not drawn")

    max_rank = int(nodes["rank"].max())
    generation_count = nodes["generation"].nunique()
    x = alt.X("generation:Q", scale=_generation_scale(nodes["generation"]), axis=_generation_axis())
    y = alt.Y(
        "rank:Q",
        title="Rank in generation (1 = fittest)",
        scale=alt.Scale(domain=[0.5, max_rank + 0.5], reverse=True, nice=False, zero=False),
        axis=alt.Axis(tickMinStep=1, format="d"),
    )
    layers = [
        _edge_layer(edges[~edges["on_best_path"]], x, y, color="#b0b0b0", width=1.0, opacity=0.6),
        _edge_layer(edges[edges["on_best_path"]], x, y, color=PATH_EDGE_COLOR, width=1.8, opacity=0.8),
        _node_layer(built, x, y),
    ]
    failed = nodes[nodes["fitness"].isna()]
    if not failed.empty:
        layers.append(_failed_node_layer(failed, x, y))

    return (
        alt.layer(*layers)
        .resolve_scale(color="independent", shape="independent")
        .properties(
            width=min(900, max(320, 70 * generation_count)),
            height=min(600, max(180, 24 * max_rank)),
            title=alt.TitleParams("Lineage: which candidates bred which", subtitle=subtitle, anchor="start"),
        )
    )


def _edge_layer(edges: pd.DataFrame, x: alt.X, y: alt.Y, *, color: str, width: float, opacity: float) -> alt.Chart:
    edges = edges.rename(columns={"parent_generation": "generation", "parent_rank": "rank"})
    return (
        alt.Chart(edges)
        .mark_rule(color=color, strokeWidth=width, opacity=opacity)
        .encode(x=x, y=y, x2="child_generation:Q", y2="child_rank:Q")
    )


def _node_tooltip() -> list[alt.Tooltip]:
    return [
        alt.Tooltip("key:N"),
        alt.Tooltip("method:N"),
        alt.Tooltip("fitness:Q", format=".4g"),
        alt.Tooltip("generation:Q"),
        alt.Tooltip("rank:Q"),
        alt.Tooltip("status:N"),
        alt.Tooltip("parents_text:N", title="parents"),
        alt.Tooltip("error_text:N", title="error"),
    ]


def _node_layer(nodes: pd.DataFrame, x: alt.X, y: alt.Y) -> alt.Chart:
    columns = ["key", "method", "fitness", "generation", "rank", "status", "parents_text", "error_text"]
    return (
        alt.Chart(nodes[columns])
        .mark_circle(size=90, opacity=1.0, stroke="white", strokeWidth=0.8)
        .encode(
            x=x,
            y=y,
            color=alt.Color("fitness:Q", title="Fitness", scale=alt.Scale(scheme="viridis")),
            tooltip=_node_tooltip(),
        )
    )


def _failed_node_layer(nodes: pd.DataFrame, x: alt.X, y: alt.Y) -> alt.Chart:
    columns = ["key", "method", "fitness", "generation", "rank", "status", "parents_text", "error_text"]
    failed = nodes[columns].assign(state="failed (no fitness)")
    return (
        alt.Chart(failed)
        .mark_point(size=70, filled=True, color=FAILED_COLOR)
        .encode(
            x=x,
            y=y,
            shape=alt.Shape(
                "state:N", title=None, scale=alt.Scale(domain=["failed (no fitness)"], range=["cross"])
            ),
            tooltip=_node_tooltip(),
        )
    )


# ---------------------------------------------------------------------------
# PNG export
# ---------------------------------------------------------------------------


def chart_png(chart: alt.TopLevelMixin, scale: float = 2.0) -> bytes:
    """Render ``chart`` to PNG bytes with vl-convert, which needs no browser or network.

    ``scale`` multiplies the chart's pixel size.
    """
    if not isinstance(chart, alt.TopLevelMixin):
        raise ReportError(f"chart is a {type(chart).__name__}, not an Altair chart: pass the result of fitness_chart")
    if not scale > 0:
        raise ReportError(f"PNG scale {scale!r} is not positive: pass a scale such as 1.0 or 2.0")

    spec = chart.to_dict()
    try:
        return vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE_VERSION, scale=scale)
    except ValueError as error:
        raise ReportError(f"vl-convert failed to render the chart to PNG: {error}") from error


def save_png(chart: alt.TopLevelMixin, path: str | os.PathLike, scale: float = 2.0) -> Path:
    """Write ``chart`` as a PNG file at ``path``, creating its folder, and return the path."""
    png = chart_png(chart, scale)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
    except OSError as error:
        raise ReportError(f"failed to write PNG {path} ({error}): pass a writable path") from error

    logger.debug("wrote %s (%d bytes)", path, len(png))
    return path


def chart_png_data_uri(chart: alt.TopLevelMixin, scale: float = 1.0) -> str:
    """Render ``chart`` to a ``data:image/png;base64,...`` URI, for markdown that strips inline SVG."""
    encoded = base64.b64encode(chart_png(chart, scale)).decode("ascii")
    return f"data:image/png;base64,{encoded}"


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def _markdown_cell(value: Any) -> str:
    """Escape text for a markdown table cell: HTML special characters, pipes and line breaks."""
    return html.escape(" ".join(str(value).split()), quote=False).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Format a GitHub-style markdown table, escaping every cell."""
    lines = [
        "| " + " | ".join(_markdown_cell(cell) for cell in header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in row) + " |")
    return "\n".join(lines)


def candidate_rows(candidates: pd.DataFrame, metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Return the header and rows of a candidate score table, fittest first and failed candidates last.

    Numbers have four significant digits, keys are cut to 10 characters and errors to 60.
    """
    header = ["Rank", "Generation", "Key", "Method", "Status", "Fitness", *metrics, "Parents", "Error"]
    rows = []
    for _, row in _rank_nodes(candidates).iterrows():
        rows.append(
            [
                str(row["rank"]),
                str(row["generation"]),
                shorten(row["key"], KEY_WIDTH),
                str(row["method"]),
                str(row["status"]),
                format_number(row["fitness"]),
                *(format_number(row[metric]) for metric in metrics),
                row["parents_text"],
                row["error_text"],
            ]
        )
    return header, rows


def generation_markdown(
    run_id: str,
    generation: int,
    generations: pd.DataFrame,
    candidates: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
) -> str:
    """Build the markdown summary of one generation: a heading, the fitness chart so far, and its candidates.

    The chart covers generations up to ``generation`` and is embedded as a PNG data URI. The table lists
    this generation's candidates, fittest first.
    """
    _require_columns(generations, GENERATION_COLUMNS, "generations")
    _require_columns(candidates, CANDIDATE_COLUMNS, "candidates")
    gens = generations[(generations["run_id"] == run_id) & (generations["generation"] <= generation)]
    cands = candidates[(candidates["run_id"] == run_id) & (candidates["generation"] <= generation)]
    current = gens[gens["generation"] == generation]
    if current.empty:
        raise ReportError(
            f"generation {generation} of run {run_id!r} is not in the generations frame "
            f"(it has {sorted(generations['generation'].unique().tolist())}): record the generation first"
        )

    summary = current.iloc[0]
    metric_names = list(metrics) if metrics is not None else metric_columns(candidates)
    lines = [
        f"## Run `{_markdown_cell(run_id)}`: generation {generation}",
        "",
        f"Best fitness **{format_number(summary['best_fitness'])}** "
        f"(`{_markdown_cell(shorten(summary['best_key'], KEY_WIDTH))}`), "
        f"mean {format_number(summary['mean_fitness'])} ± {format_number(summary['std_fitness'])}, "
        f"{format_number(summary['candidates'])} candidates, {format_number(summary['failed'])} failed, "
        f"{format_number(summary['wall_seconds'])} s.",
        "",
        f"![Fitness per generation]({chart_png_data_uri(fitness_chart(gens, cands, metrics=metric_names))})",
        "",
    ]

    this_generation = cands[cands["generation"] == generation]
    if this_generation.empty:
        lines.append("No candidates were recorded for this generation.")
    else:
        header, rows = candidate_rows(this_generation, metric_names)
        lines.append(markdown_table(header[:1] + header[2:], [row[:1] + row[2:] for row in rows]))
    return "\n".join(lines) + "\n"


def heldout_gap_table(heldout: pd.DataFrame) -> pd.DataFrame:
    """Return held-out results as name, metric, search, heldout and gap (heldout − search) columns.

    ``heldout`` is either already wide (metric, search and heldout columns, name optional) or long like the
    comparison frame (name, metric, value, split with splits "search" and "heldout").
    """
    if not isinstance(heldout, pd.DataFrame):
        raise ReportError(f"heldout is a {type(heldout).__name__}, not a pandas DataFrame: pass a DataFrame")

    if {"metric", "search", "heldout"} <= set(heldout.columns):
        table = heldout.copy()
        if "name" not in table.columns:
            table.insert(0, "name", BEST_MERGE_NAME)
    elif set(COMPARISON_COLUMNS) <= set(heldout.columns):
        table = heldout.pivot_table(index=["name", "metric"], columns="split", values="value", aggfunc="first")
        table = table.reset_index()
        table.columns.name = None
        for split in ("search", "heldout"):
            if split not in table.columns:
                table[split] = float("nan")
    else:
        raise ReportError(
            f"heldout frame has columns {list(heldout.columns)}: give either metric, search and heldout columns "
            f"or name, metric, value and split columns"
        )

    table["gap"] = table["heldout"] - table["search"]
    return table[["name", "metric", "search", "heldout", "gap"]].reset_index(drop=True)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def final_markdown(run_id: str, best: dict, lineage_keys: list[str], heldout: pd.DataFrame) -> str:
    """Build the markdown summary of a finished run: the best candidate, its lineage and held-out results.

    Scalar fields of ``best`` go into a table and nested ones (the recipe, say) into YAML blocks.
    ``lineage_keys`` lists the best candidate's ancestry oldest first, ending with the best key.
    """
    if not isinstance(best, dict):
        raise ReportError(f"best is a {type(best).__name__}, not a dict: pass the best candidate's fields as a dict")

    lines = [f"# Run `{_markdown_cell(run_id)}`: final result", ""]
    scalars = [(name, value) for name, value in best.items() if _scalar(value)]
    nested = [(name, value) for name, value in best.items() if not _scalar(value)]
    if scalars:
        rows = [(name, format_number(value) if isinstance(value, float) else value) for name, value in scalars]
        lines += ["## Best candidate", "", markdown_table(["Field", "Value"], rows), ""]
    for name, value in nested:
        text = yaml.safe_dump(to_plain(value), sort_keys=False).rstrip()
        lines += [f"### {_markdown_cell(name)}", "", "```yaml", text, "```", ""]

    lines += ["## Lineage", ""]
    if lineage_keys:
        lines += [" → ".join(f"`{_markdown_cell(shorten(key, KEY_WIDTH))}`" for key in lineage_keys), ""]
    else:
        lines += ["No lineage was recorded.", ""]

    table = heldout_gap_table(heldout)
    lines += ["## Held-out evaluation", ""]
    if table.empty:
        lines.append("No held-out results were recorded.")
    else:
        rows = [
            [row.name, row.metric, format_number(row.search), format_number(row.heldout), format_number(row.gap)]
            for row in table.itertuples(index=False)
        ]
        header = ["Model", "Metric", "Search", "Held-out", "Gap (held-out − search)"]
        lines.append(markdown_table(header, rows))
    return "\n".join(lines) + "\n"


def to_plain(value: Any) -> Any:
    """Convert numpy scalars, tuples and paths inside ``value`` to plain Python types for YAML."""
    if isinstance(value, dict):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
