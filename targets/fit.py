"""Will a model fit a target, and how fast can it decode at best? Reads only the model's config.json.

Memory = weights (at the chosen precision) + KV cache + runtime workspace, compared with the target's *usable*
memory (on Jetson the OS and CPU side share it). Decode at batch 1 is bandwidth-bound: every generated token reads
all block weights, the lm_head and the whole KV cache once, so tokens/s <= bandwidth / bytes read per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgepack.errors import ConfigError, UnsupportedOnTarget
from edgepack.formats import PRECISIONS
from edgepack.targets.profile import Target

MIB = 1024**2

# Bytes per stored weight. Quantized formats add their scales/zero-points per group of `group_size` weights.
_WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5, "nf4": 0.5}
_SCALE_BYTES_PER_GROUP = {"int4": 2.5, "nf4": 0.53}  # int4: fp16 scale + 4-bit zero; nf4: fp32 absmax double-quantized to 8 bit (+ 2nd level)
# Where a runtime stores its scales differently: torch-cuda's int4 (tinygemm) keeps a bf16 scale and a bf16 float
# zero per group (deploy/cuda_weights.py)
# zero per group (deploy/cuda_weights.py); TensorRT's Q/DQ graphs (compress/quant_qdq.py) an fp16 scale per
# block and per int8 channel, no zero points
_RUNTIME_SCALE_BYTES_PER_GROUP = {("torch-cuda", "int4"): 4.0, ("tensorrt", "int4"): 2.0}
_RUNTIME_SCALE_BYTES_PER_ROW = {("torch-cuda", "int8"): 4.0, ("torch-cuda", "fp8"): 4.0,  # an fp32 scale per channel
                                ("tensorrt", "int8"): 2.0}
# TensorRT engine build (deploy/tensorrt_build.py, whose pre-build check uses this through the build spec): besides
# its workspace the builder holds the parsed network's weights, its own copies of them (device memory, on Jetson the
# same DRAM) and the serialized plan, about 3 x the graph's weight bytes (estimate; measure on the device with the
# build record's peak_host_mem_used_bytes).
BUILD_WEIGHT_COPIES = 3
_DEFAULT_GROUP = 128

# Fixed runtime cost, bytes, by device type (measured or typical; see README "fit" section):
#   cpu:    Python + numpy + torch/transformers CPU libraries resident in the process: measured with
#           `edgepack bench` (torch-cpu, 1 thread, prompt 64 + 64 generated) on this project's 2-core x86-64 machine as
#           peak RSS minus fit's own weights + KV + workspace: 363 MiB for stories260K (1 MB of weights) and 364 MiB
#           for a 25.6M-parameter Llama (102 MB of fp32 weights); torch 2.13, transformers 5.23
#   gpu:    CUDA context + cuBLAS/cuDNN workspaces (~500-600 MiB on A100/H100 with torch)
#   jetson: CUDA context + TensorRT/torch libraries mapped into shared memory (~900 MiB on Orin, JetPack 6)
RUNTIME_OVERHEAD_BYTES = {"cpu": 360 * MIB, "gpu": 600 * MIB, "jetson": 900 * MIB}

# onnxruntime on a CPU is much lighter than torch but grows with the model. Measured with `edgepack bench` (prompt 64
# + 64 generated, batch 1) and per-phase RSS probes on this project's 2-core x86-64 machine, onnxruntime 1.32: the
# process with Python + numpy + onnxruntime + edgepack imported holds 66 MiB; a session adds ~14 MiB fixed; the
# session's prepacked weights plus the kernel buffers allocated by the first prefill and the first decode step add
# ~3 bytes per parameter whatever the weight precision (stories260K and a 25.6M-parameter Llama, fp32 / int8 / int4
# MatMulNBits: residuals 14-16 MiB and 83-96 MiB). The runtime's KV cache is two ping-pong buffers (read past,
# write present), so it holds the KV cache twice. Fitted on those 5 points, the prediction is within 5% of each.
ORT_CPU_FIXED_BYTES = 80 * MIB
ORT_CPU_BYTES_PER_PARAM = 3.0

# Decoder-only families whose MLP has two matrices instead of the gated three (up, gate, down).
_UNGATED_MLP = {"gpt2", "gpt_neox", "opt", "phi", "falcon", "bloom", "gpt_bigcode", "starcoder2"}


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated_mlp: bool
    experts: int  # 0 = dense
    experts_per_token: int

    @property
    def block_linear_params(self) -> int:
        """Parameters in the linear layers of all blocks (all experts)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o and k, v
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return self.layers * (attn + mlp * max(1, self.experts))

    @property
    def block_linear_rows(self) -> int:
        """Output rows (channels) of all block linears: what per-channel scales count."""
        attn = self.head_dim * (self.heads + 2 * self.kv_heads) + self.hidden
        mlp = (2 * self.intermediate + self.hidden) if self.gated_mlp else (self.intermediate + self.hidden)
        return self.layers * (attn + mlp * max(1, self.experts))

    @property
    def active_block_linear_params(self) -> int:
        """Linear parameters read per token (only the routed experts of an MoE)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return self.layers * (attn + mlp * (self.experts_per_token if self.experts else 1))

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        return self.block_linear_params + self.embedding_params + self.lm_head_params + self.norm_params


def _get(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def model_shape(cfg: dict) -> ModelShape:
    """Shape of a decoder-only transformer from its config.json dict (text_config for multimodal wrappers)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    hidden = _get(cfg, "hidden_size", "n_embd", "d_model")
    layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(cfg, "num_attention_heads", "n_head")
    vocab = _get(cfg, "vocab_size")
    missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("num_attention_heads", heads),
                              ("vocab_size", vocab)) if not isinstance(v, int) or v <= 0]
    if missing:
        raise ConfigError(f"config.json lacks positive integer {', '.join(missing)}",
                          "fit needs a decoder-only transformer config (Llama, Qwen, Mistral, GPT-2 style)")
    mt = str(cfg.get("model_type", "llama"))
    return ModelShape(
        model_type=mt, hidden=hidden, layers=layers, heads=heads, vocab=vocab,
        intermediate=_get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        kv_heads=_get(cfg, "num_key_value_heads", "num_kv_heads", default=heads),
        head_dim=_get(cfg, "head_dim", default=hidden // heads),
        tied=bool(cfg.get("tie_word_embeddings", mt in _UNGATED_MLP)),
        gated_mlp=mt not in _UNGATED_MLP,
        experts=int(_get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0),
        experts_per_token=int(_get(cfg, "num_experts_per_tok", "moe_topk", default=2)),
    )


def weight_bytes_per_param(precision: str, group_size: int = _DEFAULT_GROUP, runtime: str | None = None) -> float:
    scale = _RUNTIME_SCALE_BYTES_PER_GROUP.get((runtime, precision), _SCALE_BYTES_PER_GROUP.get(precision, 0.0))
    return _WEIGHT_BYTES[precision] + scale / group_size


def activation_bytes(precision: str, target: Target) -> int:
    """Bytes per activation / KV element: fp32 on CPUs and for fp32 models, 16-bit on GPUs otherwise."""
    return 4 if (precision == "fp32" or target.device_type == "cpu") else 2


@dataclass(frozen=True)
class FitReport:
    target: str
    precision: str
    context: int
    batch: int
    params: int
    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    required_bytes: int
    usable_bytes: int
    fits: bool
    headroom_bytes: int
    bytes_per_token: int
    decode_tokens_per_s_limit: float
    bandwidth_bytes_per_s: float
    note: str = ""
    build_bytes: int | None = None  # tensorrt: what the engine build needs (workspace + BUILD_WEIGHT_COPIES x weights)
    build_fits: bool | None = None
    decode_limit_by_mode: dict | None = None  # power mode -> tokens/s limit where the target lists bandwidth_modes

    def to_dict(self) -> dict:
        return asdict(self)


def fit(cfg: dict, target: Target, precision: str = "fp16", context: int = 2048, batch: int = 1,
        group_size: int = _DEFAULT_GROUP, check_support: bool = True, runtime: str | None = None) -> FitReport:
    """Memory and decode limit of `cfg` on `target`. `runtime` refines the fixed cost where it is measured per
    runtime (onnxruntime on CPUs); None = the device type's typical torch-based runtime."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'", f"use one of {', '.join(PRECISIONS)}")
    if context <= 0 or batch <= 0:
        raise ConfigError("--context and --batch must be positive", "e.g. --context 2048 --batch 1")
    if check_support and not target.supports(precision=precision):
        raise UnsupportedOnTarget(f"target '{target.name}' does not run {precision}",
                                  f"it supports: {', '.join(target.precisions)}")
    s = model_shape(cfg)
    act = activation_bytes(precision, target)
    quantized = precision not in ("fp32", "fp16", "bf16")
    wb = weight_bytes_per_param(precision, group_size, runtime)
    # Embedding table and lm_head stay at activation precision for weight-only formats (they are gathered / tiny
    # share of compute, and quantizing them costs the most quality).
    other = act if quantized else _WEIGHT_BYTES[precision]
    if runtime == "tensorrt" and quantized:  # Jetson Q/DQ graphs (quantize_embeddings): INT8 per row + fp16 scale
        other = _WEIGHT_BYTES["int8"] + 2.0 / s.hidden
    weights = s.block_linear_params * wb + (s.embedding_params + s.lm_head_params) * other + s.norm_params * act
    weights += s.block_linear_rows * _RUNTIME_SCALE_BYTES_PER_ROW.get((runtime, precision), 0.0)
    kv = 2 * s.layers * s.kv_heads * s.head_dim * context * batch * act
    ort_cpu = runtime == "onnxruntime" and target.device_type == "cpu"
    # Workspace: prefill activations for one full-length pass (residual, q/k/v/o, gated MLP intermediates), the
    # fp32 logits of one step, and on CPU runtimes the materialised attention scores (no fused attention kernel).
    prefill = batch * context * (4 * s.hidden + 3 * s.intermediate) * act
    logits = batch * s.vocab * 4
    scores = batch * s.heads * context * context * 4 if target.device_type == "cpu" else 0
    trt = runtime == "tensorrt"
    if ort_cpu:
        overhead = ORT_CPU_FIXED_BYTES + ORT_CPU_BYTES_PER_PARAM * s.total_params + kv  # + kv: the second buffer
    else:
        overhead = RUNTIME_OVERHEAD_BYTES[target.device_type]
    if trt:  # deploy/tensorrt_runtime.py: ping-pong KV buffers (a second cache); logits of the last position only
        overhead += kv
    workspace = prefill + logits + scores + overhead
    required = int(weights + kv + workspace)
    read_per_step = (s.active_block_linear_params * wb + s.lm_head_params * other
                     + (s.embedding_params * other if s.tied else 0) + kv)
    limit = batch * target.bandwidth_bytes_per_s / read_per_step
    build = int(trt_build_bytes(weights, target)) if trt else None
    modes = {m: round(batch * gb * 1e9 / read_per_step, 2) for m, gb in target.bandwidth_modes.items()} or None
    return FitReport(
        target=target.name, precision=precision, context=context, batch=batch, params=s.total_params,
        weights_bytes=int(weights), kv_cache_bytes=int(kv), workspace_bytes=int(workspace), required_bytes=required,
        usable_bytes=target.usable_memory_bytes, fits=required <= target.usable_memory_bytes,
        headroom_bytes=target.usable_memory_bytes - required, bytes_per_token=int(read_per_step / batch),
        decode_tokens_per_s_limit=round(limit, 2), bandwidth_bytes_per_s=target.bandwidth_bytes_per_s,
        note="roofline prediction (bandwidth / bytes read per decode step), not a measurement",
        build_bytes=build, build_fits=None if build is None else build <= target.usable_memory_bytes,
        decode_limit_by_mode=modes,
    )


def trt_workspace_bytes(engine_bytes: float, target: Target) -> int:
    """TensorRT's workspace pool: a quarter of the usable memory left after the engine, 256 MiB .. 4 GiB."""
    return int(max(256 * MIB, min(4 * 1024 * MIB, (target.usable_memory_bytes - engine_bytes) // 4)) // MIB * MIB)


def trt_build_bytes(engine_bytes: float, target: Target) -> int:
    """Memory an engine build needs: workspace + BUILD_WEIGHT_COPIES x the graph's weights."""
    return int(trt_workspace_bytes(engine_bytes, target) + BUILD_WEIGHT_COPIES * engine_bytes)
