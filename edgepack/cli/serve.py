"""`edgepack serve`: the OpenAI-compatible server (deploy/serve.py). No torch / fastapi import at module level; the
options that are ServeConfig settings take their defaults from the dataclass."""

from __future__ import annotations

import click

from edgepack.cli.common import config_from, config_option
from edgepack.deploy.serve_engine import ServeConfig

S = ServeConfig


@click.command("serve")
@click.argument("model", type=click.Path(exists=True))
@config_option(S, "host", help="Address to bind. Loopback by default; anything else exposes the model to the network.")
@config_option(S, "port", help="TCP port.")
@config_option(S, "api_key", envvar="EDGEPACK_API_KEY",
               help="Require 'Authorization: Bearer KEY' (env EDGEPACK_API_KEY).")
@config_option(S, "max_concurrency", help="Generations at once (one runtime each).")
@config_option(S, "queue", help="Requests that may wait for a slot; beyond that: 429.")
@config_option(S, "max_tokens_cap", help="Largest max_tokens accepted [default: the bundle's, else 512].")
@config_option(S, "model_name", help="Model id in /v1/models [default: the bundle id or directory name].")
@config_option(S, "runtime", help="Runtime [default: the bundle's / artifact's own].")
@config_option(S, "threads", help="CPU threads per runtime.")
@config_option(S, "max_body_bytes", help="Request bodies above this many bytes get 413 before they are parsed.")
@config_option(S, "header_timeout_s", help="Seconds a client has to send a request head (and a body); then closed.")
def serve_cmd(model, **settings):
    """Serve MODEL (a bundle directory or .tar, or an artifact) with an OpenAI-compatible API:
    /v1/completions, /v1/chat/completions (streaming), /v1/models, /health, /metrics."""
    from edgepack.deploy.serve import serve
    from edgepack.deploy.serve_engine import is_loopback

    cfg = config_from(ServeConfig, settings, "serve")
    if not is_loopback(cfg.host) and not cfg.api_key:
        click.echo(f"warning: binding {cfg.host} without --api-key: anyone who can reach this port can use the model",
                   err=True)
    click.echo(f"edgepack serve: loading {model} ... then http://{cfg.host}:{cfg.port}/v1 (Ctrl-C stops)", err=True)
    serve(model, cfg)
