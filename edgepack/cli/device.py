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
@click.argument("bundle", type=click.Path(exists=True))
@json_opt
def prepare_cmd(bundle, as_json):
    """Build the TensorRT engine of BUNDLE here (Jetson targets), or check its runtime imports (others). BUNDLE is a
    bundle directory or a bundle .tar (unpacked, verified, into a directory beside it named after it)."""
    from edgepack.deploy.bundle import open_bundle
    from edgepack.deploy.device import prepare_bundle

    bundle = Path(bundle)
    if bundle.is_file():  # the engine is cached inside the bundle, so the .tar is unpacked where it stays
        dest = bundle.with_name(bundle.name.removesuffix(".tar") + ".bundle")
        bundle = open_bundle(dest / "bundle" if (dest / "bundle").is_dir() else bundle, dest)
        if not as_json:
            click.echo(f"unpacked to {bundle}", err=True)
    rep = prepare_bundle(bundle)
    if as_json:
        emit_json(rep)
        return
    print_table(f"device prepare {rep['bundle_id']}", ["step", "result", "detail"], rep["steps"])
