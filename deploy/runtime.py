"""The small interface every runtime implements, and the closed table of runtimes.

    rt = open_runtime(artifact, runtime=None, threads=None)   # runtime=None: the artifact's own
    logits = rt.prefill(ids)        # ids [B, T] int64 -> logits [B, V] float32 of the last position; fills the cache
    logits = rt.decode_step(ids)    # ids [B] -> logits [B, V]; appends one position to the cache
    rt.reset()                      # forget the cache (keeps allocations where the runtime pre-allocates)
    rt.forward_logits(ids)          # [B, T] -> [B, T, V], no cache: used by perplexity and export validation
    rt.memory_report()              # {"rss_bytes": ..., "cuda_peak_bytes": ...} what this runtime can see
    rt.describe()                   # {"runtime": name, "device": ..., "threads": ..., versions}

Generation, sampling and timing are in `edgepack.deploy.generation` and are shared by all runtimes, so bench and
serve measure every runtime the same way.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from edgepack.errors import ConfigError, did_you_mean


class Runtime(Protocol):
    name: str

    def prefill(self, ids: np.ndarray) -> np.ndarray: ...

    def decode_step(self, ids: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...

    def forward_logits(self, ids: np.ndarray) -> np.ndarray: ...

    def memory_report(self) -> dict: ...

    def describe(self) -> dict: ...


# runtime name -> "module:factory(artifact, **options) -> Runtime". Later issues add onnxruntime, torch-cuda, tensorrt.
RUNTIMES: dict[str, str] = {
    "torch-cpu": "edgepack.deploy.torch_runtime:open_torch_runtime",
    "hf": "edgepack.deploy.torch_runtime:open_hf_baseline",
    "onnxruntime": "edgepack.deploy.ort_runtime:open_ort_runtime",
    "torch-quant": "edgepack.compress.quant_torch:open_torch_quant_runtime",
    "torch-cuda": "edgepack.deploy.torch_cuda:open_torch_cuda_runtime",
    "tensorrt": "edgepack.deploy.tensorrt_runtime:open_tensorrt_runtime",
}

# artifact format -> the runtime that runs it by default
DEFAULT_RUNTIME: dict[str, str] = {
    "hf": "torch-cpu",
    "onnx": "onnxruntime",
    "torch-quant": "torch-quant",
}


def open_runtime(art, runtime: str | None = None, **options) -> Runtime:
    name = runtime or DEFAULT_RUNTIME.get(art.format)
    if name is None:
        raise ConfigError(f"no runtime runs '{art.format}' artifacts", f"known runtimes: {', '.join(RUNTIMES)}")
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime '{name}'{did_you_mean(name, RUNTIMES)}", f"known runtimes: {', '.join(RUNTIMES)}")
    mod, fn = RUNTIMES[name].split(":")
    return getattr(importlib.import_module(mod), fn)(art, **options)


def process_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)
