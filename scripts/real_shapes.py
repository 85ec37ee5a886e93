"""CPU speed at real model sizes, side by side: every CPU path built from one random-weight model of a real shape and
measured interleaved in one run (issue 20).

    .venv/bin/python scripts/real_shapes.py --shape smollm2-135m [--shape qwen2.5-0.5b] [--work DIR] [--rounds 3]
        [--threads 1] [--prompt-len 64] [--new-tokens 128] [--layers N] [--nice]

Shapes (edgepack.bench.shapes.REAL_SHAPES): SmolLM2-135M (Llama, hidden 576, 30 layers, 9 / 3 heads, MLP 1536,
vocab 49152, tied) and Qwen2.5-0.5B (Qwen2, hidden 896, 24 layers, 14 / 2 heads, MLP 4864, vocab 151936, tied,
q/k/v bias); `--layers N` keeps the widths and vocabulary with fewer layers (a quick run). Paths, each built by the
command a user would type (timed, peak RSS of the build from /usr/bin/time):

    edgepack-int4     edgepack compile M --target cpu-x86-64          (the default CPU artifact)
    edgepack-int8     ... --precision int8 --builder edgepack          edgepack-fp32   ... --precision fp32
    genai-default     onnxruntime-genai's builder with its own defaults (-p int4 -e cpu), through our runtime
    gguf-q4_0-ours    quantize int4-rtn --symmetric --format torch, then export gguf (our codes as Q4_0), llama.cpp
    gguf-q8_0-ours    quantize int8 --format torch, then export gguf (Q8_0), llama.cpp
    llama.cpp-q4_0 / -q4_k_m / -q8_0   export gguf --type f16, then llama.cpp's own quantizer
    transformers-fp32 the checkpoint through the torch-cpu runtime (transformers forward, our loop)

The llama.cpp rows need llama-cpp-python importable by this Python (extra `llamacpp`); without it they are built
where possible and reported as not measured, with the reason. Measurement: `rounds` rounds, each running every
artifact once in a fresh process (`edgepack bench ART --target local`, protocol edgepack-bench-v1: random prompt
ids, greedy, TTFT and decode separately, peak RSS over the measured runs, bandwidth utilisation against this
machine's measured copy bandwidth); medians over rounds. **Contention**: each bench reports its process CPU seconds
per wall second; divided by the threads that is the CPU share the process got. Below 0.9 in any round the row is
labelled `contended` (the figures include waiting for a core; compare ratios within a round only), and the summary
says how many rows were. The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGEPACK = [sys.executable, "-m", "edgepack.cli"]
MIN_CPU_SHARE = 0.9
GENAI_DEFAULT = ("from pathlib import Path; import sys; from edgepack.artifact import open_artifact; "
                 "from edgepack.deploy.compile import CompileConfig, compile_stage; "
                 "from edgepack.targets import load_target; "
                 "compile_stage(open_artifact(sys.argv[1]), CompileConfig(builder='genai', precision='int4', "
                 "genai_options=('builder-defaults',), measure_tokens=0), load_target('cpu-x86-64'), Path(sys.argv[2]))")
LLAMA_QUANTIZE = ("import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]); "
                  "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
LLAMA_FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15}  # llama_ftype (llama.h)


def timed(cmd: list[str], nice: bool) -> dict:
    """Run cmd; {seconds, cpu_seconds, peak_rss_bytes} from /usr/bin/time; raises with stderr's tail on failure."""
    t0 = time.perf_counter()
    pre = (["/usr/bin/time", "-f", "TIME %U %S %M"] if Path("/usr/bin/time").exists() else []) + (["nice"] if nice else [])
    r = subprocess.run(pre + cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}...: {r.stderr.strip()[-600:]}")
    out = {"seconds": round(time.perf_counter() - t0, 1)}
    line = next((ln for ln in reversed(r.stderr.splitlines()) if ln.startswith("TIME ")), None)
    if line:
        u, s, m = line.split()[1:]
        out.update(cpu_seconds=round(float(u) + float(s), 1), peak_rss_bytes=int(m) * 1024)
    return out


