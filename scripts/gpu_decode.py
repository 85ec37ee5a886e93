"""Decode speed and memory of the torch-cuda runtime against transformers `generate`, on a Llama built from a config
(random weights: speed does not depend on the values). Run on the GPU machine (scripts/gpu_session.sh does):

    python scripts/gpu_decode.py --target local --out $OUT/gpu_decode.jsonl   # 1B shape, prompt 128, 256 new tokens

Every result is written as one JSON line the moment it is measured (--out; also printed), so a timeout loses only
the variant in progress; --deadline-s skips what would not finish in time, saying so. Variants, most important
first: hf-generate (transformers generate, bf16, eager: the baseline, same run), bf16 / int4 / int8 / fp8 (the
torch-cuda runtime: static cache, CUDA graphs per attended-length bucket, the low-bit weights written as a
torch-cuda artifact and loaded back through deploy/cuda_weights.build_model, i.e. the bundle path), then the same
with torch.compile (coordinate-descent tuning) to measure whether compiling pays for its seconds. fp8 only on
sm_89+. Per variant: decode tokens/s (steady state: one synchronization at the end) and the runtime's own
per-token-synchronized figure, % of the target's bandwidth limit (tokens/s x bytes read per token, from
`edgepack fit` for torch-cuda) and of the copy bandwidth measured here, prefill tokens/s, TTFT, setup seconds
(capture, compile), peak GPU memory against fit's prediction, and for the low-bit variants the load peak against
the artifact's size (no 16-bit copy). The summary line checks the issue's bars: bf16 >= 60% of the bandwidth limit,
int4 >= 1.8x bf16, fp8 faster than bf16, peak memory within 15% of fit; and per precision what compiling buys.
`--device cpu --shape tiny` runs the same mechanics on a machine without a GPU (no graphs, CPU kernels).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
GPU_VARIANTS = ("hf-generate", "bf16", "int4", "int8", "fp8", "bf16+compile", "int8+compile", "int4+compile",
                "fp8+compile")
CPU_VARIANTS = ("hf-generate", "fp32", "int8", "int4", "fp8")  # --device cpu --dtype float32: the mechanics
NEEDS_S = {"hf-generate": 40, "plain": 15, "compile": 75}  # rough seconds a variant needs on an H200 (deadline)
BARS = {"bf16_pct_of_bandwidth": 60.0, "int4_over_bf16": 1.8, "fp8_over_bf16": 1.0, "peak_vs_fit_within": 0.15}
RUNS = 3  # timed generations per variant (median)


def build_model(shape: str, dtype, device: str, context: int, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    # tied embeddings as in Llama-3.2-1B (1.24B parameters with this shape); made in `dtype` directly, so no fp32
    # copy ever sits in the allocator's cache
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(context, 2048), tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return model


def int4_kernel_exact(tensors: dict, layers: dict, device: str) -> bool:
    """The tinygemm kernel's own dequantized weight of the first int4 layer (x = I, on `device`) equals the
    emulation the quality is measured with, bit for bit."""
    import torch

    from edgepack.compress.quant_kernels import Int4Linear, int4_dequantize

    name, rec = next(iter(layers.items()))
    q, sz = tensors[f"{name}.qweight"], tensors[f"{name}.scales_and_zeros"]
    k, g = rec["in_features"], rec["group_size"]
    lin = Int4Linear(q, sz, g, k, rec["out_features"], device=device)
    got = lin(torch.eye(k, dtype=torch.bfloat16, device=device)).t().cpu()
    return bool(torch.equal(got, int4_dequantize(q.cpu(), sz.cpu(), g, k)))


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def copy_bandwidth(device: str) -> float | None:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), median of 10 after 3 warm-ups."""
    import torch

    if not device.startswith("cuda"):
        return None
    a = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2**30 / statistics.median(times)


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
    ttft = statistics.median(gen(1) for _ in range(3))
    total = gen(new_tokens)
    decode = (new_tokens - 1) / (total - ttft) if total > ttft else None  # None: too few tokens to time
    return {"decode_tokens_per_s": decode, "ttft_s": ttft, "prefill_tokens_per_s": x.shape[1] / ttft,
            "new_tokens": new_tokens}


def steady_decode(rt, prompt, new_tokens: int, sync) -> tuple[float, float]:
    """(ttft s, decode tokens/s): prefill timed alone, then new_tokens - 1 greedy steps with one synchronization at
    the end, the argmax staying on the device (what a serving loop achieves without per-token host round trips)."""
    import torch

    ids = torch.as_tensor(prompt)
    sync()
    t0 = time.perf_counter()
    nxt = rt.prefill_device(ids).argmax(-1)
    sync()
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(new_tokens - 1):
            nxt = rt.decode_step_device(nxt).argmax(-1)
    sync()
    return ttft, (new_tokens - 1) / (time.perf_counter() - t1)


