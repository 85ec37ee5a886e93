"""The sweep: for each (prompt length, generated length, batch) point, warm up, then time `runs` generations.

Protocol (edgepack-bench-v1), the same for every runtime because it only uses the Runtime interface
(deploy.runtime) and the shared loop (deploy.generation.generate):
- prompts are `batch` rows of token ids drawn uniformly from [3, vocab) with a fixed seed (no BOS/EOS/PAD, so no
  early stop); greedy decoding, no stop tokens, so every run produces exactly gen_len tokens per row;
- `warmup` runs per point are discarded (allocator growth, lazy init, caches);
- time to first token (TTFT) = prefill + first sampling, one value per run -> median and p10/p90 over runs;
  prefill tokens/s = batch x prompt_len / TTFT, median over runs;
- inter-token latency (ITL) = one decode step + sampling; all steps of all measured runs are pooled and
  decode tokens/s = batch / median ITL (the median shrugs off the scheduler hiccups of a shared machine);
  p10/p90 of decode tokens/s come from the p90/p10 ITL;
- on CUDA, the clock is read after torch.cuda.synchronize() (generate's `sync`).
"""

from __future__ import annotations

import time

import numpy as np

PROTOCOL = "edgepack-bench-v1"
FIRST_TOKEN_ID = 3  # ids 0-2 are <unk>/<s>/</s> in Llama-family vocabularies


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile q (0-100) of a non-empty sequence."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise ValueError("percentile of an empty sequence")
    return float(np.percentile(a, q))


def latency_stats(latencies_s, batch: int) -> dict:
    """Median / p10 / p90 of per-step latencies (s) and the decode rates they imply (tokens/s, all rows)."""
    med, p10, p90 = (percentile(latencies_s, q) for q in (50, 10, 90))
    return {"itl_ms_median": med * 1e3, "itl_ms_p10": p10 * 1e3, "itl_ms_p90": p90 * 1e3,
            "decode_tokens_per_s": batch / med, "decode_tokens_per_s_p10": batch / p90,
            "decode_tokens_per_s_p90": batch / p10, "decode_steps": len(latencies_s)}


def ttft_stats(ttfts_s, prompt_len: int, batch: int) -> dict:
    rates = [batch * prompt_len / t for t in ttfts_s]
    return {"ttft_ms": percentile(ttfts_s, 50) * 1e3, "ttft_ms_p10": percentile(ttfts_s, 10) * 1e3,
            "ttft_ms_p90": percentile(ttfts_s, 90) * 1e3, "prefill_tokens_per_s": percentile(rates, 50)}


