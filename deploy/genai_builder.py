"""The second ONNX path: onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder`).

It writes a hand-built graph rather than an export: fused GroupQueryAttention, SkipSimplifiedLayerNormalization,
MatMulNBits for every linear including lm_head, and a 4-bit embedding (GatherBlockQuantized) at int4: about 80
nodes for a 5-layer Llama where torch.onnx writes several hundred, so less per-token overhead on a CPU. Its inputs
and outputs use the same names as our export (input_ids, attention_mask, past_key_values.N.key/value ->
logits, present.N.key/value; no position_ids), so `OrtRuntime` runs it as it is.

Limits, checked before building: the CPU GroupQueryAttention kernel needs head_dim to be a multiple of 16 (so
stories260K, head_dim 8, cannot use it); the builder offers fp32 / fp16 / bf16 / int4, not int8.
The artifact records `made_by = "onnxruntime-genai builder <version>"` and the builder's options. At int4 our
defaults (GENAI_INT4_DEFAULTS) keep the embedding fp32 and lm_head int8 and use k_quant for the body.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgepack.errors import ConfigError, MissingDependency, UnsupportedOnTarget, ValidationFailed

GENAI_PRECISIONS = {"fp32": "fp32", "int4": "int4"}  # edgepack precision -> builder -p
GQA_HEAD_MULTIPLE = 16  # onnxruntime CPU GroupQueryAttention: "head_size shall be a multiple of 16"
# The builder's int4 defaults (RTN, 4 bits everywhere incl. lm_head and the embedding Gather) cost too much quality:
# logit SQNR -2.9 dB on a random 25M Llama, against 9.2 dB for llama.cpp Q4_0. Ours by default: the embedding stays
# fp32 (a Gather, free at decode), lm_head at int8 (the most output-sensitive matrix, as llama.cpp's Q6_K output),
# the body int4 with k_quant's scale search. Chosen by scripts/cpu_vs_llamacpp.py (see the README table).
# Option names as onnxruntime-genai 0.18 reads them: its help calls the old int4_-prefixed names (int4_block_size,
# int4_accuracy_level, ...) deprecated aliases, but its parser ignores them silently (checked: block 128 built 32).
GENAI_INT4_DEFAULTS = {"op_types_to_quantize": "MatMul", "algo_config": "k_quant",
                       "matmul_mixed_precision": "last_matmul:int8"}


def builder_options(precision: str, accuracy_level: int = 4, block_size: int = 32,
                    overrides: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The builder's --extra_options as KEY=VALUE strings: accuracy level and block size, then GENAI_INT4_DEFAULTS,
    then `overrides` ("KEY=VALUE" replaces or adds a key, "KEY=" drops it; "builder-defaults" first drops every
    default of ours, leaving the builder's own). fp32 takes no quantization options."""
    if precision != "int4":
        if overrides:
            raise ConfigError(f"genai builder options apply to int4 only, not {precision}",
                              "drop the genai options or compile at int4")
        return []
    opts = {"accuracy_level": str(accuracy_level), "block_size": str(block_size), **GENAI_INT4_DEFAULTS}
    for item in overrides:
        if item == "builder-defaults":
            for key in GENAI_INT4_DEFAULTS:
                opts.pop(key, None)
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"genai builder option '{item}' is not KEY=VALUE",
                              "write e.g. algo_config=rtn, matmul_mixed_precision=, or builder-defaults")
        if value:
            opts[key.strip()] = value
        else:
            opts.pop(key.strip(), None)
    return [f"{k}={v}" for k, v in opts.items()]


def genai_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError:
        raise MissingDependency("onnxruntime_genai", "genai", "the onnxruntime-genai model builder path") from None


