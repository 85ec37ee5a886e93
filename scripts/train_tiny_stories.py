"""Train a small pretrained Llama that every CPU path can run, for the llama.cpp comparison (scripts/cpu_vs_llamacpp.py).

    .venv/bin/python scripts/train_tiny_stories.py -o OUT [--steps 200] [--layers 2] [--threads 2] [--seed 0]

Why: stories260K (head_dim 8, widths 64 / 172) cannot be built by onnxruntime-genai (its CPU GroupQueryAttention
needs head_dim % 16 == 0), and llama.cpp cannot block its matrices (K-quants need rows of 256, Q4_0 of 32), so no
one artifact can be compared on it. This model can: hidden 256, 8 heads x 32 (4 KV heads), MLP 768, 2 layers, vocab
512 with the stories260K tokenizer, untied embeddings (1.8M parameters): every width is a multiple of 256. Small,
because it trains in ~10-20 minutes on a shared 2-core CPU (200 steps x 8 x 128 tokens, about one epoch). The MLP
width must not equal the vocabulary size: onnxruntime-genai's builder takes any Linear with out_features == vocab
for lm_head (deploy/genai_builder.py refuses such models).

Data: the first 90 % of ../shared/data/tinystories-valid-sample.txt (cut at a line boundary, the same split the
quantize stage calibrates on); the rest is held out, and the comparison scores perplexity on it. Batches are random
256-token windows of the training stream from a seeded generator; AdamW, linear warm-up then cosine decay; torch
fp32 on the CPU. Same seed, steps and thread count -> the same checkpoint. Writes a Hugging Face checkpoint
(model.safetensors + config.json + the tokenizer) and train.json (loss curve, held-out perplexity, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEXT = SHARED / "data" / "tinystories-valid-sample.txt"
TOKENIZER = SHARED / "models" / "stories260K"
TRAIN_FRACTION = 0.9  # leading share of TEXT used for training; the rest is the held-out split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--mlp", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edgepack.hf import copy_tokenizer
    from edgepack.quality import PplProtocol, hf_logits_fn, perplexity, read_text, split_at_line, token_stream

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    text, digest = read_text(TEXT)
    train_text, held_text, _ = split_at_line(text, TRAIN_FRACTION)
    ids = torch.tensor(tok(train_text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    cfg = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine to 10 % of the peak
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([ids[s: s + args.seq_len] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss:.4f} lr {lr_at(step):.2e} {time.perf_counter() - t0:.0f} s", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    proto = PplProtocol(window=256, stride=128).resolved()
    with torch.no_grad():
        ppl = perplexity(hf_logits_fn(model), token_stream(tok, held_text, proto), proto).perplexity
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(TOKENIZER, out)
    rec = {"params": n_params, "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
           "seed": args.seed, "threads": args.threads, "train_tokens": len(ids), "text_sha256": digest,
           "train_s": round(train_s, 1), "heldout_ppl": ppl, "ppl_protocol": proto.describe(), "losses": losses}
    (out / "train.json").write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k != "losses"}))


if __name__ == "__main__":
    main()
