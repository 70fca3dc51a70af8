"""The README and docs/: short, every measured figure rendered from a committed results file, every link resolving."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from tiny import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import report  # noqa: E402

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
# A duration or a rate: what a benchmark measures. Settings (steps, records, ranks) and hardware sizes are not figures.
FENCE = re.compile(r"^```.*?^```", re.S | re.M)  # code blocks; "`` ``` ``" inside a line is not one
MEASURED = re.compile(r"\d(?:[\d.,]*\d)?\s?(?:s|ms|min|minutes|tokens/s|[GT]FLOP/s)(?![\w/])|\d\.\d+×")


def prose(text: str) -> str:
    """text without code blocks, inline code and generated blocks (checked against report.py on their own)."""
    text = report.BLOCK.sub("", FENCE.sub("", text))
    return re.sub(r"`[^`\n]*`", "", text)


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines: move the detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_generated_blocks_are_what_report_renders(page):
    text = page.read_text()
    assert report.with_blocks(text) == text, f"{page.name}'s figures are stale: run python benchmarks/report.py"


def test_the_readme_and_the_real_run_quote_generated_figures():
    """The blocks exist where the figures are quoted, so deleting the markers does not dodge the check above."""
    assert "<!-- figures:headline -->" in README.read_text()
    assert "<!-- figures:real-run -->" in (REPO / "docs" / "evaluation.md").read_text()


def test_a_changed_result_shows_in_the_rendered_page(tmp_path, monkeypatch):
    """A result committed without rerunning report.py fails the test above: the rendering follows the file."""
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results)
    data = json.loads((results / "cpu-2core.json").read_text())
    data["data_prep"]["project_s"] = 9.4
    (results / "cpu-2core.json").write_text(json.dumps(data))
    monkeypatch.setattr(report, "RESULTS", results)
    committed = (REPO / "docs" / "performance.md").read_text()
    page = report.with_blocks(committed)
    assert "| 9.4 s |" in page and page != committed
    assert "in 9.4 s against" in report.with_blocks(README.read_text())


def test_every_results_file_and_block_is_rendered():
    page = "".join(p.read_text() for p in PAGES)
    for name in report.BLOCKS:
        assert f"<!-- figures:{name} -->" in page, f"no page shows the {name} figures"
    for result in sorted(report.RESULTS.glob("*.json")):
        assert f"(../benchmarks/results/{result.name})" in page, f"{result.name} is in no table: extend report.py"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_no_measured_figure_outside_generated_blocks(page):
    """Durations and rates come from results files, through report.py; prose links to the tables instead."""
    figures = MEASURED.findall(prose(page.read_text()))
    assert not figures, f"{page.name} quotes {figures} by hand: render them in benchmarks/report.py"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.*)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    text = FENCE.sub("", page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        assert destination.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and destination.suffix == ".md":
            assert anchor in anchors(destination), f"{page.name} links to {target}: no such heading"
