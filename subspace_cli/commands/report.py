"""``subspace report``: tables and plots of project-train runs and spectra files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from subspace_cli.commands.common import examples, for_each_input, output_options

FORMATS = ("table", "markdown", "csv", "json")


@click.command(
    "report",
    epilog=examples("""
  subspace report runs/none runs/dom runs/bulk -o report/
  subspace report runs/ --format markdown        # every run directory below runs/
  subspace report spectra.h5 -o report/ --plot-format png
  subspace report runs/* --format csv > runs.csv
"""),
)
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the plots, summary.csv, summary.json and report.md (created if absent; "
    "only files of those names are replaced). Without it, only the table is printed.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Format of the summary printed on stdout (--json is --format json).",
)
@click.option(
    "--plot-format",
    "plot_formats",
    type=click.Choice(["png", "svg"]),
    multiple=True,
    help="Image formats of the plots (repeatable) [default: png and svg].",
)
@output_options
@click.pass_context
def report_command(ctx: click.Context, inputs: tuple[str, ...], out_dir: Path | None, fmt: str,
                   plot_formats: tuple[str, ...], as_json: bool) -> None:
    """Summarise project-train runs and spectra files in tables and plots.

    INPUTS are run directories (or their run.h5), spectra files, directories
    holding either (searched recursively) and glob patterns. Runs that start
    from the same checkpoint form a group, compared with that group's
    unprojected (--mode none) run. With -o, the plots are written as PNG and
    SVG: training loss (log scale), χ_k, the top eigenvalues with 2/η, η_dom and
    η_bulk against step, and each spectra file's eigenvalues and alignment
    against batch size. A plot whose quantities no input has is skipped with a
    note. Reading a run that is still training is safe.
    """
    from subspace_cli import report
    from subspace_cli.errors import UsageError
    from subspace_cli.output import emit_json, json_text, say

    if as_json:
        fmt = "json"
    if out_dir is not None:
        from subspace_cli.writable import check_writable

        check_writable(out_dir, directory=True)  # before any input is read

    runs: list[report.Run] = []
    entries: list[report.SpectraEntry] = []

    def load(path: Path) -> None:
        if path.is_dir():
            runs.append(report.load_run(path))
        else:
            entries.extend(report.load_spectra(path))

    outcome = for_each_input(ctx, inputs, load, noun="input", expand=report.expand)
    if not runs and not entries:
        outcome.exit(ctx)
        raise UsageError("nothing to report")

    notes: list[str] = [note for run in runs for note in run.notes]
    report.assign_labels(runs)
    groups = report.group_runs(runs)
    summaries = {run.path: report.summarize(run) for run in runs}
    report.compare_within_groups(groups, summaries)
    spectra = [report.summarize_spectra(e) for e in entries]
    ordered = [summaries[run.path] for group in groups for run in group]

    plots: list[Path] = []
    if out_dir is not None:
        with report.staged_directory(out_dir) as stage:  # all files, or none of them
            staged = report.write_plots(stage, groups, entries,
                                        plot_formats or report.PLOT_FORMATS, notes.append)
            plots = [out_dir / p.relative_to(stage) for p in staged]
            payload = _payload(ordered, spectra, plots, notes)
            report.write_text(stage / "summary.csv",
                              report.render_tables("csv", groups, summaries, spectra))
            report.write_text(stage / "summary.json", json_text(payload) + "\n")
            report.write_text(stage / "report.md", report.markdown_report(
                report.render_tables("markdown", groups, summaries, spectra), staged, stage,
                notes))
    payload = _payload(ordered, spectra, plots, notes)
    if out_dir is None:
        say("no plots written: give -o DIR for the plots, summary.csv, summary.json and report.md")

    for text in notes:
        say(f"note: {text}")
    if fmt == "json":
        emit_json(payload)
    else:
        click.echo(report.render_tables(fmt, groups, summaries, spectra), nl=False)
    outcome.exit(ctx)


def _payload(runs: list[dict[str, Any]], spectra: list[dict[str, Any]], plots: list[Path],
             notes: list[str]) -> dict[str, Any]:
    return {"runs": runs, "spectra": spectra, "plots": [str(p) for p in plots], "notes": notes}

