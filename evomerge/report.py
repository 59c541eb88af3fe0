"""The end-of-run report: chart PNGs and one self-contained HTML page.

The page inlines the Vega, Vega-Lite and Vega-Embed JavaScript from ``vl_convert.javascript_bundle``, so it
renders its interactive charts offline, with no CDN. Every piece of run text is HTML-escaped.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import vl_convert
import yaml

from evomerge import charts
from evomerge.exceptions import ReportError

logger = logging.getLogger(__name__)

FITNESS_PNG = "fitness_plot.png"
COMPARISON_PNG = "benchmark_comparison.png"
LINEAGE_PNG = "lineage.png"
REPORT_HTML = "benchmark_report.html"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1300px;
       padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; }
.meta { color: #666; margin-top: 0; }
section { margin: 2rem 0; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { color: #999; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 0.75rem; overflow-x: auto; font-size: 0.85rem; }
.columns { display: flex; gap: 2rem; flex-wrap: wrap; }
.columns > div { flex: 1 1 400px; min-width: 0; }
.chart { margin: 1rem 0; }
"""


def _script_json(value: Any) -> str:
    """Serialise ``value`` as JSON that is safe inside a <script> element."""
    text = json.dumps(value, allow_nan=False, default=str)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def _script_text(text: str) -> str:
    """Escape "</script" in JavaScript so the text cannot close its <script> element early."""
    return text.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")


def _yaml_block(value: Any) -> str:
    text = yaml.safe_dump(charts.to_plain(value), sort_keys=False, allow_unicode=True).rstrip()
    return f"<pre>{html.escape(text)}</pre>"


def _html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    numeric: Sequence[int] = (),
    row_classes: Sequence[str] | None = None,
) -> str:
    """Build an HTML table, escaping every cell. Columns listed in ``numeric`` are right-aligned."""
    header_cells = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    lines = ["<table>", f"<thead><tr>{header_cells}</tr></thead>", "<tbody>"]
    for index, row in enumerate(rows):
        css = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        cells = []
        for column, cell in enumerate(row):
            align = ' class="num"' if column in numeric else ""
            cells.append(f"<td{align}>{html.escape(str(cell))}</td>")
        lines.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _score_table(candidates: pd.DataFrame) -> str:
    if candidates.empty:
        return "<p>No candidates were recorded.</p>"
    metrics = charts.metric_columns(candidates)
    header, rows = charts.candidate_rows(candidates, metrics)
    numeric = [0, 1, 5, *range(6, 6 + len(metrics))]
    row_classes = ["failed" if row[5] == charts.MISSING_TEXT else "" for row in rows]
    return _html_table(header, rows, numeric=numeric, row_classes=row_classes)


def _heldout_section(heldout: pd.DataFrame) -> str:
    table = charts.heldout_gap_table(heldout)
    if table.empty:
        return "<p>No held-out results were recorded.</p>"
    rows = [
        [row.name, row.metric, charts.format_number(row.search), charts.format_number(row.heldout),
         charts.format_number(row.gap)]
        for row in table.itertuples(index=False)
    ]
    note = (
        "<p>The gap is the held-out value minus the search value. A large gap means the recipe was tuned to the "
        "search texts and does not carry over to unseen ones.</p>"
    )
    header = ["Model", "Metric", "Search", "Held-out", "Gap (held-out − search)"]
    return note + _html_table(header, rows, numeric=[2, 3, 4])


def _timings_table(timings: dict) -> str:
    if not timings:
        return "<p>No timings were recorded.</p>"
    rows = []
    for name, value in timings.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append([name, charts.format_number(value)])
        else:
            rows.append([name, json.dumps(charts.to_plain(value), default=str)])
    return _html_table(["Step", "Seconds"], rows, numeric=[1])


def _chart_section(element_id: str, title: str, chart: alt.TopLevelMixin | None, missing: str) -> str:
    if chart is None:
        return f"<section><h2>{html.escape(title)}</h2><p>{html.escape(missing)}</p></section>"
    spec = chart.to_dict()
    return (
        f'<section><h2>{html.escape(title)}</h2>\n<div class="chart" id="{element_id}"></div>\n'
        f'<script type="application/json" id="{element_id}-spec" class="vega-spec" '
        f'data-target="{element_id}">{_script_json(spec)}</script></section>'
    )


EMBED_SCRIPT = """
function markRenderError(target, error) {
  target.setAttribute("data-render-error", String(error));
  target.textContent = "Chart failed to render: " + error;
}
document.querySelectorAll("script.vega-spec").forEach(function (element) {
  var target = document.getElementById(element.dataset.target);
  try {
    var spec = JSON.parse(element.textContent);
    vegaEmbed(target, spec, {renderer: "svg", actions: {export: true, source: false, compiled: false, editor: false}})
      .catch(function (error) { markRenderError(target, error); });
  } catch (error) {
    markRenderError(target, error);
  }
});
"""


def _build_charts(generations, candidates, lineage, comparison) -> dict[str, alt.TopLevelMixin | None]:
    """Build the three report charts, with None in place of a chart whose data is empty."""
    built = {"fitness": charts.fitness_chart(generations, candidates)}
    built["comparison"] = None if comparison.empty else charts.comparison_chart(comparison)
    built["lineage"] = None if candidates.empty else charts.lineage_chart(candidates, lineage)
    return built


