"""Runtime `torch-cuda`: transformers' StaticCache preallocated to the full context, an eager prefill, and the
one-token decode step captured in CUDA graphs (optionally torch.compile'd first), with sampling on the GPU.

Why: eager `generate` launches hundreds of small kernels per token and re-allocates its cache. With every address
fixed (static cache, static id / position buffers) the whole step replays as one graph launch.

Attention reads the filled part of the cache, not all of it: the step attends over the first L slots, L the
smallest bucket (MIN_BUCKET, doubling, up to max_context) holding the tokens so far, through the sliced attention
of deploy/cuda_attention.py; one graph per bucket, captured the first time decoding reaches it (the warm-up runs
redo the very step about to run and rewind the cache's fill counter, so capture changes nothing). The additive
mask [B, 1, 1, L] is computed inside the step from the position buffer, so no host value enters a graph. The cache
tracks its own fill level on the device. The same code runs on CPU without graphs (`use_cuda_graph=False`), which
is how the static-cache logic is tested on machines without a GPU.

Low-bit artifacts (int8 / int4 / fp8: deploy/cuda_weights.py) load as stock-torch kernel modules
(compress/quant_kernels.py): every linear in the blocks, the lm_head kept 16-bit (as fit assumes). torch.compile is
off unless asked for (compile stage --torch-compile): it is applied only where it pays for its compile time, and
that is measured on the GPU by scripts/gpu_decode.py (COMPILE_PAYS below records what was measured). When on, it
runs with inductor's coordinate-descent tuning, which turns the M=1 matmuls into fused Triton reductions (the
int8 / fp8 weight-only dequantize fuses into the GEMV: gpt-fast's recipe).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from edgepack.deploy.cuda_weights import RUNTIME_FILE, read_settings  # noqa: F401 (RUNTIME_FILE: re-exported)
from edgepack.deploy.runtime import process_rss_bytes
from edgepack.errors import ConfigError, UnsupportedOnTarget

WARMUP_STEPS = 3  # eager runs on a side stream before capture: cuBLAS handles, autotuning, torch.compile itself
MIN_BUCKET = 512  # shortest attended length: 512 slots of a 1B Llama's KV are 16 MiB a token, <1% of its weights
# precision -> does torch.compile pay for its compile time (decode speed-up against the extra seconds), as measured
# by scripts/gpu_decode.py on a GPU. Empty: not measured yet, so nothing compiles unless asked for.
COMPILE_PAYS: dict[str, bool] = {}


def bucket_lengths(max_context: int, min_bucket: int = MIN_BUCKET) -> tuple[int, ...]:
    """Attended lengths: min_bucket, doubling, capped by (and ending at) max_context."""
    out, b = [], max(1, int(min_bucket))
    while b < max_context:
        out.append(b)
        b *= 2
    return (*out, int(max_context))


class TorchCudaRuntime:
    name = "torch-cuda"

    def __init__(self, model, *, max_context: int, max_batch: int = 1, use_cuda_graph: bool | None = None,
                 torch_compile: bool = False, precision: str | None = None, kernel: str | None = None,
                 min_bucket: int = MIN_BUCKET):
        import torch

        from edgepack.deploy.cuda_attention import cache_keyword, use_sliced_attention

        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            self.dtype = torch.bfloat16
        self.max_context, self.max_batch = int(max_context), int(max_batch)
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else bool(use_cuda_graph)
        if self.use_cuda_graph and self.device.type != "cuda":
            raise ConfigError("CUDA graphs need a CUDA device", "pass use_cuda_graph=False on CPU")
        self.torch_compile, self.precision, self.kernel = torch_compile, precision, kernel
        self.attention = use_sliced_attention(model)
        self._cache_kw = cache_keyword(model)
        self.buckets = bucket_lengths(self.max_context, min_bucket)
        self._arange = torch.arange(self.max_context, device=self.device)
        self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._neg = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        self._batch, self._pos, self._graphs, self.cache, self._pool = 0, 0, {}, None, None
        self._step_fn = self._step
        if torch_compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "edgepack" / "inductor"))
            import torch._dynamo

            for knob in ("recompile_limit", "cache_size_limit"):  # one specialization per bucket
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), len(self.buckets) + 2))
            self._step_fn = torch.compile(self._step, mode="default", dynamic=False)
        self.capture_seconds: dict[int, float] = {}  # bucket -> seconds to warm up (compile) and capture its graph

    # ------------------------------------------------------------------------------------------ static state
    def _ensure(self, batch: int) -> None:
        """Allocate the cache and the step's static buffers for `batch` rows once."""
        import torch

        if batch == self._batch:
            return
        with torch.inference_mode():  # every cache tensor is an inference tensor, mutated only in inference mode
            self._allocate(batch)

    def _allocate(self, batch: int) -> None:
        import torch
        from transformers import StaticCache

        if batch > self.max_batch:
            raise ConfigError(f"batch {batch} exceeds this runtime's max_batch {self.max_batch}",
                              "compile with a larger --max-batch")
        cfg = self.model.config
        heads = cfg.num_attention_heads
        self.cache = StaticCache(config=cfg, max_cache_len=self.max_context)
        self.cache.early_initialization(batch, getattr(cfg, "num_key_value_heads", None) or heads,
                                        getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, self.dtype,
                                        self.device)
        self._ids = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self._posbuf = torch.zeros((batch, 1), dtype=torch.long, device=self.device)
        self._logits = torch.zeros((batch, cfg.vocab_size), dtype=torch.float32, device=self.device)
        self._batch, self._graphs = batch, {}
        self.cache.reset()

    def bucket(self, length: int) -> int:
        """The attended length for `length` filled positions."""
        for b in self.buckets:
            if b >= length:
                return b
        raise ConfigError(f"{length} tokens exceed the static cache ({self.max_context})",
                          "compile with a larger --max-context")

    def _step(self, ids, pos, length: int):
        """One token per row at position pos (all rows at the same position), attending over `length` slots:
        logits [B, V] float32."""
        import torch

        mask = torch.where(self._arange[:length].view(1, 1, 1, -1) <= pos.view(-1, 1, 1, 1), self._zero, self._neg)
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                         **{self._cache_kw: self.cache})
        return out.logits[:, -1].float()

    def _rewind(self, n: int) -> None:
        """Undo n tokens of the cache's device-side fill counter (the K/V written stay; they are rewritten)."""
        for layer in self.cache.layers:
            layer.cumulative_length.sub_(n)

    def _compile_context(self):
        import contextlib

        if not self.torch_compile:
            return contextlib.nullcontext()
        import torch._inductor.config as inductor_config

        return inductor_config.patch(coordinate_descent_tuning=True)

    def _capture(self, length: int):
        """Warm up (and compile) the step for this bucket at the current position, then capture it. The warm-ups
        run the real next step and rewind the fill counter each time, so the cache ends as it was."""
        import torch

        t0 = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), self._compile_context():
            for _ in range(WARMUP_STEPS):
                self._step_fn(self._ids, self._posbuf, length)
                self._rewind(1)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool: buckets never replay at the same time
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._logits.copy_(self._step_fn(self._ids, self._posbuf, length))
        torch.cuda.synchronize(self.device)
        self._graphs[length] = graph
        self.capture_seconds[length] = round(time.perf_counter() - t0, 3)
        return graph

    # ------------------------------------------------------------------------------------------ Runtime API
    def reset(self) -> None:
        import torch

        self._pos = 0
        if self.cache is not None:
            with torch.inference_mode():
                self.cache.reset()  # zeroes in place: the captured graph keeps pointing at the same tensors

    def prefill_device(self, ids):
        """ids [B, T] int64 tensor -> last-position logits [B, V] float32 on the device; fills the cache."""
        import torch

        b, t = ids.shape
        if t > self.max_context:
            raise ConfigError(f"prompt of {t} tokens exceeds the static cache ({self.max_context})",
                              "compile with a larger --max-context or shorten the prompt")
        self._ensure(b)
        self.reset()
        length = self.bucket(t)
        with torch.inference_mode():
            pos = torch.arange(t, device=self.device)
            mask = torch.where(self._arange[:length].view(1, -1) <= pos.view(-1, 1), self._zero, self._neg)
            out = self.model(input_ids=ids.to(self.device), position_ids=pos.expand(b, t),
                             attention_mask=mask.expand(b, 1, t, length), use_cache=True, logits_to_keep=1,
                             **{self._cache_kw: self.cache})
        self._pos = t
        return out.logits[:, -1].float()

    def decode_step_device(self, ids):
        """ids [B] int64 tensor (on the device) -> logits [B, V] float32 tensor; no host synchronization (except
        the first time decoding reaches a bucket, which captures its graph)."""
        import torch

        if self._pos >= self.max_context:
            raise ConfigError(f"the static cache is full ({self.max_context} tokens)",
                              "compile with a larger --max-context or generate fewer tokens")
        length = self.bucket(self._pos + 1)
        with torch.inference_mode():
            self._ids.copy_(ids.view(-1, 1), non_blocking=True)
            self._posbuf.fill_(self._pos)
            if self.use_cuda_graph:
                graph = self._graphs.get(length) or self._capture(length)
                graph.replay()
                out = self._logits
            else:
                with self._compile_context():
                    out = self._step_fn(self._ids, self._posbuf, length)
        self._pos += 1
        return out

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        import torch

        return self.prefill_device(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))).cpu().numpy()

    def decode_step(self, ids: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)).to(self.device)
        return self.decode_step_device(t).cpu().numpy()

    def forward_logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device), use_cache=False)
        return out.logits.float().cpu().numpy()

    def generate_on_device(self, ids, cfg, on_token=None, sync=None):
        """generation.generate's contract with the sampling on the device: the next token never leaves the GPU
        unless a caller asks for it (on_token, stop tokens); one synchronization per token for the timing."""
        import torch

        with torch.inference_mode():
            return self._generate(ids, cfg, on_token, sync)

    def _generate(self, ids, cfg, on_token, sync):
        import torch

        from edgepack.deploy.generation import GenerationResult
        from edgepack.deploy.torch_sampling import sample_torch

        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        ids = ids[None] if ids.ndim == 1 else ids
        on_cuda = self.device.type == "cuda"
        sync = (lambda: torch.cuda.synchronize(self.device)) if on_cuda else (sync or (lambda: None))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(cfg.seed if cfg.seed is not None else int(torch.seed() % 2**63))
        stop = torch.tensor(sorted(cfg.stop_token_ids), device=self.device) if cfg.stop_token_ids else None
        out = torch.empty((ids.shape[0], cfg.max_new_tokens), dtype=torch.long, device=self.device)
        self.reset()
        sync()
        t0 = time.perf_counter()
        nxt = sample_torch(self.prefill_device(ids), cfg, gen)
        sync()
        ttft, lat, n = time.perf_counter() - t0, [], 1
        out[:, 0] = nxt
        done = torch.isin(nxt, stop) if stop is not None else None
        if on_token:
            on_token(nxt.cpu().numpy())
        while n < cfg.max_new_tokens and not (done is not None and bool(done.all())):
            t = time.perf_counter()
            nxt = sample_torch(self.decode_step_device(nxt), cfg, gen)
            sync()
            lat.append(time.perf_counter() - t)
            out[:, n] = nxt
            n += 1
            if on_token:
                on_token(nxt.cpu().numpy())
            if stop is not None:
                done |= torch.isin(nxt, stop)
        stopped = "stop_token" if done is not None and bool(done.all()) else "length"
        return GenerationResult(out[:, :n].cpu().numpy(), int(ids.shape[1]), ttft, lat, stopped)

    def kv_cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        return int(sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers))

    def memory_report(self) -> dict:
        rep = {"rss_bytes": process_rss_bytes(), "kv_cache_bytes": self.kv_cache_bytes()}
        if self.device.type == "cuda":
            import torch

            rep["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            rep["cuda_reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
        return rep

    def describe(self) -> dict:
        import torch

        return {"runtime": self.name, "device": str(self.device), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "precision": self.precision, "kernel": self.kernel,
                "dtype": str(self.dtype).removeprefix("torch."), "max_context": self.max_context,
                "cuda_graph": self.use_cuda_graph, "torch_compile": self.torch_compile,
                "attention": self.attention, "cache_keyword": self._cache_kw, "buckets": list(self.buckets),
                "capture_seconds": dict(self.capture_seconds)}


def open_torch_cuda_dir(path: Path, extra: dict, device: str = "cuda", use_cuda_graph: bool | None = None,
                        torch_compile: bool | None = None, max_context: int | None = None,
                        min_bucket: int = MIN_BUCKET):
    """The runtime over a compiled torch-cuda artifact: a 16-bit checkpoint, or low-bit weights (settings "layers")
    loaded as kernel modules without a float copy (deploy/cuda_weights.py)."""
    import torch

    from edgepack.compress.quant_kernels import KERNEL_NAMES

    s = read_settings(path, extra)
    precision = s.get("precision") or "bf16"
    if s.get("layers"):
        from edgepack.deploy.cuda_weights import build_model

        model, kernel = build_model(Path(path), s["layers"], device), KERNEL_NAMES.get(precision)
    else:
        from edgepack.hf import load_model

        dtype = getattr(torch, s.get("dtype") or ("float32" if device == "cpu" else "bfloat16"))
        model, kernel = load_model(Path(path), device=device, dtype=dtype), None
    ctx = max_context or s.get("max_context") or min(model.config.max_position_embeddings or 4096, 4096)
    compile_step = bool(s.get("torch_compile", False)) if torch_compile is None else torch_compile
    return TorchCudaRuntime(model, max_context=ctx, max_batch=int(s.get("max_batch") or 1),
                            use_cuda_graph=use_cuda_graph, torch_compile=compile_step and device != "cpu",
                            precision=precision, kernel=kernel, min_bucket=min_bucket)


def open_torch_cuda_runtime(art, threads: int | None = None, device: str = "cuda", **opts):
    """RUNTIMES entry. device="cpu" runs the same static-cache step without a graph (for tests)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedOnTarget("runtime torch-cuda needs a CUDA GPU, and torch sees none on this machine",
                                  "run it on the GPU it was compiled for, or try it here with --runtime torch-cpu")
    return open_torch_cuda_dir(art.path, art.extra, device=device, **opts)
