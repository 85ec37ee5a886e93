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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgepack.hf import copy_tokenizer
    from edgepack.sources import embedded_path

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_25M)).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    copy_tokenizer(embedded_path("stories260K"), path)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {path}: {n:,} parameters (random weights, seed {seed})", file=sys.stderr)
    return path
