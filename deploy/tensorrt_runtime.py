"""Runtime `tensorrt`: runs a cached engine (deploy/tensorrt_build.py) of the exported decoder, feeding the KV cache
between steps. Needs the tensorrt module and a CUDA GPU; buffers are torch CUDA tensors.

The engine has two optimization profiles (trt_spec): 0 = prefill (past 0), 1 = decode (one token). The cache lives
in two preallocated sets of buffers sized for max_context: each step reads past from one set and TensorRT writes
present (past + new positions, dense) into the other, then they swap, so nothing is copied between steps.
Engines are looked up in the artifact's own `engines/` (built on the host) and in the bundle's `engine-cache/`
(built on the device by `edgepack device prepare`), or in $EDGEPACK_ENGINE_CACHE.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgepack.deploy.runtime import process_rss_bytes
from edgepack.errors import ArtifactError, ConfigError

ENGINE_CACHE_DIR = "engine-cache"  # in a bundle (release) directory, next to artifact/


def engine_dirs(art_path: Path, extra: dict) -> list[Path]:
    dirs = [Path(art_path) / extra.get("engine_dir", "engines"), Path(art_path).parent / ENGINE_CACHE_DIR]
    if os.environ.get("EDGEPACK_ENGINE_CACHE"):
        dirs.insert(0, Path(os.environ["EDGEPACK_ENGINE_CACHE"]))
    return dirs


class TensorRTRuntime:
    name = "tensorrt"

    def __init__(self, engine_path: Path, extra: dict, max_context: int):
        import tensorrt as trt
        import torch

        self.trt, self.extra, self.max_context = trt, extra, int(max_context)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._rt = trt.Runtime(self._logger)
        self.engine = self._rt.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize '{engine_path}'", "rebuild it: edgepack device prepare")
        self.engine_path = Path(engine_path)
        self.ctx = self.engine.create_execution_context()
        self.device = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]
        self.kv_heads, self.head_dim, self.vocab = extra["num_kv_heads"], extra["head_dim"], extra["vocab_size"]
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self._profile, self._batch, self._past_len, self._cur = None, 0, 0, 0

    @staticmethod
    def _torch_dtype(dt):
        import tensorrt as trt
        import torch

        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32,
                 trt.bool: torch.bool}
        if hasattr(trt, "bfloat16"):
            table[trt.bfloat16] = torch.bfloat16
        return table[dt]

    def _ensure(self, batch: int) -> None:
        import torch

        if batch == self._batch:
            return
        n = batch * self.kv_heads * self.max_context * self.head_dim
        kv_dt = self.dtypes[self.past[0]]
        with torch.cuda.stream(self.stream):  # the fill of the mask is a kernel: on the stream that reads it
            self._bufs = [[torch.empty(n, dtype=kv_dt, device=self.device) for _ in self.past] for _ in range(2)]
            self._ones = torch.ones(batch * self.max_context, dtype=self.dtypes.get("attention_mask", torch.int64),
                                    device=self.device)
        self._batch = batch

    def _run(self, ids, every: bool = False) -> object:
        """One engine call; logits of the last position only (the graph's logits_positions input), or of every
        position when `every` (perplexity)."""
        import torch

        b, t = ids.shape
        n = t if every or "logits_positions" not in self.inputs else 1
        past = self._past_len
        if past + t > self.max_context:
            raise ConfigError(f"{past + t} positions exceed the engine's max_context {self.max_context}",
                              "compile with a larger --max-context")
        profile = 0 if past == 0 else 1
        if profile != self._profile:
            if not self.ctx.set_optimization_profile_async(profile, self.stream.cuda_stream):
                raise ArtifactError(f"TensorRT refused optimization profile {profile}", "rebuild the engine: "
                                    "edgepack device prepare (the engine needs the prefill and decode profiles)")
            self._profile = profile
        # every copy and kernel of the step on TensorRT's stream, in order: inputs filled on another stream could
        # still be in flight when the engine reads them
        with torch.cuda.stream(self.stream):
            feeds = {"input_ids": ids.to(self.device, self.dtypes["input_ids"], non_blocking=False).contiguous()}
            if "attention_mask" in self.inputs:
                feeds["attention_mask"] = self._ones[: b * (past + t)].view(b, past + t)
            if "position_ids" in self.inputs:
                pos = torch.arange(past, past + t, device=self.device, dtype=self.dtypes["position_ids"])
                feeds["position_ids"] = pos.expand(b, t).contiguous()
            if "logits_positions" in self.inputs:
                feeds["logits_positions"] = torch.arange(t - n, t, device=self.device,
                                                         dtype=self.dtypes["logits_positions"])
            logits = torch.empty((b, n, self.vocab), dtype=self.dtypes["logits"], device=self.device)
        shapes = {name: tuple(x.shape) for name, x in feeds.items()}
        src, dst = self._bufs[self._cur], self._bufs[1 - self._cur]
        shapes.update({name: (b, self.kv_heads, past, self.head_dim) for name in self.past})
        for name, shape in shapes.items():
            if not self.ctx.set_input_shape(name, shape):
                raise ConfigError(f"TensorRT refused shape {shape} for '{name}' (outside the engine's profile "
                                  f"{profile})", "compile with a larger --max-context / --max-batch")
        for name, x in feeds.items():
            self.ctx.set_tensor_address(name, x.data_ptr())
        for i, name in enumerate(self.past):
            self.ctx.set_tensor_address(name, src[i].data_ptr())
            self.ctx.set_tensor_address(self.present[i], dst[i].data_ptr())
        self.ctx.set_tensor_address("logits", logits.data_ptr())
        if not self.ctx.execute_async_v3(self.stream.cuda_stream):
            raise ArtifactError("TensorRT execution failed (see its log)", "rebuild the engine: edgepack device prepare")
        self.stream.synchronize()
        self._cur, self._past_len = 1 - self._cur, past + t
        return logits  # [B, 1 or T, V] in the engine's output dtype

    # ------------------------------------------------------------------------------------------ Runtime API
    def reset(self) -> None:
        self._past_len, self._cur = 0, 0

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        self._ensure(ids.shape[0])
        self.reset()
        return self._run(ids)[:, -1].float().cpu().numpy()

    def decode_step(self, ids: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1, 1))
        return self._run(x)[:, -1].float().cpu().numpy()

    def forward_logits(self, ids: np.ndarray) -> np.ndarray:
        """[B, T] -> [B, T, V] with an empty cache (prefill profile), for perplexity."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        self._ensure(x.shape[0])
        self.reset()
        out = self._run(x, every=True).float().cpu().numpy()
        self.reset()
        return out

    def memory_report(self) -> dict:
        import torch

        rep = {"rss_bytes": process_rss_bytes(), "cuda_peak_bytes": int(torch.cuda.max_memory_allocated()),
               # torch's allocator does not see TensorRT's own allocations: the engine (weights) and the context's
               # activation memory, sized by TensorRT for the largest profile
               "trt_engine_bytes": self.engine_path.stat().st_size,
               "trt_context_bytes": int(self.engine.device_memory_size_v2)}
        if self._batch:
            rep["kv_cache_bytes"] = int(sum(x.numel() * x.element_size() for s in self._bufs for x in s))
        return rep

    def describe(self) -> dict:
        return {"runtime": self.name, "device": "cuda", "threads": 1, "tensorrt": self.trt.__version__,
                "engine": self.engine_path.name, "precision": self.extra.get("precision"),
                "max_context": self.max_context}


def open_tensorrt_runtime(art, threads: int | None = None, device: str = "cuda", **_):
    """RUNTIMES entry: the cached engine for this artifact's ONNX on this machine's TensorRT and GPU."""
    from edgepack.deploy import trt_spec
    from edgepack.deploy.tensorrt_build import find_engine, install_hint, local_module, local_sm, require_tensorrt

    spec = trt_spec.read_spec(art.path)
    onnx_path = art.path / spec["onnx"]
    dirs = engine_dirs(art.path, art.extra)
    trt = require_tensorrt(spec, onnx_path, dirs[-1] / "model.engine")
    sm, module = local_sm(), local_module()
    for d in dirs:
        found = find_engine(d, spec["onnx_sha256"], trt.__version__, sm, module)
        if found is not None:
            return TensorRTRuntime(found, art.extra, spec["max_context"])
    raise ArtifactError(f"no TensorRT engine for '{art.path}' built with TensorRT {trt.__version__} for sm_{sm} "
                        f"(looked in {', '.join(str(d) for d in dirs)})",
                        "build it: edgepack device prepare BUNDLE -- or by hand: "
                        + install_hint(spec, onnx_path, dirs[-1] / "model.engine").split("with: ", 1)[-1])
