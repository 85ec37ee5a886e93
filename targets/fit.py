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
# Families whose q/k/v projections carry a bias without saying so with `attention_bias` (Qwen2, its MoE, R1-Distill)
_QKV_BIAS = {"qwen2", "qwen2_moe"}
_QK_NORM = {"qwen3", "qwen3_moe", "gemma3", "gemma3_text"}  # an RMSNorm over head_dim on queries and on keys
_SANDWICH_NORM = {"gemma2", "gemma3", "gemma3_text"}  # norms before and after both attention and MLP: 4 per layer


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    intermediate: int  # dense MLP width (the MLP of every layer of a dense model, of the dense layers of an MoE)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated_mlp: bool
    experts: int  # routed experts per MoE layer; 0 = dense
    experts_per_token: int
    moe_layers: int = 0  # layers whose MLP is the MoE block (the others keep the dense MLP)
    expert_intermediate: int = 0  # width of one routed expert's MLP (moe_intermediate_size)
    shared_intermediate: int = 0  # total width of the always-active shared expert(s) of an MoE layer
    shared_gate: bool = False  # Qwen2-MoE: a sigmoid gate Linear(hidden, 1) on the shared expert
    qkv_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    # MLA (DeepSeek-V2/V3): queries through an optional low-rank q_lora_rank, keys and values from one latent of
    # kv_lora_rank (+ a shared rope key of qk_rope_head_dim) that is what the KV cache holds; 0 = ordinary attention
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attention_params(self) -> int:
        """Linear (and MLA's latent-norm) parameters of one layer's attention."""
        if self.mla:
            qk = self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
            q = self.hidden * qk if not self.q_lora_rank else (self.hidden + 1) * self.q_lora_rank + self.q_lora_rank * qk
            kv = (self.hidden * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim))
            return q + kv + self.heads * self.v_head_dim * self.hidden
        bias = self.head_dim * (self.heads + 2 * self.kv_heads) if self.qkv_bias else 0
        return self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads) + bias

    @property
    def attention_rows(self) -> int:
        if self.mla:
            q = self.heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
            return (q + self.q_lora_rank + self.kv_lora_rank + self.qk_rope_head_dim
                    + self.heads * (self.qk_nope_head_dim + self.v_head_dim) + self.hidden)
        return self.head_dim * (self.heads + 2 * self.kv_heads) + self.hidden

    def _mlp(self, width: int) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden * width

    def _mlp_rows(self, width: int) -> int:
        return (2 * width + self.hidden) if self.gated_mlp else (width + self.hidden)

    @property
    def router_params(self) -> int:
        """Per MoE layer: the router Linear(hidden, experts) (+ the shared expert's gate), kept high precision."""
        return self.hidden * self.experts + (self.hidden if self.shared_gate else 0)

    def _moe_layer_params(self, routed: int) -> int:
        return routed * self._mlp(self.expert_intermediate) + self._mlp(self.shared_intermediate) + self.router_params

    @property
    def block_linear_params(self) -> int:
        """Parameters in the linear layers of all blocks (all experts resident)."""
        dense = self.layers - self.moe_layers
        return (self.layers * self.attention_params + dense * self._mlp(self.intermediate)
                + self.moe_layers * self._moe_layer_params(self.experts))

    @property
    def block_linear_rows(self) -> int:
        """Output rows (channels) of all block linears: what per-channel scales count."""
        moe = (self.experts * self._mlp_rows(self.expert_intermediate)
               + (self._mlp_rows(self.shared_intermediate) if self.shared_intermediate else 0))
        return (self.layers * self.attention_rows + (self.layers - self.moe_layers) * self._mlp_rows(self.intermediate)
                + self.moe_layers * moe)

    @property
    def active_block_linear_params(self) -> int:
        """Linear parameters read per token: of an MoE only the router, the shared and the routed experts."""
        dense = self.layers - self.moe_layers
        return (self.layers * self.attention_params + dense * self._mlp(self.intermediate)
                + self.moe_layers * self._moe_layer_params(self.experts_per_token))

    @property
    def kv_elements_per_token(self) -> int:
        """KV cache elements per token of context, all layers: keys and values per kv head, or MLA's one latent
        (kv_lora_rank) plus the shared rope key per layer, which is what an MLA runtime caches."""
        if self.mla:
            return self.layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return 2 * self.layers * self.kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (self.norms_per_layer * self.layers + 1) * self.hidden + (2 * self.layers * self.head_dim
                                                                          if self.qk_norm else 0)

    @property
    def total_params(self) -> int:
        return self.block_linear_params + self.embedding_params + self.lm_head_params + self.norm_params

    @property
    def active_params(self) -> int:
        """Parameters one token computes with (an MoE's 'activated' count; embeddings included, as published)."""
        return self.active_block_linear_params + self.embedding_params + self.lm_head_params + self.norm_params


