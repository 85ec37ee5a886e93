"""An OpenAI-compatible HTTP server for a bundle or an artifact: FastAPI (deploy/serve_api.py) over the serving
engine (deploy/serve_engine.py), run by uvicorn.

    POST /v1/completions, /v1/chat/completions (both with "stream": true -> server-sent events)
    GET  /v1/models, /health (no key needed), /metrics (Prometheus text format)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edgepack.deploy.serve_engine import ServeConfig, Served, check_config, load_served
from edgepack.errors import ConfigError


def uvicorn_server(app, cfg: ServeConfig):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                                         timeout_graceful_shutdown=5, http=_head_timeout_protocol(cfg.header_timeout_s)))


def _head_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, plus: a connection that has not sent a complete request head within `seconds` of
    connecting (or of its last response) is closed. uvicorn alone keeps a slowloris connection open for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_timeout)

        def _head_timeout(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return HeadTimeoutProtocol


def serve(path, cfg: ServeConfig) -> None:
    """Load, then serve until interrupted (blocking)."""
    import tempfile

    from edgepack.errors import require

    check_config(cfg)
    require("fastapi", "serve", "the HTTP server")
    require("uvicorn", "serve", "the HTTP server")
    import signal
    import sys

    from edgepack.deploy.serve_api import create_app

    # uvicorn re-raises SIGTERM after a graceful shutdown; as SystemExit it still runs the cleanup below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if not Path(path).is_file():  # a bundle or artifact directory (what the service unit serves): nothing to unpack
        run_until_signal(create_app(load_served(path, cfg), cfg), cfg)
        return
    with tempfile.TemporaryDirectory(prefix="edgepack-serve-") as tmp:  # a .tar is unpacked (safely) for the run
        served = load_served(path, cfg, tmp)
        run_until_signal(create_app(served, cfg), cfg)


def run_until_signal(app, cfg: ServeConfig) -> None:
    """uvicorn's run, but the first Ctrl-C / SIGTERM also stops the generations in flight (app.stop_generations),
    so the graceful shutdown completes their responses at once."""
    server = uvicorn_server(app, cfg)
    uvicorn_exit = server.handle_exit  # uvicorn installs self.handle_exit as its signal handler

    def handle_exit(sig, frame):
        getattr(app, "stop_generations", lambda: None)()
        uvicorn_exit(sig, frame)

    server.handle_exit = handle_exit
    server.run()


class BackgroundServer:
    """A server on a thread (tests, benchmarks): `with BackgroundServer(served, cfg) as url: ...` stops it on exit."""

    def __init__(self, served: Served, cfg: ServeConfig):
        from edgepack.deploy.serve_api import create_app

        check_config(cfg)
        self.server = uvicorn_server(create_app(served, cfg), cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="edgepack-serve")
        self.url = f"http://{cfg.host}:{cfg.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise ConfigError(f"the server did not start on {self.url}", "is the port free?")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
