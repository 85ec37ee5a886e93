"""Which architecture families each stage handles, asked from config.json before any weights load, so a stage that
cannot treat a model refuses it in one line naming the architecture and the stage (never a traceback, never after
minutes of work). The families and what sets them apart:

    conv1d   GPT-2: projections are transformers `Conv1D` ([in, out] weights), which the quantizers and pruners,
             walking nn.Linear, do not see: nothing would be quantized or pruned while the stage reported success.
    fused    Phi-3: one `qkv_proj` and one `gate_up_proj` per layer. The linear walkers treat each as one matrix
             (right for GPTQ / AWQ / wanda / LoRA, whose groups are per input channel); width pruning removes MLP
             channels, which in `gate_up_proj` are two row ranges at once, so it refuses.
    moe      Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3: routed experts are 3-D parameters in transformers 5
             (not nn.Linear): quantize keeps them fp32 and says so in its record, width pruning refuses, the ONNX
             export routes them through batched matmuls.
    mla      DeepSeek-V2/V3 attention: keys of qk_nope + qk_rope dims, values of v_head_dim; the ONNX graph
             interface (one head_dim for past keys and values) and runtimes cannot hold that cache, so the ONNX
             paths refuse it.
"""

from __future__ import annotations

from edgepack.errors import UnsupportedOnTarget

CONV1D = frozenset({"gpt2"})
FUSED = frozenset({"phi3"})
MLA = frozenset({"deepseek_v2", "deepseek_v3"})
MOE = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"})


def arch(model_config: dict) -> str:
    cfg = model_config.get("text_config", model_config) if "hidden_size" not in model_config else model_config
    return str(cfg.get("model_type") or model_config.get("model_type") or "unknown")


def is_moe(model_config: dict) -> bool:
    cfg = model_config.get("text_config", model_config) if "hidden_size" not in model_config else model_config
    return arch(model_config) in MOE or bool(cfg.get("num_local_experts") or cfg.get("num_experts")
                                              or cfg.get("n_routed_experts"))


def is_mla(model_config: dict) -> bool:
    return arch(model_config) in MLA or bool(model_config.get("kv_lora_rank"))


def _refuse(stage: str, a: str, why: str, fix: str):
    raise UnsupportedOnTarget(f"{stage}: the '{a}' architecture is not supported: {why}", fix)


def check_arch(stage: str, model_config: dict | None, *, method: str | None = None, fmt: str | None = None) -> None:
    """Refuse (UnsupportedOnTarget) the cells of architecture x stage that cannot work; silent where they do.
    stage: quantize | prune | export | compile; method: the quantize / prune method; fmt: quantize's format."""
    if not model_config:
        return
    a = arch(model_config)
    onnx = stage in ("export", "compile") or (stage == "quantize" and fmt == "onnx")
    if a in CONV1D and stage in ("quantize", "prune"):
        _refuse(stage, a, "its projections are transformers Conv1D layers, which the quantizers and pruners (walking "
                "nn.Linear) do not see, so nothing would change", "compile it at fp32 (compile --precision fp32), or "
                "use a Llama / Qwen / Mistral-style checkpoint")
    if onnx and is_mla(model_config):
        _refuse(stage, a, "MLA attention caches keys and values of different head sizes, which the ONNX graph "
                "interface and the onnxruntime paths do not hold", "run it through the torch runtime (quantize "
                "--format torch, bench / serve the checkpoint), or pick a non-MLA model")
    if stage == "prune" and method == "width":
        if a in FUSED:
            _refuse(stage, a, "width pruning removes MLP channels, which the fused gate_up_proj holds as two row "
                    "ranges", "prune --method depth or wanda, or distill into a smaller student")
        if is_moe(model_config):
            _refuse(stage, a, "width pruning of routed experts is not implemented (each expert would need its own "
                    "channel choice by routed mass)", "prune --method depth or wanda, or distill into a smaller student")
