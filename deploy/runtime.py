"""The small interface every runtime implements, and the closed table of runtimes.

    rt = open_runtime(artifact, runtime=None, threads=None)   # runtime=None: the artifact's own
    logits = rt.prefill(ids)        # ids [B, T] int64 -> logits [B, V] float32 of the last position; fills the cache
    logits = rt.decode_step(ids)    # ids [B] -> logits [B, V]; appends one position to the cache
    rt.reset()                      # forget the cache (keeps allocations where the runtime pre-allocates)
    rt.forward_logits(ids)          # [B, T] -> [B, T, V], no cache: used by perplexity and export validation
    rt.memory_report()              # {"rss_bytes": ..., "cuda_peak_bytes": ...} what this runtime can see
    rt.describe()                   # {"runtime": name, "device": ..., "threads": ..., versions}

The closed table of runtimes (name -> factory, which target runtimes host it, what a device installs) is
edgepack.formats.RUNTIMES. Generation, sampling and timing are in `edgepack.deploy.generation` and are shared by all
runtimes, so bench and serve measure every runtime the same way.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from edgepack.errors import ConfigError, did_you_mean
from edgepack.formats import RUNTIMES, default_runtime


class Runtime(Protocol):
    name: str

    def prefill(self, ids: np.ndarray) -> np.ndarray: ...

    def decode_step(self, ids: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...

    def forward_logits(self, ids: np.ndarray) -> np.ndarray: ...

    def memory_report(self) -> dict: ...

    def describe(self) -> dict: ...


def resolve_runtime(art, runtime: str | None = None) -> str:
    """The runtime that runs `art`: the one asked for, else the manifest's extra["runtime"], else its format's
    default (edgepack.formats). Unknown names get a did-you-mean."""
    name = runtime or art.extra.get("runtime") or default_runtime(art.format)
    if name is None:
        raise ConfigError(f"'{art.path}' is a '{art.format}' artifact and no runtime runs that format",
                          f"compile it first, or pass --runtime (known: {', '.join(RUNTIMES)})")
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime '{name}'{did_you_mean(name, RUNTIMES)}", f"known runtimes: {', '.join(RUNTIMES)}")
    return name


def open_runtime(art, runtime: str | None = None, **options) -> Runtime:
    """Open `art` with `runtime` (None: resolve_runtime's choice) through the closed table edgepack.formats.RUNTIMES."""
    mod, fn = RUNTIMES[resolve_runtime(art, runtime)].factory.split(":")
    return getattr(importlib.import_module(mod), fn)(art, **options)


def process_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)
