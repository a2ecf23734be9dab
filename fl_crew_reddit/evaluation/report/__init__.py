"""A readable report of one run, from its `results/<run>/history.json`.

    build_report(run_dir) -> ReportPaths   writes report.md, report.html (self-contained) and convergence.png

summary.py computes what the report says (a ReportSummary of the typed RunHistory), render.py writes it as Markdown
and HTML from the same blocks, plot.py draws convergence.png.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fl_crew_reddit.evaluation.report.plot import plot_convergence
from fl_crew_reddit.evaluation.report.render import (
    Block,
    clip_section,
    render_html,
    render_markdown,
    summary_blocks,
    verdict_sentence,
)
from fl_crew_reddit.evaluation.report.summary import ReportSummary, summarize
from fl_crew_reddit.history import HistoryFileError, RunHistory, as_run_history, load_run_history

__all__ = ["ReportError", "ReportPaths", "ReportSummary", "build_report", "clip_blocks", "load_history",
           "markdown_report", "plot_convergence", "render_html", "render_markdown", "report_blocks", "resolve_run_dir",
           "summarize", "verdict"]

HISTORY_FILE = "history.json"


class ReportError(Exception):
    """The run folder or its history cannot be read; the message says which and why."""


@dataclass(frozen=True)
class ReportPaths:
    md: Path
    html: Path
    png: Path


def load_history(run_dir: Path) -> RunHistory:
    """The run's typed history (older files migrated); ReportError names the folder or file and what is wrong."""
    run_dir = Path(run_dir)
    path = run_dir / HISTORY_FILE
    if not run_dir.is_dir():
        raise ReportError(f"no run folder at {run_dir}")
    if not path.is_file():
        raise ReportError(f"{path} is missing: {run_dir} is not a run folder (a run writes results/<run>/{HISTORY_FILE}"
                          " after its first stage)")
    try:
        return load_run_history(path)
    except HistoryFileError as error:
        raise ReportError(str(error)) from None


def resolve_run_dir(run: str | None, results_dir: Path) -> Path:
    """RUN is a folder path, or a run id under `results_dir` (default `latest`); see `runs.resolve_run_dir`."""
    from fl_crew_reddit.runs import resolve_run_dir as find_run_dir

    try:
        return find_run_dir(run, results_dir)
    except FileNotFoundError as error:
        raise ReportError(str(error)) from None


def report_blocks(history: RunHistory | dict, png_name: str | None = "convergence.png") -> list[Block]:
    """The report of `history` (typed, or its history.json form) as blocks for render_markdown / render_html."""
    return summary_blocks(summarize(as_run_history(history)), png_name)


def clip_blocks(history: RunHistory | dict) -> list[Block]:
    """The CLIP score lines alone: image–text alignment per round, or the sentence saying why it is missing."""
    return clip_section(summarize(as_run_history(history)))


def markdown_report(history: RunHistory | dict, png_name: str | None = "convergence.png") -> str:
    return render_markdown(report_blocks(history, png_name))


def verdict(history: RunHistory | dict) -> str:
    """One sentence: did federated training lower held-out perplexity, read at the best round on validation."""
    return verdict_sentence(summarize(as_run_history(history)))


def build_report(run_dir: Path) -> ReportPaths:
    """Read `run_dir/history.json`; write report.md, report.html (PNG embedded) and convergence.png next to it."""
    run_dir = Path(run_dir)
    summary = summarize(load_history(run_dir))
    paths = ReportPaths(md=run_dir / "report.md", html=run_dir / "report.html", png=run_dir / "convergence.png")
    plot_convergence(summary, paths.png)
    blocks = summary_blocks(summary, paths.png.name)
    paths.md.write_text(render_markdown(blocks), encoding="utf-8")
    paths.html.write_text(render_html(blocks, {paths.png.name: paths.png.read_bytes()}), encoding="utf-8")
    return paths
