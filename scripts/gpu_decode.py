"""Decode speed of the GPU runtimes against transformers `generate`, on a Llama built from a config (random weights:
speed does not depend on the values). Run on the GPU machine:

    python scripts/gpu_decode.py --target h100-sxm            # 1B shape, bf16, prompt 128, 256 new tokens

Variants (each on a fresh model with the same seed): hf-generate (baseline, same run), graph (static cache + CUDA
graph), graph+compile (torch.compile'd step inside the graph), int8 / int4 / fp8 (torchao weight-only, under
compile + graph; fp8 only on sm_89+). Per variant: decode tokens/s, % of the target's bandwidth limit (tokens/s x
bytes read per token from `edgepack fit`), prefill tokens/s, TTFT, peak GPU memory vs fit's prediction for the same
precision and context (= prompt + new tokens, the static cache length). Prints a table; the last line is JSON.
`--device cpu --shape tiny` is the smoke test of this script on a machine without a GPU (static cache, no graph).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
GPU_VARIANTS = ("hf-generate", "graph", "graph+compile", "int8", "int4", "fp8")
CPU_VARIANTS = ("hf-generate", "static")
PRECISION = {"int8": "int8", "int4": "int4", "fp8": "fp8"}


def build_model(shape: str, dtype, device: str, context: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # tied embeddings as in Llama-3.2-1B (1.24B parameters with this shape)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(context, 2048), tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def _sync(device: str):
    import torch

    return (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)


def run_hf(model, prompt, new_tokens: int, device: str) -> dict:
    import torch

    sync, x = _sync(device), torch.as_tensor(prompt, device=device)

    def gen(n):
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
        sync()
        return time.perf_counter() - t0

    gen(4)  # warm-up
    ttft, total = gen(1), gen(new_tokens)
    return {"decode_tokens_per_s": (new_tokens - 1) / (total - ttft), "ttft_s": ttft,
            "prefill_tokens_per_s": x.shape[1] / ttft}


def run_runtime(rt, prompt, new_tokens: int, device: str) -> dict:
    from edgepack.deploy.generation import GenerationConfig, generate

    t0 = time.perf_counter()
    generate(rt, prompt, GenerationConfig(max_new_tokens=4))  # allocation, capture, compilation
    setup = time.perf_counter() - t0
    res = generate(rt, prompt, GenerationConfig(max_new_tokens=new_tokens))
    return {"decode_tokens_per_s": res.decode_tokens_per_s, "ttft_s": res.ttft_s,
            "prefill_tokens_per_s": res.prefill_tokens_per_s, "setup_s": setup}


def run_variant(name: str, args, target) -> dict:
    import numpy as np
    import torch

    from edgepack.deploy.torch_cuda import TorchCudaRuntime, quantize_for_cuda
    from edgepack.targets.fit import fit

    dtype = getattr(torch, args.dtype)
    context = args.prompt + args.new_tokens
    cuda = args.device.startswith("cuda")
    gc.collect()  # the previous variant's model, cache and graph pool
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(args.shape, dtype, args.device, context)
    prompt = np.random.default_rng(1).integers(3, model.config.vocab_size, (1, args.prompt))
    precision = PRECISION.get(name, {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype])
    kernel = quantize_for_cuda(model, precision, args.device)
    if name == "hf-generate":
        row = run_hf(model, prompt, args.new_tokens, args.device)
    else:
        rt = TorchCudaRuntime(model, max_context=context, use_cuda_graph=cuda and name != "static",
                              torch_compile=cuda and name not in ("graph", "static"), precision=precision, kernel=kernel)
        row = run_runtime(rt, prompt, args.new_tokens, args.device)
        row["capture_s"] = rt.capture_seconds
    rep = fit(model.config.to_dict(), target, precision=precision, context=context, check_support=False)
    row.update({"variant": name, "precision": precision, "kernel": kernel,
                "pct_of_bandwidth": 100 * row["decode_tokens_per_s"] * rep.bytes_per_token / target.bandwidth_bytes_per_s,
                "fit_required_bytes": rep.required_bytes})
    if cuda:
        context_bytes = args.cuda_context_bytes
        row["peak_gpu_bytes"] = int(torch.cuda.max_memory_reserved()) + context_bytes
        row["peak_vs_fit"] = row["peak_gpu_bytes"] / rep.required_bytes
    del model
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="h100-sxm", help="target profile for bandwidth and fit (default h100-sxm)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--variants", help="comma-separated subset of " + ", ".join(GPU_VARIANTS))
    args = p.parse_args(argv)
    import torch

    from edgepack.targets import load_target

    target = load_target(args.target)
    cuda = args.device.startswith("cuda")
    variants = args.variants.split(",") if args.variants else list(GPU_VARIANTS if cuda else CPU_VARIANTS)
    args.cuda_context_bytes = 0
    info = {"device": args.device, "torch": torch.__version__}
    if cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        args.cuda_context_bytes = int(total - free - torch.cuda.memory_reserved())  # context + libraries
        info.update({"gpu": torch.cuda.get_device_name(), "sm": "".join(map(str, torch.cuda.get_device_capability()))})
        if torch.cuda.get_device_capability() < (8, 9):
            variants = [v for v in variants if v != "fp8"]
    rows = [run_variant(v, args, target) for v in variants]
    base = next((r["decode_tokens_per_s"] for r in rows if r["variant"] == "hf-generate"), None)
    print(f"{'variant':15} {'decode tok/s':>12} {'% bw':>6} {'x hf':>6} {'prefill tok/s':>13} {'TTFT ms':>8} "
          f"{'peak GiB':>9} {'/fit':>5}")
    for r in rows:
        speedup = r["decode_tokens_per_s"] / base if base else float("nan")
        peak = r.get("peak_gpu_bytes")
        print(f"{r['variant']:15} {r['decode_tokens_per_s']:12.1f} {r['pct_of_bandwidth']:6.1f} {speedup:6.2f} "
              f"{r['prefill_tokens_per_s']:13.0f} {r['ttft_s'] * 1e3:8.2f} "
              f"{(peak / 2**30 if peak else float('nan')):9.2f} {r.get('peak_vs_fit', float('nan')):5.2f}")
    out = {**info, "target": target.name, "shape": args.shape, "dtype": args.dtype, "prompt": args.prompt,
           "new_tokens": args.new_tokens, "rows": rows}
    print(json.dumps(out, default=str))
    return out


if __name__ == "__main__":
    main()
