"""CPU decode speed and quality: transformers `generate` fp32 vs edgepack's compiled onnxruntime artifacts (fp32,
int8, int4 MatMulNBits) vs llama.cpp (GGUF f32 / Q4_0 / Q4_K_M), side by side in one run.

    .venv/bin/python scripts/cpu_vs_llamacpp.py [--model HF_DIR] [--rounds 3] [--new-tokens 128] [--threads 2]
        [--skip-llamacpp] [--realtime]

With --model (a pretrained checkpoint every path can run, e.g. from scripts/train_tiny_stories.py: head_dim % 16 == 0
for onnxruntime-genai, widths multiples of 256 for llama.cpp's K-quants): speed, logit SQNR and perplexity all on
that one model, perplexity on the held-out last 10 % of the text (the split the model was not trained on and the
quantize stage does not calibrate on), so one artifact can be shown both faster and at least as good. Variants
there add our GPTQ int4 graph and onnxruntime-genai builds with several option sets (GENAI_VARIANTS).

Without --model: a ~25M-parameter Llama built from a config (hidden 512, 8 layers, 8 heads / 4 KV heads, MLP 1536, vocab 512,
random weights with a fixed seed: speed and logit fidelity) and the real pretrained stories260K (perplexity).
Every variant decodes the same token ids; llama.cpp's tokenizer is never used. Timing: each round runs every variant
once, in turn, on the same prompt (16 tokens) with greedy decoding of `--new-tokens` tokens after one warm-up; the
table shows medians over rounds. "decode tok/s" is (new tokens - 1) / time of the decode steps, each step including
the argmax (our `deploy.generation.generate` loop; llama.cpp: `Llama.eval([tok])` + numpy argmax, the same work).
transformers `generate` has no per-step clock, so its figure is end to end (prefill included); "e2e tok/s" gives
every variant on that footing, and the speedup column uses it.

Quality: SQNR (dB) of each variant's logits against PyTorch fp32 on a fixed 64-token probe, and perplexity under
edgepack-ppl-v1 (window 256, stride 128, first `--ppl-tokens` tokens of ../shared/data/tinystories-valid-sample.txt).

llama.cpp lives in its own venv (it must not touch the project's torch): build it once with
    python3 -m venv /tmp/llamacpp-venv
    CMAKE_BUILD_PARALLEL_LEVEL=2 /tmp/llamacpp-venv/bin/pip install llama-cpp-python   # ~10-40 min on 2 cores
and point --llamacpp-src at llama.cpp's sources (convert_hf_to_gguf.py + gguf-py; the llama-cpp-python sdist vendors
them under vendor/llama.cpp). GGUF conversion runs with this venv's python (it needs torch + transformers) and,
for the sentencepiece tokenizer of these models, `pip install --target /tmp/llamacpp-extra sentencepiece` on its path;
quantization and inference run in the llama.cpp venv through a small helper (HELPER below).
The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF_FTYPES = {"q4_0": 2, "q4_k_m": 15}  # llama_ftype values (llama.h)
EXTRA_PYTHONPATH = Path("/tmp/llamacpp-extra")  # pip install --target here: what convert_hf_to_gguf.py needs beyond us

# Runs inside the llama.cpp venv: only numpy + llama_cpp. argv[1] names a JSON request file; prints one JSON answer.
HELPER = r"""
import json, sys, time
import numpy as np
req = json.load(open(sys.argv[1]))
import llama_cpp
if req["op"] == "quantize":
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = req["ftype"]
    p.nthread = req["threads"]
    rc = llama_cpp.llama_model_quantize(req["src"].encode(), req["dst"].encode(), p)
    print(json.dumps({"rc": rc})); sys.exit(0)
