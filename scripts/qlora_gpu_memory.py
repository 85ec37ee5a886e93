"""QLoRA (NF4 base, bf16 compute) vs bf16 LoRA on a 1B-shape Llama: training tokens/s and peak GPU memory, side by
side in one process. Random weights (the shape is what matters for memory and speed), stories260K tokenizer, the
tinyshakespeare text as data.

    .venv/bin/python scripts/qlora_gpu_memory.py [--steps 30] [--seq-len 512] [--batch-size 4]   # needs CUDA
    .venv/bin/python scripts/qlora_gpu_memory.py --shape tiny --steps 4                          # CPU smoke run

Peak memory = torch.cuda.max_memory_allocated during training (model resident, activations, optimizer), reset after
the reference evaluation. The issue's target: QLoRA peak <= 0.6x bf16 LoRA's. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHAPES = {  # Llama-3.2-1B-like (vocab cut to 32000) and a CPU-sized one for smoke runs
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}


def make_model(shape: str, path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgepack.hf import copy_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16 if shape == "1b" else torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    copy_tokenizer(SHARED / "models" / "stories260K", path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    import torch

    from edgepack.artifact import open_artifact
    from edgepack.output import print_table
    from edgepack.tune.qlora import TuneConfig, tune

    if args.shape == "1b" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: the 1B-shape comparison needs one (use --shape tiny for a CPU smoke run)")
    work = Path(tempfile.mkdtemp(prefix="qlora-gpu-"))
    src = open_artifact(make_model(args.shape, work / "base"))
    data = SHARED / "data" / "tinyshakespeare.txt"
    rows = []
    for method in ("qlora", "lora"):
        cfg = TuneConfig(data=str(data), method=method, steps=args.steps, seq_len=args.seq_len,
                         batch_size=args.batch_size, eval_every=args.steps, eval_blocks=8, patience=0,
                         save_every=10 ** 6, gradient_checkpointing=args.gradient_checkpointing, merge=False)
        m = tune(src, cfg, None, work / f"out-{method}", force=True).history[-1]["metrics"]
        rows.append({"method": method, "compute_dtype": m["compute_dtype"], "layers_4bit": m["layers_4bit"],
                     "tokens_per_s": m["tokens_per_s"], "peak_memory_gib": round(m["peak_memory_bytes"] / 2 ** 30, 3),
                     "peak_memory_kind": m["peak_memory_kind"], "train_seconds": m["train_seconds"]})
    ratio = rows[0]["peak_memory_gib"] / rows[1]["peak_memory_gib"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print_table(f"QLoRA vs LoRA, {args.shape} shape, {args.batch_size}x{args.seq_len} tokens/step, {device}",
                ["method", "compute", "4-bit layers", "tokens/s", "peak GiB"],
                [[r["method"], r["compute_dtype"], r["layers_4bit"], r["tokens_per_s"], r["peak_memory_gib"]] for r in rows],
                caption=f"QLoRA / LoRA peak memory = {ratio:.2f} (target <= 0.6)")
    print(json.dumps({"bench": "qlora_gpu_memory", "shape": args.shape, "device": device,
                      "peak_ratio": round(ratio, 3), "results": rows}))


if __name__ == "__main__":
    main()