def vocab_width_clash(model_config: dict) -> list[str]:
    """Decoder matrices as wide as the vocabulary. The builder takes every nn.Linear with out_features == vocab_size
    for lm_head (builders/base.py has_lm_head), so such a model gets its logits wired to the wrong tensor (seen: MLP
    512 = vocab 512 -> logit SQNR 3 dB against PyTorch, even at fp32)."""
    from edgepack.targets.fit import model_shape

    s = model_shape(model_config)  # reads every family's names (GPT-2's n_embd / n_head too)
    widths = {"hidden_size": s.hidden, "intermediate_size": s.intermediate, "q_proj": s.heads * s.head_dim,
              "k_proj/v_proj": s.kv_heads * s.head_dim}
    return [k for k, v in widths.items() if v == s.vocab]


def check_genai(model_config: dict, precision: str) -> None:
    """Everything that can refuse the builder path, from config.json alone."""
    genai_version()
    if precision not in GENAI_PRECISIONS:
        raise ConfigError(f"the onnxruntime-genai builder does not write {precision}",
                          f"use builder = \"edgepack\" for {precision}, or one of {', '.join(GENAI_PRECISIONS)}")
    from edgepack.targets.fit import model_shape

    head_dim = model_shape(model_config).head_dim
    if head_dim % GQA_HEAD_MULTIPLE:
        raise UnsupportedOnTarget(
            f"onnxruntime's CPU GroupQueryAttention needs head_dim to be a multiple of {GQA_HEAD_MULTIPLE}; "
            f"this model's is {head_dim}", "use builder = \"edgepack\" (torch.onnx export) for this model")
    clash = vocab_width_clash(model_config)
    if clash:
        raise UnsupportedOnTarget(
            f"the onnxruntime-genai builder mistakes a Linear of out_features == vocab_size "
            f"({model_config['vocab_size']}) for lm_head; this model's {', '.join(clash)} is that wide",
            "use builder = \"edgepack\" (torch.onnx export) for this model")


def build_genai(src_dir: Path, dst: Path, precision: str, *, accuracy_level: int = 4, block_size: int = 32,
                options: tuple[str, ...] | list[str] = ()) -> dict:
    """Run the builder into dst (model.onnx + model.onnx.data + genai_config.json + tokenizer); return `extra`."""
    from edgepack.facts import read_model_config
    from edgepack.hf import copy_tokenizer

    cfg = read_model_config(src_dir)
    check_genai(cfg, precision)
    dst.mkdir(parents=True, exist_ok=True)
    cache = dst.parent / f".{dst.name}.genai-cache"
    options = builder_options(precision, accuracy_level, block_size, options)
    # the builder with its CPU k_quant in chunks (deploy/genai_run.py: the same codes, bounded memory)
    from edgepack.deploy.genai_run import RUN_BUILDER

    cmd = [sys.executable, "-c", RUN_BUILDER, "-i", str(src_dir), "-o", str(dst),
           "-p", GENAI_PRECISIONS[precision], "-e", "cpu", "-c", str(cache)]
    if options:
        cmd += ["--extra_options", *options]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not (dst / "model.onnx").is_file():
        raise ValidationFailed("the onnxruntime-genai builder failed: " + (r.stderr.strip().splitlines() or ["?"])[-1],
                               "run the builder by hand to see its full log: " + " ".join(cmd))
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    copy_tokenizer(src_dir, dst)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    full = json.loads((dst / "genai_config.json").read_text())
    gcfg, dec = full["model"], full["model"]["decoder"]
    return {"onnx_file": dec["filename"], "num_layers": dec["num_hidden_layers"],
            "num_kv_heads": dec["num_key_value_heads"], "head_dim": dec["head_size"], "vocab_size": gcfg["vocab_size"],
            "max_positions": gcfg["context_length"], "dtype": "float32", "kv_dtype": "float32", "precision": precision,
            "made_by": f"onnxruntime-genai builder {genai_version()}",
            # GroupQueryAttention reads past from and writes present into one max-length buffer (see OrtRuntime)
            "past_present_share_buffer": bool(full.get("search", {}).get("past_present_share_buffer", False)),
            "builder_options": {"precision": GENAI_PRECISIONS[precision], "execution_provider": "cpu",
                                "extra_options": options}}