def run_runtime(rt, prompt, new_tokens: int, device: str) -> dict:
    from edgepack.deploy.generation import GenerationConfig, generate

    sync = _sync(device)
    t0 = time.perf_counter()
    generate(rt, prompt, GenerationConfig(max_new_tokens=new_tokens))  # every bucket's capture (and compile)
    setup = time.perf_counter() - t0
    steady = [steady_decode(rt, prompt, new_tokens, sync) for _ in range(RUNS)]
    synced = [generate(rt, prompt, GenerationConfig(max_new_tokens=new_tokens)) for _ in range(RUNS)]
    ttft = statistics.median(s[0] for s in steady)
    return {"decode_tokens_per_s": statistics.median(s[1] for s in steady),
            "decode_tokens_per_s_synced": statistics.median(r.decode_tokens_per_s for r in synced),
            "ttft_s": ttft, "prefill_tokens_per_s": prompt.shape[1] / ttft, "setup_s": round(setup, 2),
            "capture_s": dict(rt.capture_seconds), "new_tokens": new_tokens, "runs": RUNS,
            "tokens_head": synced[0].tokens[0, :32].tolist()}


def lowbit_model(model, precision: str, args, work: Path):
    """Quantize the live model where it is, write it as a torch-cuda artifact, free it, load it back the way a
    bundle loads: (model, {bundle_bytes, load_seconds, load_peak_bytes})."""
    import torch

    from edgepack.deploy import cuda_weights as cw

    tensors, layers = cw.from_model(model, precision, args.group_size)
    checks = {"int4_kernel_bit_exact": int4_kernel_exact(tensors, layers, args.device)} if precision == "int4" else {}
    d = work / precision
    d.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(d)
    size = cw.write_weights(d, cw.rest_of(model, layers), tensors)
    del tensors, model
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loaded = cw.build_model(d, layers, args.device)
    info = {"bundle_bytes": size, "load_seconds": round(time.perf_counter() - t0, 2), **checks}
    if cuda:
        torch.cuda.synchronize()
        info["load_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        info["load_peak_vs_bundle"] = round(info["load_peak_bytes"] / size, 3)
    return loaded, info


def run_variant(name: str, args, target, work: Path) -> dict:
    import numpy as np
    import torch

    from edgepack.compress.quant_kernels import KERNEL_NAMES
    from edgepack.deploy.torch_cuda import TorchCudaRuntime
    from edgepack.targets.fit import fit

    base, _, mode = name.partition("+")
    compiled = mode == "compile"
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    context = args.prompt + args.new_tokens
    gc.collect()  # the previous variant's model, cache and graph pool
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(args.shape, dtype, args.device, context)
    prompt = np.random.default_rng(1).integers(3, model.config.vocab_size, (1, args.prompt))
    float_precision = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype]
    precision = base if base in ("int4", "int8", "fp8") else float_precision
    config = model.config.to_dict()
    row = {"variant": name, "precision": precision, "torch_compile": compiled}
    if base == "hf-generate":
        row.update(run_hf(model, prompt, args.hf_new_tokens, args.device))
    else:
        if precision in ("int4", "int8", "fp8"):
            model, info = lowbit_model(model, precision, args, work)
            row.update(info)
            row["kernel"] = KERNEL_NAMES[precision]
        if cuda:  # the runtime's own footprint from here: weights, cache, graphs, workspaces
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rt = TorchCudaRuntime(model, max_context=context, use_cuda_graph=cuda, torch_compile=compiled and cuda,
                              precision=precision)
        row.update(run_runtime(rt, prompt, args.new_tokens, args.device))
        row["buckets"] = list(rt.buckets)
    group = {"group_size": args.group_size} if precision == "int4" else {}
    rep = fit(config, target, precision=precision, context=context, check_support=False, runtime="torch-cuda",
              **group)
    mean_ctx = args.prompt + args.new_tokens // 2
    per_token = fit(config, target, precision=precision, context=mean_ctx, check_support=False,
                    runtime="torch-cuda", **group).bytes_per_token
    tps = row["decode_tokens_per_s"] or 0.0
    row.update({"bytes_per_token": per_token, "fit_required_bytes": rep.required_bytes,
                "pct_of_bandwidth": 100 * tps * per_token / target.bandwidth_bytes_per_s})
    if args.copy_bw:
        row["pct_of_measured_copy_bw"] = 100 * tps * per_token / args.copy_bw
    if cuda and base != "hf-generate":
        row["peak_gpu_bytes"] = int(torch.cuda.max_memory_reserved()) + args.cuda_context_bytes
        row["peak_vs_fit"] = round(row["peak_gpu_bytes"] / rep.required_bytes, 4)
    return row


