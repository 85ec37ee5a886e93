"""Runtime `llama.cpp`: a 'gguf' artifact (deploy/gguf_export.py) run by llama.cpp through llama-cpp-python (extra
`llamacpp`; tests skip without it), behind the same interface as every runtime (deploy/runtime.py), so bench, serve,
eval and generate measure it like the others. Batch 1 (one llama.cpp sequence); the token ids come from our
tokenizer, never llama.cpp's, so every runtime decodes exactly the same ids.

Logits: the last position's row through `llama_get_logits_ith(ctx, -1)` for prefill / decode; `forward_logits`
(perplexity, parity) opens a second context with `logits_all` so every position's row is kept.
"""

from __future__ import annotations

import numpy as np

from edgepack.deploy.runtime import process_rss_bytes
from edgepack.errors import ConfigError, require

DEFAULT_MAX_CONTEXT = 4096  # tokens of KV cache when the caller gives none (capped by the model's context)


class LlamaCppRuntime:
    name = "llama.cpp"

    def __init__(self, art_dir, extra: dict, threads: int | None = None, max_length: int | None = None):
        from pathlib import Path

        from edgepack.deploy.runtime import choose_threads

        self.llama_cpp = require("llama_cpp", "llamacpp", "the llama.cpp runtime (GGUF artifacts)")
        self.path = str(Path(art_dir) / extra.get("gguf_file", "model.gguf"))
        self.extra = extra
        self.threads, self.threads_why = choose_threads(threads)
        self.gpu = bool(self.llama_cpp.llama_supports_gpu_offload())  # a CUDA build (Jetson): every layer on the GPU
        self.n_ctx = int(min(max_length or DEFAULT_MAX_CONTEXT, extra.get("max_positions") or DEFAULT_MAX_CONTEXT))
        self.llm = self._open(logits_all=False)
        self._all = None  # the logits_all context, opened on the first forward_logits

    def _open(self, logits_all: bool):
        return self.llama_cpp.Llama(self.path, n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                                    n_threads=self.threads, n_threads_batch=self.threads, logits_all=logits_all,
                                    n_gpu_layers=-1 if self.gpu else 0, verbose=False)

    def _last_logits(self) -> np.ndarray:
        row = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).astype(np.float32)[None, :]

    @staticmethod
    def _one(ids: np.ndarray) -> list[int]:
        return [int(t) for t in np.asarray(ids).reshape(-1)]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        if np.asarray(ids).shape[0] != 1:
            raise ConfigError("the llama.cpp runtime runs batch 1", "bench / serve it with batch 1")
        toks = self._one(ids)
        if len(toks) >= self.n_ctx:
            raise ConfigError(f"prompt of {len(toks)} tokens does not fit the {self.n_ctx}-token context",
                              "pass a shorter prompt or a larger max_length")
        self.llm.reset()
        self.llm.eval(toks)
        return self._last_logits()

    def decode_step(self, ids: np.ndarray) -> np.ndarray:
        if np.asarray(ids).reshape(-1).shape[0] != 1:
            raise ConfigError("the llama.cpp runtime runs batch 1", "bench / serve it with batch 1")
        self.llm.eval(self._one(ids))
        return self._last_logits()

    def reset(self) -> None:
        self.llm.reset()

    def forward_logits(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if self._all is None:
            self._all = self._open(logits_all=True)
        out = []
        for row in ids.reshape(-1, ids.shape[-1]):
            self._all.reset()
            self._all.eval([int(t) for t in row])
            out.append(np.asarray(self._all.scores[: len(row)], dtype=np.float32))
        return np.stack(out).reshape(*ids.shape, -1)

    def memory_report(self) -> dict:
        return {"rss_bytes": process_rss_bytes()}

    def describe(self) -> dict:
        return {"runtime": self.name, "device": "cuda" if self.gpu else "cpu", "threads": self.threads,
                "threads_why": self.threads_why, "n_ctx": self.n_ctx,
                "llama_cpp_python": getattr(self.llama_cpp, "__version__", "unknown"), "file_type": self.extra.get("file_type"),
                "precision": self.extra.get("precision"), "made_by": self.extra.get("made_by", "unknown")}


def open_llamacpp_runtime(art, threads: int | None = None, max_length: int | None = None, **_) -> LlamaCppRuntime:
    return LlamaCppRuntime(art.path, art.extra, threads=threads, max_length=max_length)


def open_gguf_scorer(art):
    """Scorer for perplexity: (logits_fn, tokenizer_dir, max_positions) for a 'gguf' artifact."""
    rt = open_llamacpp_runtime(art)
    return rt.forward_logits, art.path, art.extra.get("max_positions")