def build_paths(model: Path, work: Path, nice: bool, have_llama: bool) -> dict:
    """{label: {path, runtime, build: {...}} or {error}} for every path."""
    paths: dict[str, dict] = {}

    def step(label, cmds, art, runtime=None):
        if (art / "edgepack.json").is_file():
            paths[label] = {"path": str(art), "runtime": runtime, "build": {"reused": True}}
            return
        try:
            builds = [timed(c, nice) for c in cmds]
            build = {"seconds": round(sum(b["seconds"] for b in builds), 1),
                     "cpu_seconds": round(sum(b.get("cpu_seconds", 0) for b in builds), 1),
                     "peak_rss_bytes": max(b.get("peak_rss_bytes", 0) for b in builds)}
            paths[label] = {"path": str(art), "runtime": runtime, "build": build}
        except RuntimeError as exc:
            paths[label] = {"error": str(exc)}
        print(f"[build] {label}: {paths[label].get('build', paths[label].get('error'))}", file=sys.stderr, flush=True)

    target = ["--target", "cpu-x86-64", "--measure-tokens", "0"]
    step("edgepack-int4", [EDGEPACK + ["compile", str(model), *target, "-o", str(work / "int4")]], work / "int4")
    step("edgepack-int8", [EDGEPACK + ["compile", str(model), *target, "--precision", "int8", "--builder", "edgepack",
                                       "--exporter", "torchscript", "-o", str(work / "int8")]], work / "int8")
    step("edgepack-fp32", [EDGEPACK + ["compile", str(model), *target, "--precision", "fp32", "--exporter",
                                       "torchscript", "-o", str(work / "fp32")]], work / "fp32")
    step("genai-default", [[sys.executable, "-c", GENAI_DEFAULT, str(model), str(work / "genai")]], work / "genai")
    for label, method, extra in (("gguf-q4_0-ours", "int4-rtn", ["--symmetric"]), ("gguf-q8_0-ours", "int8", [])):
        q = work / f"{label}-quant"
        step(label, [EDGEPACK + ["quantize", str(model), "--method", method, *extra, "--format", "torch", "-o", str(q),
                                 "--force"],
                     EDGEPACK + ["export", "gguf", str(q), "-o", str(work / label)]], work / label, "llama.cpp")
    f16 = work / "gguf-f16"
    if have_llama:
        step("gguf-f16", [EDGEPACK + ["export", "gguf", str(model), "--type", "f16", "--head-type", "f16", "-o",
                                      str(f16)]], f16, "llama.cpp")
        paths.pop("gguf-f16", None)
        for name, ftype in LLAMA_FTYPES.items():
            dst = work / f"llama.cpp-{name}"
            if not (dst / "edgepack.json").is_file() and (f16 / "model.gguf").is_file():
                shutil.copytree(f16, dst, ignore=shutil.ignore_patterns("model.gguf"), dirs_exist_ok=True)
                try:
                    b = timed([sys.executable, "-c", LLAMA_QUANTIZE, str(f16 / "model.gguf"), str(dst / "model.gguf"),
                               str(ftype)], nice)
                    _rehash(dst)
                    paths[f"llama.cpp-{name}"] = {"path": str(dst), "runtime": "llama.cpp", "build": b}
                except RuntimeError as exc:
                    paths[f"llama.cpp-{name}"] = {"error": str(exc)}
                print(f"[build] llama.cpp-{name}: {paths[f'llama.cpp-{name}']}", file=sys.stderr, flush=True)
            elif (dst / "edgepack.json").is_file():
                paths[f"llama.cpp-{name}"] = {"path": str(dst), "runtime": "llama.cpp", "build": {"reused": True}}
    else:
        for name in LLAMA_FTYPES:
            paths[f"llama.cpp-{name}"] = {"error": "llama-cpp-python is not importable here (extra llamacpp)"}
    paths["transformers-fp32"] = {"path": str(model), "runtime": "torch-cpu", "build": {"seconds": 0}}
    # build figures survive a re-run that reuses the artifacts
    record = work / "builds.json"
    old = json.loads(record.read_text()) if record.is_file() else {}
    for label, entry in paths.items():
        if entry.get("build", {}).get("reused") and label in old:
            entry["build"] = {**old[label], "reused": True}
    record.write_text(json.dumps({k: v["build"] for k, v in paths.items() if "build" in v}, indent=1))
    return paths


def _rehash(art_dir: Path) -> None:
    """The copied manifest lists the f16 file: record the quantized one instead (llama.cpp wrote it, not a stage)."""
    from edgepack.artifact import MANIFEST_NAME, hash_files

    m = json.loads((art_dir / MANIFEST_NAME).read_text())
    m["files"] = hash_files(art_dir)
    m["extra"] = {**m["extra"], "made_by": "llama.cpp llama_model_quantize", "file_type": art_dir.name.split("-")[-1]}
    (art_dir / MANIFEST_NAME).write_text(json.dumps(m, indent=2) + "\n")


