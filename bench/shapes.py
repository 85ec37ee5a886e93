"""Named model shapes for benchmarks and tests: real transformers config classes with random weights (seeded) and the
embedded stories260K tokenizer, so a measurement at a given size needs no hub download."""

from __future__ import annotations

import sys
from pathlib import Path

# 25M-parameter Llama: hidden 512, 8 layers, 8 heads (the llama2.c stories42M block shape) with the stories260K
# tokenizer (vocab 512, tied embeddings): 8 x (4 x 512^2 + 3 x 512 x 1376) + 512^2 = 25.56M parameters.
LLAMA_25M = dict(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=True, rms_norm_eps=1e-5)


def build_llama_25m(path: Path, seed: int = 0) -> Path:
    """Write the LLAMA_25M shape with random weights (seed) and the stories260K tokenizer to `path`."""
    return build_from_config({"model_type": "llama", **LLAMA_25M}, path, seed, "llama-25m")


def build_from_config(kw: dict, path: Path, seed: int, label: str) -> Path:
    """A transformers model of config `kw` (with model_type) with random weights (seed) and the stories260K tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgepack.hf import copy_tokenizer
    from edgepack.sources import embedded_path

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**kw)).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    copy_tokenizer(embedded_path("stories260K"), path)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}: {label}, {n:,} parameters (random weights, seed {seed})", file=sys.stderr)
    return path

# Real model shapes (issue 20) with random weights: SmolLM2-135M (Llama) and Qwen2.5-0.5B (Qwen2, q/k/v bias), both
# tied. The stories260K tokenizer covers ids < 512; the rest of the vocabulary is there for the shapes' sake
# (lm_head / embedding bytes), and benchmarks feed token ids, not text.
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
REAL_SHAPES = {"smollm2-135m": SMOLLM2_135M, "qwen2.5-0.5b": QWEN25_05B}


def build_shape(name: str, path: Path, seed: int = 0, layers: int | None = None) -> Path:
    """Write REAL_SHAPES[name] (optionally with fewer layers, for a quick run) with random weights to `path`."""
    kw = dict(REAL_SHAPES[name])
    if layers:
        kw["num_hidden_layers"] = layers
    return build_from_config(kw, path, seed, name)
