"""Tests for the end-of-run HTML report and its PNG files."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from evomerge import report
from evomerge.exceptions import ReportError
# pytest's default prepend import mode puts tests/ on sys.path, so the sibling module imports by name.
from test_charts import (
    K1A,
    PNG_SIGNATURE,
    make_candidates,
    make_comparison,
    make_generations,
    make_lineage,
    png_size,
)

CHROMIUM = Path("/usr/bin/chromium")
RUN_ID = "r1 <script>alert(1)</script>"
RECIPE = {"merge_method": "ties", "weights": [0.25, 0.75], "note": "a < b & c"}
MERGEKIT_CONFIG = {
    "merge_method": "ties",
    "base_model": "org/base",
    "models": [{"model": "org/math-ft", "parameters": {"weight": 0.25, "density": 0.5}}],
}


def write(output_dir: Path, **overrides) -> dict[str, Path]:
    arguments = dict(
        run_id=RUN_ID,
        generations=make_generations(),
        candidates=make_candidates(),
        lineage=make_lineage(),
        comparison=make_comparison(),
        best_recipe=RECIPE,
        mergekit_config=MERGEKIT_CONFIG,
        settings={"population": 3, "generations": 2, "seed": 7},
        timings={"search": 22.0, "heldout evaluation": 3.25},
        heldout=make_comparison(),
    )
    arguments.update(overrides)
    return report.write_report(output_dir, **arguments)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    return write(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def page(written) -> str:
    return written["report"].read_text(encoding="utf-8")


def embedded_specs(page: str) -> dict[str, dict]:
    """Return the Vega-Lite specs embedded in the page, by target element id."""
    pattern = r'<script type="application/json" id="([\w-]+)-spec"[^>]*>(.*?)</script>'
    return {target: json.loads(text.replace("<\\/", "</")) for target, text in re.findall(pattern, page, re.S)}


def test_report_writes_all_files(written):
    assert sorted(written) == ["benchmark_comparison", "fitness_plot", "lineage", "report"]
    assert written["report"].name == "benchmark_report.html"
    assert written["fitness_plot"].name == "fitness_plot.png"


def test_report_pngs_are_valid(written):
    for key in ("fitness_plot", "benchmark_comparison", "lineage"):
        data = written[key].read_bytes()
        assert data.startswith(PNG_SIGNATURE), key
        assert png_size(data)[0] > 300, key


def test_report_has_no_remote_scripts(page):
    assert re.search(r"<script[^>]*\bsrc=", page) is None
    assert re.search(r"<link[^>]*https?://", page) is None


def test_report_inlines_vega_embed(page):
    assert "vegaEmbed" in page
    assert len(page) > 500_000


def test_report_embeds_three_specs(page):
    specs = embedded_specs(page)

    assert sorted(specs) == ["comparison-chart", "fitness-chart", "lineage-chart"]
    assert specs["fitness-chart"]["$schema"].startswith("https://vega.github.io/schema/vega-lite/")
    assert specs["lineage-chart"]["title"]["text"] == "Lineage: which candidates bred which"


def test_report_spec_has_run_data(page):
    spec = embedded_specs(page)["fitness-chart"]
    keys = {row.get("best_key") for rows in spec["datasets"].values() for row in rows}

    assert K1A in keys


def test_report_escapes_run_id(page):
    assert "<script>alert(1)</script>" not in page
    assert "r1 &lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_report_recipe_yaml(page):
    assert "merge_method: ties" in page
    assert "note: a &lt; b &amp; c" in page
    assert "base_model: org/base" in page


def test_report_heldout_gap(page):
    assert "<td>best merge</td><td>perplexity</td><td class=\"num\">9.9</td><td class=\"num\">10.9</td>" in page
    assert "Gap (held-out − search)" in page


def test_report_score_table_rows(page):
    assert '<tr class="failed">' in page
    assert "<td>aaaa00001…</td><td>linear</td><td>built</td><td class=\"num\">0.5</td>" in page


def test_report_settings_and_timings(page):
    assert "population: 3" in page
    assert "<td>heldout evaluation</td><td class=\"num\">3.25</td>" in page


def test_report_without_comparison(tmp_path):
    written = write(tmp_path, comparison=make_comparison().iloc[:0])
    page = written["report"].read_text(encoding="utf-8")

    assert "benchmark_comparison" not in written
    assert not (tmp_path / "benchmark_comparison.png").exists()
    assert "No benchmark comparison was recorded." in page


def test_report_rejects_non_frame(tmp_path):
    with pytest.raises(ReportError, match="lineage is a list"):
        write(tmp_path, lineage=[])


def test_report_rejects_non_dict_settings(tmp_path):
    with pytest.raises(ReportError, match="settings is a str"):
        write(tmp_path, settings="population=3")


def chromium(*arguments: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with networking features off and a throwaway profile."""
    with tempfile.TemporaryDirectory() as profile:
        command = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *arguments,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed at /usr/bin/chromium")
def test_report_renders_in_chromium(written):
    url = written["report"].resolve().as_uri()
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", url).stdout

    # vega-embed replaces each empty chart <div> with an <svg class="marks"> once the chart renders.
    assert dom.count('class="marks"') == 3
    assert "data-render-error=" not in dom


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed at /usr/bin/chromium")
def test_report_screenshot_not_blank(written, tmp_path):
    screenshot = tmp_path / "report.png"
    chromium("--virtual-time-budget=5000", f"--screenshot={screenshot}", "--window-size=1200,1600",
             written["report"].resolve().as_uri())
    data = screenshot.read_bytes()

    # A blank white 1200x1600 page compresses to a few KiB, while rendered charts and tables take far more.
    assert data.startswith(PNG_SIGNATURE)
    assert png_size(data) == (1200, 1600)
    assert len(data) > 100_000
