"""Runtime `onnxruntime`: runs an 'onnx' artifact (our export, a quantized one, or an onnxruntime-genai build) behind
the Runtime interface, so `deploy.generation.generate`, bench and serve drive it like every other runtime.

KV cache: with IO binding (the default) each past/present tensor lives in one of two pre-allocated flat buffers per
cache tensor (ping-pong). A step reads past from buffer A and onnxruntime writes present straight into buffer B;
because a [batch, kv_heads, length, head_dim] tensor is contiguous, the first batch*kv_heads*length*head_dim
elements of a flat buffer are a valid tensor of any length, so no step allocates, copies or converts the cache.
The decode logits go to a pre-allocated buffer too. `io_binding=False` runs the plain `session.run` path with
numpy feeds (bench compares the two).

Graph inputs are discovered from the session, so graphs without `position_ids` (onnxruntime-genai) also run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepack.deploy.runtime import choose_threads, process_rss_bytes
from edgepack.errors import ORT_GPU_INSTALL, ArtifactError, ConfigError, MissingDependency, require

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
DEFAULT_MAX_LENGTH = 4096  # tokens the pre-allocated cache holds when the model's own limit is larger or unknown


QDQ_ACCURACY_LEVEL = "1"  # onnxruntime's compute type for DequantizeLinear -> MatMul it fuses: fp32


class OrtRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, extra: dict, threads: int | None = None, io_binding: bool = True,
                 max_length: int | None = None, device: str = "cpu"):
        ort = require("onnxruntime", "onnx", "the onnxruntime runtime")
        onnx_path = Path(path) / extra.get("onnx_file", "model.onnx")
        if not onnx_path.is_file():
            raise ArtifactError(f"'{onnx_path}' is missing", "re-run the export/compile stage that made this artifact")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MissingDependency("onnxruntime-gpu", "onnx", "onnxruntime with the CUDA execution provider; the "
                                        "installed onnxruntime is CPU-only", install=ORT_GPU_INSTALL)
            providers.insert(0, "CUDAExecutionProvider")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # physical cores at most (onnxruntime's matmuls do not gain from SMT siblings), and only the idle ones
        so.intra_op_num_threads, self.threads_why = choose_threads(threads)
        so.inter_op_num_threads = 1  # a decoder is one chain of ops: parallelism is inside the matmuls
        so.log_severity_level = 3  # errors only
        # onnxruntime fuses DequantizeLinear -> MatMul (the TensorRT Q/DQ graphs) into MatMulNBits, by default with
        # int8 activations (accuracy level 4): 45 dB from the weights' own product on stories260K. TensorRT runs
        # them W4A16 / W8A16, so measure them with float activations (level 1: fp32 compute).
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", QDQ_ACCURACY_LEVEL)
        self.session = ort.InferenceSession(str(onnx_path), so, providers=providers)
        self.threads, self.device, self.extra = so.intra_op_num_threads, device, extra
        ins = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in (f"past_key_values.{i}.{kv}" for i in range(extra["num_layers"])
                                       for kv in ("key", "value")) if n in ins]
        self.present_names = [f"present.{i}.{kv}" for i in range(extra["num_layers"]) for kv in ("key", "value")]
        if len(self.past_names) != 2 * extra["num_layers"] or "input_ids" not in ins:
            raise ArtifactError(f"'{onnx_path}' does not have the decoder-with-cache inputs edgepack expects "
                                "(input_ids, past_key_values.N.key/value)", "re-export it with 'edgepack export onnx'")
        self.has_mask, self.has_positions = "attention_mask" in ins, "position_ids" in ins
        self.last_only = "logits_positions" in ins  # Jetson graphs: logits of the chosen positions only
        self.kv_dtype = _NP_DTYPES.get(ins[self.past_names[0]].type, np.float32)
        # fp16 graphs (the Jetson / TensorRT export) return fp16 logits: bind buffers of the graph's own type
        outs = {o.name: o for o in self.session.get_outputs()}
        self.logits_dtype = _NP_DTYPES.get(outs["logits"].type, np.float32) if "logits" in outs else np.float32
        self.kv_heads, self.head_dim, self.vocab = extra["num_kv_heads"], extra["head_dim"], extra["vocab_size"]
        self.max_length = int(max_length or min(extra.get("max_positions") or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH))
        self.io_binding = io_binding
        # GroupQueryAttention graphs (onnxruntime-genai) can read past from and write present into ONE buffer of
        # max_length positions: nothing is copied per step and the cache bindings never change.
        self.share_buffer = io_binding and bool(extra.get("past_present_share_buffer"))
        self._bufs = None  # [2, 2 * layers, batch * kv_heads * max_length * head_dim] ping-pong cache
        self._batch, self._cur, self._past_len = 0, 0, 0
        self._past: list[np.ndarray] = []  # the io_binding=False path keeps onnxruntime's outputs here
        self._binding = None

    # ------------------------------------------------------------------------------------------ Runtime API
    def reset(self) -> None:
        self._cur, self._past_len, self._past = 0, 0, []

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.reset()
        if self.io_binding:
            self._ensure_buffers(ids.shape[0])
        return self._step(ids)

    def decode_step(self, ids: np.ndarray) -> np.ndarray:
        return self._step(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1, 1))

    def forward_logits(self, ids: np.ndarray) -> np.ndarray:
        """[B, T] -> [B, T, V] with an empty cache; leaves the generation cache untouched."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        feeds = self._token_feeds(ids, 0, every=True)
        empty = np.zeros((ids.shape[0], self.kv_heads, 0, self.head_dim), self.kv_dtype)
        feeds.update({n: empty for n in self.past_names})
        return self.session.run(["logits"], feeds)[0].astype(np.float32, copy=False)

    def memory_report(self) -> dict:
        rep = {"rss_bytes": process_rss_bytes()}
        if self._bufs is not None:
            rep["kv_cache_bytes"] = int(self._bufs.nbytes)
        return rep

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"runtime": self.name, "device": self.device, "threads": self.threads, "threads_why": self.threads_why,
                "onnxruntime": ort.__version__,
                "io_binding": self.io_binding, "shared_kv_buffer": self.share_buffer, "max_length": self.max_length,
                "precision": self.extra.get("precision", "fp32"), "made_by": self.extra.get("made_by", "unknown")}

    # ------------------------------------------------------------------------------------------ internals
    def _token_feeds(self, ids: np.ndarray, past_len: int, every: bool = False) -> dict:
        b, s = ids.shape
        feeds = {"input_ids": ids}
        if self.last_only:  # every position for perplexity, else the last one (all generation reads)
            feeds["logits_positions"] = np.arange(0 if every else s - 1, s, dtype=np.int64)
        if self.has_mask:
            feeds["attention_mask"] = np.ones((b, past_len + s), np.int64)
        if self.has_positions:
            feeds["position_ids"] = np.ascontiguousarray(np.broadcast_to(np.arange(past_len, past_len + s), (b, s)))
        return feeds

    def _ensure_buffers(self, batch: int) -> None:
        n = batch * self.kv_heads * self.max_length * self.head_dim
        if self._bufs is None or self._batch != batch:
            self._bufs = np.zeros((1 if self.share_buffer else 2, len(self.past_names), n), self.kv_dtype)
            self._decode_logits = np.empty((batch, 1, self.vocab), self.logits_dtype)
            self._batch = batch
            self._binding = self.session.io_binding()
            if self.share_buffer:  # bound once: GQA writes position `past` of the same buffer it reads
                shape = [batch, self.kv_heads, self.max_length, self.head_dim]
                for j, (pn, qn) in enumerate(zip(self.past_names, self.present_names)):
                    ptr = self._bufs[0, j].ctypes.data
                    self._binding.bind_input(pn, "cpu", 0, self.kv_dtype, shape, ptr)
                    self._binding.bind_output(qn, "cpu", 0, self.kv_dtype, shape, ptr)

    def _step(self, ids: np.ndarray) -> np.ndarray:
        b, s = ids.shape
        past, total = self._past_len, self._past_len + s
        if total > self.max_length:
            raise ConfigError(f"the sequence reached {total} tokens, past this runtime's cache of {self.max_length}",
                              "generate fewer tokens, or open the runtime with a larger max_length")
        if self._past_len and b != (self._batch if self.io_binding else self._past[0].shape[0]):
            raise ConfigError(f"decode batch {b} differs from the prefill batch", "decode with the prefill's batch size")
        feeds = self._token_feeds(ids, past)
        if not self.io_binding:
            kv = self._past or [np.zeros((b, self.kv_heads, 0, self.head_dim), self.kv_dtype)] * len(self.past_names)
            out = self.session.run(None, {**feeds, **dict(zip(self.past_names, kv))})
            names = [o.name for o in self.session.get_outputs()]
            self._past = [out[names.index(n)] for n in self.present_names]
            self._past_len = total
            return out[names.index("logits")][:, -1].astype(np.float32, copy=False)
        bind = self._binding
        for name, value in feeds.items():
            bind.bind_cpu_input(name, value)
        logits = self._decode_logits if s == 1 or self.last_only else np.empty((b, s, self.vocab), self.logits_dtype)
        if self.share_buffer:
            bind.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
            self.session.run_with_iobinding(bind)
            self._past_len = total
            return logits[:, -1].astype(np.float32, copy=True)
        src, dst, et = self._bufs[self._cur], self._bufs[1 - self._cur], self.kv_dtype
        for j, name in enumerate(self.past_names):
            if past == 0:
                bind.bind_cpu_input(name, np.zeros((b, self.kv_heads, 0, self.head_dim), et))
            else:
                bind.bind_input(name, "cpu", 0, et, [b, self.kv_heads, past, self.head_dim], src[j].ctypes.data)
        for j, name in enumerate(self.present_names):
            bind.bind_output(name, "cpu", 0, et, [b, self.kv_heads, total, self.head_dim], dst[j].ctypes.data)
        bind.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(bind)
        self._cur, self._past_len = 1 - self._cur, total
        return logits[:, -1].astype(np.float32, copy=True)


def _open(art, threads=None, device: str = "cpu", io_binding: bool = True, max_length: int | None = None) -> OrtRuntime:
    if art.format != "onnx":
        raise ArtifactError(f"the onnxruntime runtime runs 'onnx' artifacts; '{art.path}' is '{art.format}'",
                            "export it first: edgepack export onnx MODEL -o OUT (or edgepack compile)")
    return OrtRuntime(art.path, art.extra, threads=threads, io_binding=io_binding, max_length=max_length, device=device)


def open_ort_runtime(art, threads: int | None = None, device: str = "cpu", io_binding: bool = True,
                     max_length: int | None = None, **_) -> OrtRuntime:
    return _open(art, threads, device, io_binding, max_length)


def open_onnx_scorer(art):
    """Scorer for compress.evaluate: (logits_fn, tokenizer_dir, max_positions) for an 'onnx' artifact."""
    rt = _open(art)
    return rt.forward_logits, art.path, art.extra.get("max_positions")