def _get(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _moe_layer_count(cfg: dict, layers: int, experts: int) -> int:
    """Layers whose MLP is the MoE block: DeepSeek's first_k_dense_replace / moe_layer_freq, Qwen-MoE's
    decoder_sparse_step / mlp_only_layers; Mixtral-style configs route in every layer."""
    if not experts:
        return 0
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:
        first, freq = int(cfg.get("first_k_dense_replace") or 0), int(cfg.get("moe_layer_freq") or 1)
        return sum(1 for i in range(layers) if i >= first and i % freq == 0)
    step, only = int(cfg.get("decoder_sparse_step") or 1), set(cfg.get("mlp_only_layers") or ())
    return sum(1 for i in range(layers) if i not in only and (i + 1) % step == 0)


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
    intermediate = _get(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    experts = int(_get(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    expert_width = int(_get(cfg, "moe_intermediate_size", default=intermediate))
    shared = int(_get(cfg, "shared_expert_intermediate_size", default=0) or 0)
    if not shared and cfg.get("n_shared_experts"):  # DeepSeek: n shared experts of the routed experts' width
        shared = int(cfg["n_shared_experts"]) * expert_width
    mla = int(cfg.get("kv_lora_rank") or 0)
    return ModelShape(
        model_type=mt, hidden=hidden, layers=layers, heads=heads, vocab=vocab, intermediate=intermediate,
        kv_heads=_get(cfg, "num_key_value_heads", "num_kv_heads", default=heads),
        head_dim=_get(cfg, "head_dim", default=hidden // heads),
        tied=bool(cfg.get("tie_word_embeddings", mt in _UNGATED_MLP)),
        gated_mlp=mt not in _UNGATED_MLP,
        experts=experts,
        experts_per_token=int(_get(cfg, "num_experts_per_tok", "moe_topk", default=2)),
        moe_layers=_moe_layer_count(cfg, layers, experts), expert_intermediate=expert_width if experts else 0,
        shared_intermediate=shared if experts else 0, shared_gate=bool(experts and shared and mt == "qwen2_moe"),
        qkv_bias=bool(cfg.get("attention_bias", mt in _QKV_BIAS)), qk_norm=mt in _QK_NORM,
        norms_per_layer=4 if mt in _SANDWICH_NORM else 2,
        kv_lora_rank=mla, q_lora_rank=int(cfg.get("q_lora_rank") or 0) if mla else 0,
        qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0) if mla else 0,
        qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0) if mla else 0,
        v_head_dim=int(cfg.get("v_head_dim") or 0) if mla else 0,
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
    active_params: int = 0  # parameters read per decoded token (< params for an MoE: only the routed experts)
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
    if not 1 <= group_size <= 1 << 20:
        raise ConfigError(f"--group-size {group_size} is not a group size", "weights per scale: e.g. 32, 64 or 128")
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
    kv = s.kv_elements_per_token * context * batch * act
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
        note="roofline prediction (bandwidth / bytes read per decode step), not a measurement"
             + (f"; MoE: all {s.experts} experts resident, {s.experts_per_token} read per token" if s.experts else "")
             + ("; MLA: the KV cache is the latent (kv_lora_rank + rope key per layer), as MLA runtimes keep it; "
                "transformers' eager cache holds the expanded keys and values" if s.mla else ""),
        active_params=s.active_params,
        build_bytes=build, build_fits=None if build is None else build <= target.usable_memory_bytes,
        decode_limit_by_mode=modes,
    )


def what_would_fit(cfg: dict, target: Target, precision: str, context: int, batch: int = 1,
                   group_size: int = _DEFAULT_GROUP, runtime: str | None = None) -> list[str]:
    """When `cfg` does not fit: what would, changing one thing at a time: a smaller precision this target runs, a
    shorter context at this precision, or another packaged target at this precision and context."""
    from edgepack.targets.profile import list_targets, load_target

    out = []
    smaller = []
    for p in PRECISIONS:
        if p != precision and target.supports(precision=p):
            r = fit(cfg, target, p, context, batch, group_size, runtime=runtime)
            if r.fits:
                smaller.append((r.required_bytes, f"{p} on {target.name} (needs {r.required_bytes / 2**30:.2f} of "
                                                  f"{r.usable_bytes / 2**30:.2f} GiB)"))
    if smaller:
        out.append(min(smaller)[1])
    ctx = context // 2
    while ctx >= 128:
        r = fit(cfg, target, precision, ctx, batch, group_size, runtime=runtime)
        if r.fits:
            out.append(f"context {ctx} at {precision} on {target.name} (needs {r.required_bytes / 2**30:.2f} GiB)")
            break
        ctx //= 2
    others = []
    for name in list_targets():
        if name in ("local", target.name):
            continue
        t = load_target(name)
        if t.supports(precision=precision):
            r = fit(cfg, t, precision, context, batch, group_size)
            if r.fits:
                others.append((r.usable_bytes, f"target {name} at {precision}, context {context} (usable "
                                               f"{r.usable_bytes / 2**30:.1f} GiB)"))
    if others:
        out.append(min(others)[1])
    return out or ["nothing changing one of precision, context or target: shard the model or use a larger device"]


def trt_workspace_bytes(engine_bytes: float, target: Target) -> int:
    """TensorRT's workspace pool: a quarter of the usable memory left after the engine, 256 MiB .. 4 GiB."""
    return int(max(256 * MIB, min(4 * 1024 * MIB, (target.usable_memory_bytes - engine_bytes) // 4)) // MIB * MIB)


def trt_build_bytes(engine_bytes: float, target: Target) -> int:
    """Memory an engine build needs: workspace + BUILD_WEIGHT_COPIES x the graph's weights."""
    return int(trt_workspace_bytes(engine_bytes, target) + BUILD_WEIGHT_COPIES * engine_bytes)
