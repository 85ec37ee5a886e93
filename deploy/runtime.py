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


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(CPU threads, why) for a runtime: what the user asked for, else the physical cores that are not busy now (the
    1-minute load average subtracted from the CPUs this process may use), at least 1. On a loaded 2-core machine
    torch's default of 2 threads decoded 25x slower than 1 (10 vs 252 tokens/s): threads fighting over one core."""
    import os

    if requested:
        return int(requested), "as asked"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = min(psutil.cpu_count(logical=False) or usable, usable)
    except ImportError:
        physical = usable
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return physical, f"{physical} physical cores (no load average here)"
    idle = max(0.0, usable - load)
    n = max(1, min(physical, int(idle + 0.5)))
    return n, f"{n} of {physical} physical cores: load average {load:.1f} on {usable} CPUs leaves {idle:.1f} idle"


def process_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)
