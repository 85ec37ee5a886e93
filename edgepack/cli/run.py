"""`edgepack run RECIPE` and `edgepack demo` (the packaged recipe on the embedded model)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from edgepack.cli.common import headline, json_opt
from edgepack.output import emit_json, print_table


# --------------------------------------------------------------------------------------------------------- run
@click.command("run")
@click.argument("recipe", type=click.Path())
@click.option("--dry-run", is_flag=True, help="Print the resolved plan and exit.")
@click.option("--workdir", type=click.Path(), help="Where stage outputs go [default: the recipe's, or ./edgepack-runs/NAME].")
@json_opt
def run_cmd(recipe, dry_run, workdir, as_json):
    """Run RECIPE.toml: the model folded through its stages. Resumes after a crash; a re-run does no work."""
    from edgepack.plan import load_recipe

    r = load_recipe(recipe, workdir=Path(workdir) if workdir else None)
    _run_and_report(r, dry_run, as_json)


def _run_and_report(r, dry_run: bool, as_json: bool):
    import sys

    from edgepack.plan import run_recipe

    def live(res):
        if not as_json:
            took = f"ran in {res.seconds:.1f} s earlier" if res.status == "cached" else f"in {res.seconds:.1f} s"
            print(f"  [{res.status}] stage {res.index} {res.kind}" + (f" ({res.target})" if res.target else "")
                  + f" {took} -> {res.path}", file=sys.stderr, flush=True)

    if not as_json:
        print(f"recipe {r.name}: model {r.model}, targets {', '.join(t.name for t in r.targets)}, workdir {r.workdir}",
              file=sys.stderr)
    results = run_recipe(r, dry_run=dry_run, on_step=live)
    if as_json:
        emit_json({"recipe": r.name, "dry_run": dry_run, "workdir": str(r.workdir),
                   "steps": [vars(x) for x in results]})
        return results
    cols = ["#", "stage", "target", "status", "seconds", "metrics" if not dry_run else "config", "output"]
    rows = [[str(x.index), x.kind, x.target or "(shared)", x.status, f"{x.seconds:.1f}",
             (x.metrics.get("skipped", "") if x.status == "skipped" else headline(x.metrics) if not dry_run
              else ", ".join(f"{k}={v}" for k, v in x.metrics.items()) or "defaults"),
             Path(x.path).name] for x in results]
    print_table(f"recipe {r.name}" + (" (dry run: nothing executed)" if dry_run else ""), cols, rows)
    return results


# -------------------------------------------------------------------------------------------------------- demo
@click.command("demo")
@click.option("--workdir", type=click.Path(), default="edgepack-runs/demo", show_default=True)
@json_opt
def demo_cmd(workdir, as_json):
    """The main job on an embedded default, offline: the packaged demo recipe (fine-tune, prune, distill, then per
    target quantize, compile, bench, bundle) on the embedded stories260K model, a report, and text from the CPU
    bundle."""
    from edgepack.plan import load_recipe
    from edgepack.sources import embedded_path

    recipe = embedded_path("demo.toml")
    r = load_recipe(recipe, workdir=Path(workdir))
    if not as_json:
        click.echo(
            "edgepack demo: offline, on the embedded default model 'stories260K' -- Karpathy's real pretrained\n"
            "260K-parameter Llama (5 layers, hidden 64, vocab 512) trained on TinyStories, shipped inside the package\n"
            "(MIT). It is tiny so that the whole chain runs in about a minute on a CPU; point 'edgepack run' at a recipe\n"
            "with your own checkpoint for real work (examples/). Recipe: " + str(recipe))
    results = _run_and_report(r, False, as_json)
    import json

    from edgepack.bench.recipe_report import summary_rows, write_report

    cpu = next((t.name for t in r.targets if t.device_type == "cpu"), None)
    bundle = next((Path(x.path) / "bundle" for x in results if x.kind == "bundle" and x.target == cpu), None)
    # a re-run whose every stage was cached does no work: the reports and the sample text of the first run stand
    sample_file = r.workdir / "demo-sample.json"
    sample = json.loads(sample_file.read_text()) if sample_file.is_file() else {}
    unchanged = (all(x.status in ("cached", "skipped") for x in results) and sample.get("bundle") == str(bundle)
                 and all(Path(p).is_file() for p in sample.get("reports", [])) and sample.get("reports"))
    if unchanged:
        reports = [[p for p in sample["reports"] if Path(p).name.startswith(name)] for name in ("report.html", "report.md")]
    else:
        reports = [write_report(r.workdir, r.workdir / name)["written"] for name in ("report.html", "report.md")]
    if as_json:
        emit_json({"recipe": r.name, "workdir": str(r.workdir), "steps": [vars(x) for x in results],
                   "reports": [p for w in reports for p in w], "cpu_bundle": str(bundle) if bundle else None})
        return
    from edgepack.bench.recipe_report import build_report

    print_table("per target: bundle, fit, quality, speed", *summary_rows(build_report(r.workdir)),
                caption="speed: measured where this machine is the target, else PREDICTED (roofline upper bound)")
    click.echo("report: " + ", ".join(p for w in reports for p in w) + (" (unchanged: every stage was cached)"
                                                                            if unchanged else ""))
    if bundle is not None:
        prompt = "Once upon a time"
        click.echo(f"\nThe {cpu} bundle ({bundle}) generates (greedy, 64 tokens; its speed is the bench figure above)"
                   + (", as it did in the first run:" if unchanged else ":"))
        if unchanged:
            click.echo(prompt + sample["text"])
        else:
            import tempfile

            from edgepack.cli.deploy import run_generate

            with tempfile.TemporaryDirectory() as tmp:
                text = run_generate(str(bundle), prompt, None, None, False, False, False, {"max_new_tokens": 64}, tmp,
                                 show_speed=False)
            sample_file.write_text(json.dumps({"bundle": str(bundle), "text": text,
                                               "reports": [p for w in reports for p in w]}, indent=1) + "\n")
    # the Makefile's demo target says so (MAKELEVEL alone would also name make under `make test`)
    rerun = os.environ.get("EDGEPACK_INVOKED_AS") or "edgepack demo"
    click.echo(f"\nNext: open {reports[0][0]}; 'edgepack push {bundle} HOST' ships a bundle; a re-run of "
               f"'{rerun}' does no work.")
