"""The second ONNX path: onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder`).

It writes a hand-built graph rather than an export: fused GroupQueryAttention, SkipSimplifiedLayerNormalization,
MatMulNBits for every linear including lm_head, and a 4-bit embedding (GatherBlockQuantized) at int4: about 80
nodes for a 5-layer Llama where torch.onnx writes several hundred, so less per-token overhead on a CPU. Its inputs
and outputs use the same names as our export (input_ids, attention_mask, past_key_values.N.key/value ->
logits, present.N.key/value; no position_ids), so `OrtRuntime` runs it as it is.

Limits, checked before building: the CPU GroupQueryAttention kernel needs head_dim to be a multiple of 16 (so
stories260K, head_dim 8, cannot use it); the builder offers fp32 / fp16 / bf16 / int4, not int8.
The artifact records `made_by = "onnxruntime-genai builder <version>"` and the builder's options.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgepack.errors import ConfigError, MissingDependency, UnsupportedOnTarget, ValidationFailed

GENAI_PRECISIONS = {"fp32": "fp32", "int4": "int4"}  # edgepack precision -> builder -p
GQA_HEAD_MULTIPLE = 16  # onnxruntime CPU GroupQueryAttention: "head_size shall be a multiple of 16"


def genai_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError:
        raise MissingDependency("onnxruntime_genai", "genai", "the onnxruntime-genai model builder path") from None


def check_genai(model_config: dict, precision: str) -> None:
    """Everything that can refuse the builder path, from config.json alone."""
    genai_version()
    if precision not in GENAI_PRECISIONS:
        raise ConfigError(f"the onnxruntime-genai builder does not write {precision}",
                          f"use builder = \"edgepack\" for {precision}, or one of {', '.join(GENAI_PRECISIONS)}")
    heads = model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    if head_dim % GQA_HEAD_MULTIPLE:
        raise UnsupportedOnTarget(
            f"onnxruntime's CPU GroupQueryAttention needs head_dim to be a multiple of {GQA_HEAD_MULTIPLE}; "
            f"this model's is {head_dim}", "use builder = \"edgepack\" (torch.onnx export) for this model")


def build_genai(src_dir: Path, dst: Path, precision: str, *, accuracy_level: int = 4, block_size: int = 32) -> dict:
    """Run the builder into dst (model.onnx + model.onnx.data + genai_config.json + tokenizer); return `extra`."""
    from edgepack.artifact import read_model_config
    from edgepack.hf import copy_tokenizer

    cfg = read_model_config(src_dir)
    check_genai(cfg, precision)
    dst.mkdir(parents=True, exist_ok=True)
    cache = dst.parent / f".{dst.name}.genai-cache"
    options = [f"int4_accuracy_level={accuracy_level}", f"int4_block_size={block_size}"] if precision == "int4" else []
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src_dir), "-o", str(dst),
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