from llama_cpp import Llama
def logits_row(llm):
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
if req["op"] == "measure":
    llm = Llama(req["model"], n_ctx=req["n_ctx"], n_batch=req["n_ctx"], n_threads=req["threads"],
                n_threads_batch=req["threads"], logits_all=False, verbose=False)
    out = []
    for rep in range(2):  # the first is the warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(req["prompt"])
        tok = int(np.argmax(logits_row(llm)))
        ttft = time.perf_counter() - t0
        toks, lat = [tok], []
        for _ in range(req["new_tokens"] - 1):
            t = time.perf_counter()
            llm.eval([tok])
            tok = int(np.argmax(logits_row(llm)))
            lat.append(time.perf_counter() - t)
            toks.append(tok)
        out.append({"ttft_s": ttft, "decode_s": sum(lat), "tokens": toks})
    r = out[-1]
    print(json.dumps({"ttft_s": r["ttft_s"], "decode_tokens_per_s": (len(r["tokens"]) - 1) / r["decode_s"],
                      "e2e_tokens_per_s": len(r["tokens"]) / (r["ttft_s"] + r["decode_s"]), "tokens": r["tokens"]}))
elif req["op"] == "score":
    llm = Llama(req["model"], n_ctx=req["n_ctx"], n_batch=req["n_ctx"], n_ubatch=req["n_ctx"], n_threads=req["threads"],
                n_threads_batch=req["threads"], logits_all=True, verbose=False)
    ids = np.asarray(req["ids"], dtype=np.int64)
    nll, n = 0.0, 0
    for b, e, first, take in req["windows"]:
        llm.reset()
        llm.eval(ids[b:e].tolist())
        lg = np.asarray(llm.scores[: e - b], dtype=np.float64)[first - 1 : first - 1 + take]
        m = lg.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(lg - m).sum(1))
        tgt = ids[b + first : b + first + take]
        nll += float((lse - lg[np.arange(take), tgt]).sum()); n += take
    llm.reset()
    llm.eval(req["probe"])
    probe = np.asarray(llm.scores[: len(req["probe"])], dtype=np.float64)
    ref = np.load(req["ref_logits"]).astype(np.float64)
    sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - probe) ** 2).sum())
    print(json.dumps({"nll": nll / n, "tokens": n, "sqnr_db": float(sqnr)}))
