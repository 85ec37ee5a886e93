"""`edgepack serve`: the OpenAI-compatible server (deploy/serve.py). No torch / fastapi import at module level."""

from __future__ import annotations

import click


@click.command("serve")
@click.argument("model", type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback by default; anything else exposes the model to the network.")
@click.option("--port", default=8000, show_default=True)
@click.option("--api-key", envvar="EDGEPACK_API_KEY", help="Require 'Authorization: Bearer KEY' (env EDGEPACK_API_KEY).")
@click.option("--max-concurrency", default=1, show_default=True, help="Generations at once (one runtime each).")
@click.option("--queue", default=8, show_default=True, help="Requests that may wait for a slot; beyond that: 429.")
@click.option("--max-tokens-cap", type=int, help="Largest max_tokens accepted [default: the bundle's, else 512].")
@click.option("--model-name", help="Model id in /v1/models [default: the bundle id or directory name].")
@click.option("--runtime", help="Runtime [default: the bundle's / artifact's own].")
@click.option("--threads", type=int, help="CPU threads per runtime.")
def serve_cmd(model, host, port, api_key, max_concurrency, queue, max_tokens_cap, model_name, runtime, threads):
    """Serve MODEL (a bundle directory or .tar, or an artifact) with an OpenAI-compatible API:
    /v1/completions, /v1/chat/completions (streaming), /v1/models, /health, /metrics."""
    from edgepack.deploy.serve import ServeConfig, is_loopback, serve

    cfg = ServeConfig(host=host, port=port, api_key=api_key, max_concurrency=max_concurrency, queue=queue,
                      max_tokens_cap=max_tokens_cap, model_name=model_name, runtime=runtime, threads=threads)
    if not is_loopback(host) and not api_key:
        click.echo(f"warning: binding {host} without --api-key: anyone who can reach this port can use the model",
                   err=True)
    click.echo(f"edgepack serve: loading {model} ... then http://{host}:{port}/v1 (Ctrl-C stops)", err=True)
    serve(model, cfg)
