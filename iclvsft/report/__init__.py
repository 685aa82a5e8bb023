"""The study's report: ICL vs FT per task, from the folders test.py writes.

``summary`` (the numbers: conditions with intervals over seeds and items, baselines, the paired
comparison at the declared cells, rows-to-match) -> ``render`` (report.md) and ``plots`` (PNGs);
:func:`write_report` writes report.md, summary.json and plots/.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..io import atomic_write_text, slug, write_json
from .plots import plot, plot_sizes
from .render import headline, protocol_comparison, render, size_table
from .summary import Comparison, FTResult, build_summary, condition, judge_summaries, task_summary


class WrittenReport(NamedTuple):
    """report.md as written: its path and its headline section (the first model's; a report without
    models, e.g. the ladder's alone, is all headline)."""

    path: Path
    headline: str

    def read_text(self) -> str:
        return self.path.read_text()


def write_report(out_dir: Path, summaries: list[dict], extra_sections: list[str] = ()) -> WrittenReport:
    """report.md (one part per model), summary.json and plots/ under ``out_dir``. Every verdict of the
    report is judged here, as one family (Holm over all models and tasks)."""
    judge_summaries(summaries)
    parts = []
    for summary in summaries:
        sub = "plots" if len(summaries) == 1 else f"plots/{slug(summary['model'])}"
        plots = plot(summary, out_dir / sub)
        parts.append(render(summary, {t: [str(Path(sub) / Path(p).name) for p in ps] for t, ps in plots.items()},
                            protocol_comparison(summary)))
    sizes = size_table(summaries)
    if sizes:
        path = plot_sizes(summaries, out_dir / "plots")
        sizes += [f"![accuracy vs model size](plots/{Path(path).name})", ""]
    write_json(out_dir / "summary.json", {"models": summaries})
    report = out_dir / "report.md"
    text = "\n".join(parts + sizes) + "".join(f"{s}\n" for s in extra_sections)
    atomic_write_text(report, text)
    return WrittenReport(report, "\n".join(headline(summaries[0])) if summaries else text)


__all__ = ["Comparison", "FTResult", "WrittenReport", "build_summary", "condition", "judge_summaries", "plot", "render",
           "task_summary", "write_report"]