def summarize(rows: list[dict]) -> dict:
    """The issue's bars (each None where a variant is missing) and what compiling buys per precision."""
    ok = {r["variant"]: r for r in rows if r.get("decode_tokens_per_s")}

    def best(precision):
        cands = [r for r in ok.values() if r["precision"] == precision and r["variant"] != "hf-generate"]
        return max(cands, key=lambda r: r["decode_tokens_per_s"]) if cands else None

    bf16, int4, fp8 = best("bf16"), best("int4"), best("fp8")
    out = {"kind": "summary", "bars": BARS}
    out["bf16_pct_of_bandwidth"] = round(bf16["pct_of_bandwidth"], 1) if bf16 else None
    if bf16 and bf16.get("pct_of_measured_copy_bw") is not None:
        out["bf16_pct_of_measured_copy_bw"] = round(bf16["pct_of_measured_copy_bw"], 1)
    out["int4_over_bf16"] = round(int4["decode_tokens_per_s"] / bf16["decode_tokens_per_s"], 3) if bf16 and int4 else None
    out["fp8_over_bf16"] = round(fp8["decode_tokens_per_s"] / bf16["decode_tokens_per_s"], 3) if bf16 and fp8 else None
    peaks = {v: r["peak_vs_fit"] for v, r in ok.items() if "peak_vs_fit" in r}
    out["peak_vs_fit"] = peaks
    if "hf-generate" in ok and bf16:
        out["bf16_over_hf_generate"] = round(bf16["decode_tokens_per_s"] / ok["hf-generate"]["decode_tokens_per_s"], 1)
    out["pass"] = {
        "bf16_pct_of_bandwidth": None if bf16 is None else out["bf16_pct_of_bandwidth"] >= BARS["bf16_pct_of_bandwidth"],
        "int4_over_bf16": None if out["int4_over_bf16"] is None else out["int4_over_bf16"] >= BARS["int4_over_bf16"],
        "fp8_over_bf16": None if out["fp8_over_bf16"] is None else out["fp8_over_bf16"] > BARS["fp8_over_bf16"],
        "peak_vs_fit": None if not peaks else all(abs(p - 1) <= BARS["peak_vs_fit_within"] for p in peaks.values()),
    }
    compile_rows = {}
    for v, r in ok.items():
        base, _, mode = v.partition("+")
        if mode == "compile" and base in ok:
            g = ok[base]
            gain = 1 / g["decode_tokens_per_s"] - 1 / r["decode_tokens_per_s"]  # seconds saved per token
            extra = r["setup_s"] - g["setup_s"]
            same = [a == b for a, b in zip(r.get("tokens_head") or [], g.get("tokens_head") or [])]
            compile_rows[base] = {"speedup": round(r["decode_tokens_per_s"] / g["decode_tokens_per_s"], 3),
                                  "greedy_tokens_agree": round(sum(same) / len(same), 3) if same else None,
                                  "extra_setup_s": round(extra, 1),
                                  "break_even_tokens": round(extra / gain) if gain > 0 else None,
                                  "pays": bool(gain > 0 and r["decode_tokens_per_s"] / g["decode_tokens_per_s"] >= 1.1)}
    out["torch_compile"] = compile_rows
    return out


def print_table(rows: list[dict], summary: dict, target) -> None:
    print(f"\n{'variant':14} {'decode tok/s':>12} {'synced':>8} {'% bw':>6} {'prefill tok/s':>13} {'TTFT ms':>8} "
          f"{'setup s':>8} {'peak GiB':>9} {'/fit':>6}")
    for r in rows:
        if not r.get("decode_tokens_per_s"):
            print(f"{r['variant']:14} {r.get('skipped') or r.get('error') or 'too few tokens to time decoding'}")
            continue
        peak = r.get("peak_gpu_bytes")
        print(f"{r['variant']:14} {r['decode_tokens_per_s']:12.1f} {r.get('decode_tokens_per_s_synced', float('nan')):8.1f} "
              f"{r['pct_of_bandwidth']:6.1f} {r['prefill_tokens_per_s']:13.0f} {r['ttft_s'] * 1e3:8.2f} "
              f"{r.get('setup_s', float('nan')):8.1f} {(peak / 2**30 if peak else float('nan')):9.2f} "
              f"{r.get('peak_vs_fit', float('nan')):6.3f}")
    p = summary["pass"]

    def mark(key):
        return {True: "PASS", False: "FAIL", None: "not measured"}[p[key]]

    print(f"\nbars on {target.name} ({target.bandwidth_bytes_per_s / 1e9:.0f} GB/s):")
    print(f"  bf16 decode = {summary['bf16_pct_of_bandwidth']}% of the bandwidth limit (>= 60%): {mark('bf16_pct_of_bandwidth')}")
    print(f"  int4 / bf16 = {summary['int4_over_bf16']} (>= 1.8): {mark('int4_over_bf16')}")
    print(f"  fp8 / bf16  = {summary['fp8_over_bf16']} (> 1.0): {mark('fp8_over_bf16')}")
    print(f"  peak / fit  = {summary['peak_vs_fit']} (within 15%): {mark('peak_vs_fit')}")
    for base, c in summary["torch_compile"].items():
        print(f"  torch.compile on {base}: {c['speedup']}x decode for {c['extra_setup_s']} s more setup "
              f"(break-even {c['break_even_tokens']} tokens): {'pays' if c['pays'] else 'does not pay'}")