def bench_once(entry: dict, args) -> dict:
    cmd = EDGEPACK + ["bench", entry["path"], "--target", "local", "--prompt-len", str(args.prompt_len), "--gen-len",
                      str(args.new_tokens), "--threads", str(args.threads), "--runs", "1", "--warmup", "1",
                      "--min-seconds", "0", "--json"] + (["--runtime", entry["runtime"]] if entry.get("runtime") else [])
    r = subprocess.run((["nice"] if args.nice else []) + cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-400:]}
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    pt = rec["points"][0]
    return {"decode": rec["decode_tokens_per_s"], "prefill": rec["prefill_tokens_per_s"], "ttft_ms": rec["ttft_ms"],
            "peak": rec["peak_memory_bytes"], "mbu": rec.get("bandwidth_utilization"),
            "size": rec.get("weight_bytes") or rec.get("artifact_bytes"),
            "cpu_share": pt.get("cpu_utilization", 0.0) / args.threads}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=("smollm2-135m", "qwen2.5-0.5b"))
    ap.add_argument("--work", type=Path, default=ROOT / "edgepack-runs" / "real-shapes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, help="fewer layers than the real shape (a quick run)")
    ap.add_argument("--nice", action="store_true", help="run builds and benches under nice (a shared machine)")
    args = ap.parse_args(argv)
    from edgepack.bench.shapes import build_shape
    from edgepack.output import print_table

    have_llama = importlib.util.find_spec("llama_cpp") is not None
    result = {"threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "rounds": args.rounds, "min_cpu_share": MIN_CPU_SHARE, "shapes": {}}
    for shape in args.shape or ["smollm2-135m"]:
        work = args.work / (shape + (f"-{args.layers}l" if args.layers else ""))
        model = work / "model"
        if not (model / "config.json").is_file():
            build_shape(shape, model, layers=args.layers)
        paths = build_paths(model, work, args.nice, have_llama)
        runnable = {k: v for k, v in paths.items() if "path" in v and (v.get("runtime") != "llama.cpp" or have_llama)}
        rounds: dict[str, list[dict]] = {k: [] for k in runnable}
        for r in range(args.rounds):
            for label, entry in runnable.items():
                rec = bench_once(entry, args)
                rounds[label].append(rec)
                print(f"[round {r + 1}] {shape} {label}: {rec}", file=sys.stderr, flush=True)
        rows, summary = [], {}
        for label, entry in paths.items():
            good = [x for x in rounds.get(label, []) if "error" not in x]
            if not good:
                why = entry.get("error") or (rounds.get(label) or [{}])[0].get("error") or "not measured (no llama_cpp)"
                summary[label] = {"error": why, "build": entry.get("build")}
                rows.append([label, "-", "-", "-", "-", "-", "-", "-", "-", why[:60]])
                continue
            med = {k: statistics.median(x[k] for x in good if x.get(k) is not None)
                   for k in ("decode", "prefill", "ttft_ms", "peak", "cpu_share") if any(x.get(k) is not None for x in good)}
            mbu = [x["mbu"] for x in good if x.get("mbu")]
            contended = min(x["cpu_share"] for x in good) < MIN_CPU_SHARE
            b = entry.get("build", {})
            summary[label] = {**med, "decode_rounds": [x["decode"] for x in good], "mbu": statistics.median(mbu) if mbu
                              else None, "size_bytes": good[-1].get("size"), "build": b, "contended": contended}
            rows.append([label, f"{med['decode']:.1f}", " / ".join(f"{x['decode']:.1f}" for x in good),
                         f"{med['prefill']:.0f}", f"{med['ttft_ms']:.0f}", f"{med['peak'] / 2**20:.0f}",
                         f"{(good[-1].get('size') or 0) / 2**20:.0f}",
                         "-" if not mbu else f"{statistics.median(mbu):.0%}",
                         f"{b.get('seconds', '-')} s / {b.get('cpu_seconds', '-')} cpu s / "
                         f"{(b.get('peak_rss_bytes') or 0) / 2**30:.1f} GB",
                         f"contended (CPU share {med['cpu_share']:.2f})" if contended else f"ok ({med['cpu_share']:.2f})"])
        n_cont = sum(1 for v in summary.values() if v.get("contended"))
        print_table(f"{shape}{f' ({args.layers} layers)' if args.layers else ''}: {args.threads} thread(s), prompt "
                    f"{args.prompt_len}, {args.new_tokens} new tokens, {args.rounds} interleaved rounds",
                    ["path", "decode tok/s", "per round", "prefill tok/s", "TTFT ms", "peak MiB", "weights MiB",
                     "MBU", "build (wall / CPU / peak RSS)", "load"], rows,
                    caption=(f"{n_cont} of {len(rows)} rows CONTENDED (CPU share per process < {MIN_CPU_SHARE}): the "
                             "figures include waiting; compare ratios within a round" if n_cont else
                             f"every row had a CPU share >= {MIN_CPU_SHARE}") + "; MBU = decode x bytes per token / "
                            "this machine's measured copy bandwidth")
        result["shapes"][shape] = {"layers": args.layers, "paths": summary, "contended_rows": n_cont}
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
