"""`edgepack device prepare BUNDLE`: run on the device itself (edgepack.deploy.device does the work)."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.common import json_opt
from edgepack.output import emit_json, print_table


@click.group("device")
def device_group():
    """Commands that run on the device itself: prepare (engine build, import checks)."""


@device_group.command("prepare")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@json_opt
def prepare_cmd(bundle, as_json):
    """Build the TensorRT engine of BUNDLE here (Jetson targets), or check its runtime imports (others)."""
    from edgepack.deploy.device import prepare_bundle

    rep = prepare_bundle(Path(bundle))
    if as_json:
        emit_json(rep)
        return
    print_table(f"device prepare {rep['bundle_id']}", ["step", "result", "detail"], rep["steps"])