def previous_rows(path) -> dict:
    """Variants already measured in an earlier run's JSON lines file (same file: same machine and settings)."""
    p = Path(path)
    if not p.is_file():
        return {}
    out = {}
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a timeout
        if row.get("kind") == "variant" and row.get("decode_tokens_per_s"):
            out[row["variant"]] = {k: v for k, v in row.items() if k != "kind"}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="local", help="target profile for bandwidth and fit (default: local, which "
                                                     "picks the packaged profile naming this GPU, e.g. h200)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--hf-new-tokens", type=int, default=None, help="tokens for the hf-generate baseline "
                                                                   "(default: --new-tokens)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--variants", help="comma-separated subset of " + ", ".join(GPU_VARIANTS))
    p.add_argument("--out", help="append one JSON line per result to this file, as each is measured")
    p.add_argument("--deadline-s", type=float, default=None, help="skip variants that would not finish within "
                                                                  "this many seconds of the start")
    args = p.parse_args(argv)
    args.hf_new_tokens = args.hf_new_tokens or args.new_tokens
    t_start = time.perf_counter()
    import torch
    import transformers

    from edgepack.targets import load_target

    earlier = previous_rows(args.out) if args.out else {}  # a rerun (or the session's compile step) resumes
    out_f = open(args.out, "a", buffering=1) if args.out else None  # noqa: SIM115 (lines flushed as written)

    def emit(obj: dict) -> None:
        line = json.dumps(obj, default=str)
        print(line, flush=True)
        if out_f:
            out_f.write(line + "\n")

    target = load_target(args.target)
    cuda = args.device.startswith("cuda")
    variants = args.variants.split(",") if args.variants else list(GPU_VARIANTS if cuda else CPU_VARIANTS)
    args.cuda_context_bytes, args.copy_bw = 0, None
    info = {"kind": "device", "device": args.device, "torch": torch.__version__,
            "transformers": transformers.__version__, "target": target.name,
            "target_bandwidth_bytes_per_s": target.bandwidth_bytes_per_s, "shape": args.shape, "dtype": args.dtype,
            "prompt": args.prompt, "new_tokens": args.new_tokens, "hf_new_tokens": args.hf_new_tokens,
            "int4_group_size": args.group_size}
    if cuda:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        args.cuda_context_bytes = int(total - free - torch.cuda.memory_reserved())  # context + libraries
        args.copy_bw = copy_bandwidth(args.device)
        props = torch.cuda.get_device_properties(0)
        info.update({"gpu": props.name, "sm": props.major * 10 + props.minor, "sms": props.multi_processor_count,
                     "memory_bytes": int(total), "cuda": torch.version.cuda, "cuda_context_bytes": args.cuda_context_bytes,
                     "measured_copy_bandwidth_bytes_per_s": args.copy_bw,
                     "local_profile": getattr(target, "measured", {}).get("profile")})
    emit(info)
    rows = [r for v, r in earlier.items() if v not in variants]
    with tempfile.TemporaryDirectory(prefix="edgepack-gpu-decode-") as work:
        for v in variants:
            base, _, mode = v.partition("+")
            if v in earlier:
                rows.append(earlier[v])
                print(f"{v}: measured earlier in {args.out}, not rerun", flush=True)
                continue
            if base == "fp8" and cuda and torch.cuda.get_device_capability() < (8, 9):
                row = {"variant": v, "skipped": "fp8 needs sm_89+"}
            elif args.deadline_s is not None and (time.perf_counter() - t_start
                                                  + NEEDS_S["hf-generate" if base == "hf-generate"
                                                            else "compile" if mode else "plain"] > args.deadline_s):
                row = {"variant": v, "skipped": f"no time left in this call ({args.deadline_s - (time.perf_counter() - t_start):.0f} s)"}
            else:
                try:
                    row = run_variant(v, args, target, Path(work))
                except Exception as exc:  # one failing variant must not hide the others
                    row = {"variant": v, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
            row["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            emit({"kind": "variant", **row})
            rows.append(row)
    summary = summarize(rows)
    emit(summary)
    print_table(rows, summary, target)
    if out_f:
        out_f.close()
    return {**info, "rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
    sys.exit(0)
