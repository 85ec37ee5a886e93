"""Side-by-side bench of several artifacts in ONE process, interleaved in rounds, for the bench note.

    .venv/bin/python scripts/compare_table.py --make-25m edgepack-runs/bench/llama-25m     # build the 25M model once
    .venv/bin/python scripts/compare_table.py stories-fp32=../shared/models/stories260K \\
        25m-fp32=edgepack-runs/bench/llama-25m  25m-int8=PATH:onnxruntime ...  [--rounds 3 --runs 5 --threads 1]

Each round benchmarks every artifact once (edgepack.bench.run.run_bench, protocol edgepack-bench-v1), so slow
phases of the shared machine hit all artifacts alike; the table quotes, per artifact, the median over rounds of the
per-round median decode tokens/s, the spread across rounds, the ratio to the first artifact of the same model,
and peak RSS (from a short bench of each artifact in a fresh process) next to fit's predicted peak. Last line of
stdout: the JSON of all records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def fresh_process_memory(path: str, runtime: str | None, args) -> dict:
    """Peak RSS of one short bench of `path` in a new process: in the shared process, earlier artifacts' freed memory
    stays in the allocator's heap and inflates later artifacts' peaks."""
    import subprocess

    cmd = [sys.executable, "-m", "edgepack.cli", "bench", path, "--runs", "2", "--warmup", "1", "--threads",
           str(args.threads), "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--target",
           "cpu-x86-64", "--json"] + (["--runtime", runtime] if runtime else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rec = json.loads(out.strip().splitlines()[-1])
    return {"peak_memory_bytes": rec["peak_memory_bytes"], "load_peak_rss_bytes": rec["load_peak_rss_bytes"],
            "predicted_peak_memory_bytes": rec["points"][0].get("predicted_peak_memory_bytes")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="*", help="LABEL=PATH or LABEL=PATH:RUNTIME")
    ap.add_argument("--make-25m", type=Path, help="build the 25M-parameter model here and exit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", default="local")
    ap.add_argument("--realtime", action="store_true", help="time under SCHED_FIFO (see edgepack bench --realtime)")
    args = ap.parse_args(argv)
    if args.make_25m:
        from edgepack.bench.shapes import build_llama_25m

        build_llama_25m(args.make_25m)
        return

    from edgepack.artifact import open_artifact
    from edgepack.bench.run import BenchConfig, run_bench
    from edgepack.output import print_table
    from edgepack.targets import load_target

    target = load_target(args.target)
    entries = []
    for spec in args.artifacts:
        lab, _, rest = spec.partition("=")
        path, _, runtime = rest.partition(":")
        entries.append((lab, open_artifact(path), runtime or None))
    rounds: dict[str, list[dict]] = {lab: [] for lab, _, _ in entries}
    for r in range(args.rounds):
        for lab, art, runtime in entries:
            cfg = BenchConfig(runtime=runtime, prompt_lens=(args.prompt_len,), gen_lens=(args.gen_len,), runs=args.runs,
                              warmup=args.warmup, threads=args.threads, realtime=args.realtime)
            rec = run_bench(art, cfg, target)
            print(f"round {r + 1} {lab}: decode {rec['decode_tokens_per_s']:.1f} tok/s, peak "
                  f"{rec['peak_memory_bytes'] / 2**20:.1f} MiB", file=sys.stderr, flush=True)
            rounds[lab].append(rec)
    fresh = {lab: fresh_process_memory(str(art.path), runtime, args) for lab, art, runtime in entries}
    rows, summary = [], []
    first_of_model: dict[str, float] = {}
    for lab, _, _ in entries:
        recs = rounds[lab]
        dec = [x["decode_tokens_per_s"] for x in recs]
        med = statistics.median(dec)
        model = lab.split("-")[0]
        ref = first_of_model.setdefault(model, med)
        last = recs[-1]
        peak = fresh[lab]["peak_memory_bytes"]
        pred = fresh[lab]["predicted_peak_memory_bytes"]
        summary.append({"label": lab, "artifact": last["artifact"], "runtime": last["runtime"],
                        "precision": last["precision"], "decode_tokens_per_s_rounds": dec,
                        "decode_tokens_per_s": med, "vs_first_of_model": med / ref,
                        "prefill_tokens_per_s": statistics.median(x["prefill_tokens_per_s"] for x in recs),
                        "ttft_ms": statistics.median(x["ttft_ms"] for x in recs), "peak_memory_bytes": peak,
                        "predicted_peak_memory_bytes": pred, "artifact_bytes": last["artifact_bytes"],
                        "load_peak_rss_bytes": fresh[lab]["load_peak_rss_bytes"],
                        "weight_precision_in_memory": last.get("weight_precision_in_memory"),
                        "bandwidth_utilization": statistics.median(x["bandwidth_utilization"] for x in recs),
                        "device": last["device"]["name"], "threads": last["device"]["threads"]})
        rows.append([lab, last["runtime"], f"{med:,.1f}", " / ".join(f"{d:,.0f}" for d in dec), f"{med / ref:.2f}x",
                     f"{summary[-1]['prefill_tokens_per_s']:,.0f}", f"{summary[-1]['ttft_ms']:.2f}",
                     f"{peak / 2**20:.1f}", "-" if pred is None else f"{pred / 2**20:.1f}",
                     "-" if pred is None else f"{peak / pred:.2f}", f"{last['artifact_bytes'] / 2**20:.2f}",
                     f"{summary[-1]['bandwidth_utilization']:.1%}"])
    print_table(f"bench side by side on {summary[0]['device']}, {args.threads} thread(s), prompt {args.prompt_len}, "
                f"generate {args.gen_len}, {args.rounds} rounds x {args.runs} runs",
                ["artifact", "runtime", "decode tok/s", "per round", "vs first", "prefill tok/s", "TTFT ms",
                 "peak MiB", "fit MiB", "peak/fit", "size MiB", "MBU"], rows,
                caption="medians over rounds of per-round medians; 'vs first' = ratio to the first artifact of the "
                        f"same model; MBU against {target.name} ({target.bandwidth_bytes_per_s / 1e9:.1f} GB/s)")
    print(json.dumps({"rounds": args.rounds, "runs": args.runs, "threads": args.threads, "results": summary,
                      "records": {lab: recs for lab, recs in rounds.items()}}, default=str))


if __name__ == "__main__":
    main()