"""


def helper(py: str, req: dict, timeout: int = 1800, realtime: bool = False) -> dict:
    import tempfile

    prefix = ["chrt", "-f", "1"] if realtime else []  # the helper's threads inherit SCHED_FIFO
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:  # token streams are too long for argv
        json.dump(req, f)
        f.flush()
        r = subprocess.run([*prefix, py, "-c", HELPER, f.name], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp helper failed ({req['op']}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def build_25m(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgepack.hf import copy_tokenizer
    from edgepack.sources import embedded_path

    if (path / "model.safetensors").is_file():
        return path
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    copy_tokenizer(embedded_path("stories260K"), path)
    return path


def gguf_files(hf_dir: Path, work: Path, src: Path, llama_py: str, threads: int) -> dict[str, Path]:
    out = {"f32": work / "model-f32.gguf"}
    if not out["f32"].is_file():
        extra = [str(EXTRA_PYTHONPATH)] if EXTRA_PYTHONPATH.is_dir() else []  # sentencepiece, outside our venv
        env = {"PYTHONPATH": ":".join([str(src / "gguf-py"), *extra]), "PATH": "/usr/bin:/bin"}
        r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out["f32"]),
                            "--outtype", "f32"], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed: {r.stderr[-2000:]}")
    for name, ftype in GGUF_FTYPES.items():
        out[name] = work / f"model-{name}.gguf"
        if not out[name].is_file():
            rc = helper(llama_py, {"op": "quantize", "src": str(out["f32"]), "dst": str(out[name]), "ftype": ftype,
                                   "threads": threads})["rc"]
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize {name} returned {rc}")
    return out


# onnxruntime-genai builds compared: name -> CompileConfig overrides (genai_options go over GENAI_INT4_DEFAULTS)
GENAI_VARIANTS = {
    "genai int4": {},  # what `compile` builds by default (deploy/genai_builder.py GENAI_INT4_DEFAULTS)
    "genai int4 builder defaults": {"genai_options": ("builder-defaults",)},  # RTN, int4 lm_head and embedding
    "genai int4 rtn": {"genai_options": ("algo_config=rtn",)},
    "genai int4 k_quant_mixed": {"genai_options": ("matmul_mixed_precision=last_matmul:int8,mixed_layers:int8",)},
    "genai int4 block 128": {"group_size": 128},
    "genai int4 fp32 activations": {"accuracy_level": 1},  # MatMulNBits without int8 activation quantization
}


def compile_variants(hf_dir: Path, work: Path, exporter: str, threads: int, extended: bool = False) -> dict:
    from edgepack.artifact import open_artifact
    from edgepack.deploy.compile import CompileConfig, compile_stage
    from edgepack.errors import EdgepackError
    from edgepack.facts import read_model_config
    from edgepack.targets import load_target

    target = load_target("cpu-x86-64")
    cfg = read_model_config(hf_dir)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    variants = {"fp32": {"precision": "fp32"}, "int8": {"precision": "int8"},
                "int4": {"precision": "int4", "builder": "edgepack"}}
    if extended:  # int8 makes way for what the question needs (and each edgepack variant is one more export)
        del variants["int8"]
        variants["int4 gptq"] = {"precision": "int4", "builder": "edgepack", "int4_method": "int4-gptq"}
    if head_dim % 16 == 0:  # the genai builder's CPU GroupQueryAttention needs it (stories260K has head_dim 8)
        for name, over in (GENAI_VARIANTS if extended else {"genai int4": {}, "genai int4 builder defaults":
                                                             GENAI_VARIANTS["genai int4 builder defaults"]}).items():
            variants[name] = {"precision": "int4", "builder": "genai", **over}
    arts = {}
    for name, over in variants.items():
        out = work / f"ort-{name.replace(' ', '-')}"
        if (out / "edgepack.json").is_file():
            arts[name] = open_artifact(out)
            continue
        t0 = time.perf_counter()
        c = CompileConfig(exporter=exporter, threads=threads, measure_tokens=0, **over)
        try:
            arts[name] = compile_stage(open_artifact(hf_dir), c, target, out)
        except EdgepackError as exc:
            print(f"  {name}: not built: {exc.one_line()}", file=sys.stderr, flush=True)
            continue
        print(f"  compiled {name} in {time.perf_counter() - t0:.0f} s -> {out}", file=sys.stderr, flush=True)
    return arts


def measure_ort(art, prompt, new_tokens: int, threads: int, realtime: bool, io_binding: bool = True) -> dict:
    from edgepack.bench.run import scheduling
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.runtime import open_runtime

    rt = open_runtime(art, threads=threads, io_binding=io_binding)
    with scheduling(realtime):
        generate(rt, prompt, GenerationConfig(max_new_tokens=8))  # warm-up
        r = generate(rt, prompt, GenerationConfig(max_new_tokens=new_tokens))
    total = r.ttft_s + sum(r.token_latencies_s)
    return {"decode_tokens_per_s": r.decode_tokens_per_s, "e2e_tokens_per_s": r.tokens.shape[1] / total,
            "ttft_s": r.ttft_s, "tokens": r.tokens[0].tolist()}


def measure_hf(hf_dir: Path, prompt, new_tokens: int, threads: int, realtime: bool) -> dict:
    from edgepack.artifact import open_artifact
    from edgepack.bench.run import scheduling
    from edgepack.deploy.torch_runtime import open_hf_baseline

    rt = open_hf_baseline(open_artifact(hf_dir), threads=threads, device="cpu")
    with scheduling(realtime):
        rt.hf_generate(prompt, 8)  # warm-up
        toks, secs = rt.hf_generate(prompt, new_tokens)
    return {"decode_tokens_per_s": None, "e2e_tokens_per_s": new_tokens / secs, "tokens": toks[0].tolist()}


def quality(hf_dir: Path, arts: dict, ggufs: dict, llama_py: str | None, ppl_tokens: int, threads: int,
            work: Path, heldout: bool = False) -> dict:
    """{variant: {ppl, sqnr_db}} on one model; perplexity on the whole text, or its held-out last 10 %."""
    import numpy as np

    from edgepack.artifact import open_artifact
    from edgepack.hf import load_tokenizer
    from edgepack.quality import PplProtocol, open_scorer, perplexity, plan_windows, probe_ids, read_text, token_stream

    text, _ = read_text(SHARED / "data" / "tinystories-valid-sample.txt")
    if heldout:
        from edgepack.quality import split_at_line

        text = split_at_line(text, 0.9)[1]
    proto = PplProtocol(window=256, stride=128, max_tokens=ppl_tokens or None).resolved()
    ids = token_stream(load_tokenizer(hf_dir), text, proto)
    ref_fn = open_scorer(open_artifact(hf_dir))[0]
    probe = probe_ids(512)
    ref = ref_fn(probe)
    np.save(work / "ref_logits.npy", ref[0])
    from edgepack.quality import sqnr_db

    res = {"pytorch fp32": {"ppl": perplexity(ref_fn, ids, proto).perplexity, "sqnr_db": float("inf")}}
    for prec, art in arts.items():
        fn = open_scorer(art)[0]
        res[f"edgepack ort {prec}"] = {"ppl": perplexity(fn, ids, proto).perplexity, "sqnr_db": sqnr_db(ref, fn(probe))}
    windows = plan_windows(len(ids), proto)
    for name, path in (ggufs or {}).items():
        r = helper(llama_py, {"op": "score", "model": str(path), "ids": [int(i) for i in ids],
                              "windows": [list(w) for w in windows], "n_ctx": 256, "threads": threads,
                              "probe": probe[0].tolist(), "ref_logits": str(work / "ref_logits.npy")})
        res[f"llama.cpp {name}"] = {"ppl": float(np.exp(r["nll"])), "sqnr_db": r["sqnr_db"]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None,
                    help="pretrained HF checkpoint for speed AND held-out perplexity [default: 25M config model for "
                         "speed, stories260K for perplexity]")
    ap.add_argument("--workdir", default="/tmp/edgepack-bench-cpu-vs-llamacpp")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-tokens", type=int, default=None,
                    help="score at most this many tokens; 0 = all [default: 4000, all of the held-out split with --model]")
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    ap.add_argument("--llamacpp-python", default="/tmp/llamacpp-venv/bin/python")
    ap.add_argument("--llamacpp-src", default=None, help="llama.cpp source dir [default: first /tmp/llamacpp-src/*/vendor/llama.cpp]")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--realtime", action="store_true",
                    help="time under SCHED_FIFO (root): not preempted by other tenants of a shared machine")
    args = ap.parse_args()

    import numpy as np

    from edgepack.output import print_table

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = Path(args.llamacpp_src) if args.llamacpp_src else next(iter(sorted(Path("/tmp/llamacpp-src").glob("*/vendor/llama.cpp"))), None)
    use_llama = not args.skip_llamacpp and Path(args.llamacpp_python).is_file() and src is not None
    if not args.skip_llamacpp and not use_llama:
        print(f"llama.cpp skipped: no {args.llamacpp_python} or no llama.cpp sources (see the module doc)", file=sys.stderr)
    if args.model:  # one pretrained model: speed, SQNR and held-out perplexity on it
        speed_name = Path(args.model).name
        models = {speed_name: Path(args.model).absolute()}
        ppl_models, ppl_tokens = {speed_name}, args.ppl_tokens or 0
    else:
        speed_name = "llama-25m"
        models = {"llama-25m": build_25m(work / "models" / "llama-25m"), "stories260K": SHARED / "models" / "stories260K"}
        ppl_models, ppl_tokens = {"stories260K"}, 4000 if args.ppl_tokens is None else args.ppl_tokens
    arts, ggufs = {}, {}
    for name, hf_dir in models.items():
        (work / name).mkdir(exist_ok=True)
        print(f"[{name}] compiling edgepack variants", file=sys.stderr, flush=True)
        arts[name] = compile_variants(hf_dir, work / name, args.exporter, args.threads, extended=bool(args.model))
        if use_llama:
            print(f"[{name}] converting to GGUF", file=sys.stderr, flush=True)
            ggufs[name] = gguf_files(hf_dir, work / name, src, args.llamacpp_python, args.threads)

    # ---- speed, on one model: every variant once per round, medians over rounds
    hf_dir = models[speed_name]
    prompt = np.random.default_rng(3).integers(3, 512, size=(1, 16))
    runs: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        print(f"[speed] round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
        runs.setdefault("transformers generate fp32", []).append(measure_hf(hf_dir, prompt, args.new_tokens, args.threads,
                                                                           args.realtime))
        for prec, art in arts[speed_name].items():
            runs.setdefault(f"edgepack ort {prec}", []).append(measure_ort(art, prompt, args.new_tokens, args.threads,
                                                                           args.realtime))
        if not args.model:
            runs.setdefault("edgepack ort int4 (no IO binding)", []).append(
                measure_ort(arts[speed_name]["int4"], prompt, args.new_tokens, args.threads, args.realtime,
                            io_binding=False))
        for g, path in ggufs.get(speed_name, {}).items():
            runs.setdefault(f"llama.cpp {g}", []).append(helper(args.llamacpp_python, {
                "op": "measure", "model": str(path), "prompt": prompt[0].tolist(), "new_tokens": args.new_tokens,
                "threads": args.threads, "n_ctx": 512}, realtime=args.realtime))
    med = {k: {m: (statistics.median([r[m] for r in v]) if v[0].get(m) is not None else None)
               for m in ("decode_tokens_per_s", "e2e_tokens_per_s")} for k, v in runs.items()}
    base = med["transformers generate fp32"]["e2e_tokens_per_s"]
    ref_tokens = runs["edgepack ort fp32"][0]["tokens"]
    sizes = {f"edgepack ort {k}": sum(p.stat().st_size for p in a.path.glob("*.onnx*"))
             for k, a in arts[speed_name].items()}
    sizes.update({f"llama.cpp {g}": p.stat().st_size for g, p in ggufs.get(speed_name, {}).items()})
    print("[quality] perplexity and logit SQNR", file=sys.stderr, flush=True)
    qual = {name: quality(models[name], arts[name], ggufs.get(name), args.llamacpp_python,
                          ppl_tokens if name in ppl_models else 256, args.threads, work / name,
                          heldout=bool(args.model)) for name in models}
    rows = []
    for k, v in med.items():
        same = sum(a == b for a, b in zip(runs[k][0]["tokens"], ref_tokens)) / len(ref_tokens)
        row = [k, _f(v["decode_tokens_per_s"]), _f(v["e2e_tokens_per_s"]), f"{v['e2e_tokens_per_s'] / base:.2f}x",
               f"{same:.0%}", _f(sizes[k] / 1e6 if k in sizes else None, 2)]
        for name in models:
            q = qual[name].get(_qual_key(k), {})
            row += ([_f(q.get("ppl"), 4)] if name in ppl_models else []) + [_f(q.get("sqnr_db"))]
        rows.append(row)
    cols = [c for name in models for c in ([f"{name} ppl"] if name in ppl_models else []) + [f"{name} SQNR dB"]]
    print_table(f"CPU decode, batch 1, {args.threads} threads, {args.new_tokens} new tokens, median of {args.rounds} rounds",
                ["variant", "decode tok/s", "e2e tok/s", "vs transformers", "greedy = ort fp32", "MB", *cols], rows,
                caption=f"speed on {speed_name}; ppl: edgepack-ppl-v1 window 256 / stride 128"
                        + (", held-out last 10 % of the text" if args.model else ", first tokens of the text"))
    print(json.dumps({"bench": "cpu_vs_llamacpp", "model": str(args.model or ""), "threads": args.threads,
                      "realtime": args.realtime, "new_tokens": args.new_tokens, "rounds": args.rounds,
                      "load_average": list(os.getloadavg()), "speed_median": med, "bytes": sizes,
                      "speed_runs": {k: [{m: r.get(m) for m in ("decode_tokens_per_s", "e2e_tokens_per_s")} for r in v]
                                     for k, v in runs.items()},
                      "quality": qual, "ppl_protocol": "edgepack-ppl-v1 window 256 stride 128",
                      "ppl_split": "held-out last 10 %" if args.model else "first tokens", "ppl_tokens": ppl_tokens,
                      "genai_options": {k: a.extra.get("builder_options") for k, a in arts[speed_name].items()
                                        if k.startswith("genai")}}, default=float))


def _qual_key(variant: str) -> str:
    return variant.replace(" (no IO binding)", "").replace("transformers generate fp32", "pytorch fp32")


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else ("inf" if x == float("inf") else f"{x:,.{digits}f}")


if __name__ == "__main__":
    main()