def _check_inputs(generations, candidates, lineage, comparison, heldout, mappings: dict[str, Any]) -> None:
    for name, frame in [("generations", generations), ("candidates", candidates), ("lineage", lineage),
                        ("comparison", comparison), ("heldout", heldout)]:
        if not isinstance(frame, pd.DataFrame):
            raise ReportError(f"{name} is a {type(frame).__name__}, not a pandas DataFrame: pass the ledger's frame")
    for name, value in mappings.items():
        if not isinstance(value, dict):
            raise ReportError(f"{name} is a {type(value).__name__}, not a dict: pass a dict (empty if unknown)")


def write_report(
    output_dir: str | os.PathLike,
    *,
    run_id: str,
    generations: pd.DataFrame,
    candidates: pd.DataFrame,
    lineage: pd.DataFrame,
    comparison: pd.DataFrame,
    best_recipe: dict,
    mergekit_config: dict,
    settings: dict,
    timings: dict,
    heldout: pd.DataFrame,
) -> dict[str, Path]:
    """Write the chart PNGs and the self-contained HTML report into ``output_dir``.

    Returns the written paths under the keys "fitness_plot", "benchmark_comparison", "lineage" and "report".
    An empty comparison or candidates frame leaves its PNG out and puts a note in the page instead.
    """
    _check_inputs(
        generations, candidates, lineage, comparison, heldout,
        {"best_recipe": best_recipe, "mergekit_config": mergekit_config, "settings": settings, "timings": timings},
    )
    output = Path(output_dir)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"failed to create report folder {output} ({error}): pass a writable output_dir") from error

    built = _build_charts(generations, candidates, lineage, comparison)
    paths: dict[str, Path] = {}
    for key, file_name in [("fitness", FITNESS_PNG), ("comparison", COMPARISON_PNG), ("lineage", LINEAGE_PNG)]:
        if built[key] is None:
            logger.warning("run %s: no data for %s, so it is not written", run_id, file_name)
            continue
        paths[Path(file_name).stem] = charts.save_png(built[key], output / file_name)

    page = _render_page(
        run_id=run_id,
        built=built,
        generations=generations,
        candidates=candidates,
        best_recipe=best_recipe,
        mergekit_config=mergekit_config,
        settings=settings,
        timings=timings,
        heldout=heldout,
    )
    report_path = output / REPORT_HTML
    try:
        report_path.write_text(page, encoding="utf-8")
    except OSError as error:
        raise ReportError(f"failed to write report {report_path} ({error}): pass a writable output_dir") from error
    paths["report"] = report_path

    logger.info("run %s: wrote report %s (%d bytes)", run_id, report_path, len(page))
    return paths


def _summary(run_id: str, generations: pd.DataFrame) -> str:
    if generations.empty:
        return "<p>No generations were recorded.</p>"
    gens = generations.sort_values("generation")
    best = gens.loc[gens["best_fitness"].idxmax()] if gens["best_fitness"].notna().any() else None
    rows = [
        ["Run", run_id],
        ["Generations", len(gens)],
        ["Candidates", int(gens["candidates"].fillna(0).sum())],
        ["Failed candidates", int(gens["failed"].fillna(0).sum())],
        ["Search wall time (s)", charts.format_number(gens["wall_seconds"].fillna(0).sum())],
    ]
    if best is not None:
        rows += [
            ["Best candidate", best["best_key"]],
            ["Best fitness", charts.format_number(best["best_fitness"])],
            ["Found in generation", int(best["generation"])],
        ]
    return _html_table(["Field", "Value"], rows)


def _render_page(*, run_id, built, generations, candidates, best_recipe, mergekit_config, settings, timings,
                 heldout) -> str:
    """Assemble the report page, inlining the JavaScript bundle so the page needs no network."""
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bundle = vl_convert.javascript_bundle(vl_version=charts.VEGA_LITE_VERSION)
    title = f"EvoMerge report: run {run_id}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        f"<script>{_script_text(bundle)}</script>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">Generated {html.escape(generated)}. Hover over a chart for values; scroll to zoom the '
        "fitness chart.</p>",
        f"<section><h2>Summary</h2>{_summary(run_id, generations)}</section>",
        _chart_section("fitness-chart", "Fitness per generation", built["fitness"], "No generations were recorded."),
        _chart_section("comparison-chart", "Best merge against the input models", built["comparison"],
                       "No benchmark comparison was recorded."),
        _chart_section("lineage-chart", "Lineage", built["lineage"], "No candidates were recorded."),
        '<section><h2>Best recipe</h2><div class="columns">',
        f"<div><h3>Recipe (YAML)</h3>{_yaml_block(best_recipe)}</div>",
        f"<div><h3>mergekit config</h3>{_yaml_block(mergekit_config)}</div>",
        "</div></section>",
        f"<section><h2>Held-out evaluation</h2>{_heldout_section(heldout)}</section>",
        f"<section><h2>Scores of every candidate</h2>{_score_table(candidates)}</section>",
        f"<section><h2>Run settings</h2>{_yaml_block(settings)}</section>",
        f"<section><h2>Timings</h2>{_timings_table(timings)}</section>",
        f"<script>{EMBED_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