def make_prompt(vocab: int, prompt_len: int, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(FIRST_TOKEN_ID, vocab, size=(batch, prompt_len), dtype=np.int64)


def probe_vocab(rt) -> int:
    """Vocabulary size as the runtime sees it (width of its logits): works for every artifact format."""
    v = int(np.asarray(rt.prefill(np.full((1, 1), FIRST_TOKEN_ID, dtype=np.int64))).shape[-1])
    rt.reset()
    return v


MAX_RUNS = 10_000  # cap for min_seconds on a model so small that one run takes microseconds


def measure_point(rt, prompt_len: int, gen_len: int, batch: int, *, runs: int, warmup: int, vocab: int,
                  seed: int = 0, sync=None, memory=None, min_seconds: float = 0.0) -> dict:
    """Time one sweep point on `rt`: at least `runs` runs and, past those, more until `min_seconds` of wall time
    were measured (a 260K model decodes 64 tokens in ~30 ms: five runs are too few samples to repeat within a few
    percent on a shared machine). `memory` is a factory returning a PeakMemory-like context manager wrapped
    around the measured runs (not the warm-up). Returns the point's figures (times in ms, rates in tokens/s)."""
    from edgepack.deploy.generation import GenerationConfig, generate

    ids = make_prompt(vocab, prompt_len, batch, seed)
    cfg = GenerationConfig(max_new_tokens=gen_len, temperature=0.0)
    for _ in range(warmup):
        generate(rt, ids, cfg, sync=sync)
    ttfts, itls, tokens, mem = [], [], None, None
    ctx = memory() if memory else None
    if ctx is not None:
        ctx.__enter__()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        done = 0
        while done < runs or (time.perf_counter() - wall0 < min_seconds and done < MAX_RUNS):
            res = generate(rt, ids, cfg, sync=sync)
            ttfts.append(res.ttft_s)
            itls.extend(res.token_latencies_s)
            tokens = res.tokens
            done += 1
    finally:
        cpu_util = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
        if ctx is not None:
            ctx.__exit__(None, None, None)
            mem = ctx
    # process CPU seconds per wall second over the measured runs: ~= threads when the machine left the benchmark
    # alone, lower when other processes took the cores (then the wall-clock figures include waiting)
    point = {"prompt_len": prompt_len, "gen_len": gen_len, "batch": batch, "runs": done, "warmup": warmup,
             "cpu_utilization": cpu_util}
    point.update(ttft_stats(ttfts, prompt_len, batch))
    if itls:
        point.update(latency_stats(itls, batch))
    else:  # gen_len == 1: no decode step to time
        point.update({"decode_tokens_per_s": None, "decode_steps": 0})
    if mem is not None:
        point["peak_memory_bytes"], point["peak_memory_kind"] = mem.headline_bytes()
        point["memory"] = mem.result
    point["_tokens"] = tokens  # for token agreement with a baseline; dropped before the record is written
    return point


def measure_hf_generate(rt, prompt_len: int, gen_len: int, batch: int, *, runs: int, warmup: int, vocab: int,
                        seed: int = 0, memory=None, between=None) -> dict:
    """Plain transformers `generate` (the `hf` runtime's hf_generate), which exposes no per-token clock. So each run
    times generate(max_new_tokens=1) -> TTFT and generate(max_new_tokens=gen_len); decode tokens/s =
    batch x (gen_len - 1) / (median full time - median TTFT). Per-run differences give p10/p90.
    `between(ids)` runs before every baseline run (warm-up included): the caller interleaves its own runtime there,
    so both are timed in the same seconds of a noisy machine."""
    from edgepack.errors import ConfigError

    if not hasattr(rt, "hf_generate"):
        raise ConfigError(f"runtime '{getattr(rt, 'name', rt)}' has no hf_generate", "use --baseline hf")
    if gen_len < 2:
        raise ConfigError("a baseline needs --gen-len >= 2 to time decoding", "use e.g. --gen-len 64")
    ids = make_prompt(vocab, prompt_len, batch, seed)
    between = between or (lambda _ids: None)
    for _ in range(warmup):
        between(ids)
        rt.hf_generate(ids, 1)
        rt.hf_generate(ids, gen_len)
    firsts, fulls, tokens = [], [], None
    ctx = memory() if memory else None
    if ctx is not None:
        ctx.__enter__()
    try:
        for _ in range(runs):
            between(ids)
            firsts.append(rt.hf_generate(ids, 1)[1])
            tokens, t = rt.hf_generate(ids, gen_len)
            fulls.append(t)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    steps = gen_len - 1
    decode_s = percentile(fulls, 50) - percentile(firsts, 50)
    per_run = sorted(batch * steps / max(f - a, 1e-9) for f, a in zip(fulls, firsts))
    point = {"prompt_len": prompt_len, "gen_len": gen_len, "batch": batch, "runs": runs, "warmup": warmup,
             "decode_tokens_per_s": batch * steps / decode_s if decode_s > 0 else None,
             "decode_tokens_per_s_p10": percentile(per_run, 10), "decode_tokens_per_s_p90": percentile(per_run, 90),
             "itl_ms_median": decode_s / steps * 1e3, "method": "generate(n) - generate(1), medians over runs"}
    point.update(ttft_stats(firsts, prompt_len, batch))
    if ctx is not None:
        point["peak_memory_bytes"], point["peak_memory_kind"] = ctx.headline_bytes()
        point["memory"] = ctx.result
    point["_tokens"] = tokens
    return point


def token_agreement(a, b) -> float | None:
    """Fraction of positions where two [B, n] greedy outputs agree (None if either is missing or shapes differ)."""
    if a is None or b is None:
        return None
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return None
    return float((a == b).mean())
