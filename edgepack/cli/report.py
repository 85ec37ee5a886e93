"""`edgepack report RUN_DIR`: the report of a recipe run (edgepack.bench.recipe_report)."""

from __future__ import annotations

import click

from edgepack.cli.common import json_opt
from edgepack.output import emit_json


@click.command("report")
@click.argument("run_dir", type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="report.html (self-contained) or report.md (+ PNG files).")
@click.option("--no-plots", is_flag=True, help="Tables only (no matplotlib needed).")
@json_opt
def report_cmd(run_dir, output, no_plots, as_json):
    """Report on a recipe run: per target the bundle, size, fit verdict, perplexity after each stage, measured or
    predicted speed. Reads run.json and the manifests only."""
    from edgepack.bench.recipe_report import build_report, summary_rows, write_report
    from edgepack.output import print_table

    if output:
        res = write_report(run_dir, output, plots=not no_plots)
        rep = res["report"]
    else:
        rep, res = build_report(run_dir), {"written": []}
    if as_json:
        emit_json({**rep, "written": res["written"]})
        return
    print_table(f"report: {rep['run']['name']} ({rep['run']['run_dir']})", *summary_rows(rep),
                caption="speed: measured where the bench ran on the target's hardware, else PREDICTED (roofline)")
    for p in res["written"]:
        click.echo(f"wrote {p}")
