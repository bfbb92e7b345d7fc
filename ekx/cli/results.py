"""The results side: `ekx compare` - the comparison table of runs, sweeps and searches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ekx import tables
from ekx.cli.common import TrackOpt, command, console, say


@command()
def compare(
    runs_: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN",
            help="Run directories or sweep directories (a glob such as runs/* is fine: files are skipped).",
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Write OUT.md and OUT.csv (default: comparison.* beside the first run).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write validation curves and the gap chart to this PNG.")] = None,
    track: TrackOpt = None,
):
    """The model-comparison table - parameters, train and validation action top-1 and their gap
    (overfitting), verb/noun/action top-1/5, state - sorted by validation action top-1;
    Markdown and CSV.

    Example: ekx compare runs/phase2 --plot phase2.png
    """
    from ekx.heads import compare as cmp
    from ekx.track.compare import require, send

    require(track or "none")  # a tracker asked for and not installed: before any work
    skipped: list[Path] = []
    rows = cmp.collect(runs_, skipped)
    if skipped:  # a glob's files (runs/comparison.csv, written by the last compare): not runs
        say(f"skipped (no run in them): {', '.join(map(str, skipped))}")
    title = "model comparison (best epoch by val action top-1)"
    tables.show(console, [c for c, _ in cmp.COLUMNS], cmp.table_rows(rows), title=title)
    first = Path(runs_[0])
    base = out or (first if first.is_dir() and not cmp.is_run(first) else first.parent) / "comparison"
    base.with_suffix(".md").write_text(cmp.markdown(rows))
    base.with_suffix(".csv").write_text(cmp.to_csv(rows))
    console.print(f"-> {base.with_suffix('.md')}, {base.with_suffix('.csv')}")
    if track:  # the table as a tracked run too (ekx.track.compare)
        group = Path(runs_[0]) if len(runs_) == 1 and not (Path(runs_[0]) / "metrics.jsonl").is_file() else None
        for said in send(track, base, cmp.markdown(rows), cmp.to_csv(rows), Path(runs_[0]).parent.parent, group):
            console.print(f"-> {said}", highlight=False)
    trained = [r for r in rows if "val_action_top1" in r]  # an empty run has no figures
    if plot and trained:
        console.print(f"-> {cmp.plot(trained, plot)}")
    if not trained:
        console.print("no run has finished an epoch yet: nothing to rank", highlight=False)
        return
    top = trained[0]
    report = cmp.search_report(Path(runs_[0])) if len(runs_) == 1 and Path(runs_[0]).is_dir() else None
    if report and "best" in report:
        _search_summary(report, runs_[0])
        top = next((r for r in rows if r["run"] == report["best"]["run"]), top)
        console.print(
            f"best trial: [bold]{top['run']}[/bold] ({report['objective']} {report['best']['value']:.2f}); ", end=""
        )
    else:
        console.print(f"best: [bold]{top['run']}[/bold] (val action top-1 {top['val_action_top1']:.1f}); ", end="")
    console.print("reproduce with:")
    console.print(f"  {cmp.reproduce_command(top)}", soft_wrap=True, highlight=False)  # never wrapped: copy-pasteable


def _search_summary(report: dict, sweep_dir: Path) -> None:
    console.print(f"search: {report['complete']} complete and {report['pruned']} pruned trials", highlight=False)
    if "importance" in report:
        header = ["parameter", f"importance for {report['objective']} (PED-ANOVA)"]
        tables.show(console, header, [[k, f"{v:.3f}"] for k, v in report["importance"].items()])
        console.print(f"-> {Path(sweep_dir) / 'importance.json'}", highlight=False)
    else:
        console.print(f"no parameter importance: {report.get('importance_error', 'too few trials')}", highlight=False)
    if report.get("plot"):
        console.print(f"-> {report['plot']} (objective against each parameter)", highlight=False)
