"""Pruning and distillation numbers for issue 4 on stories260K (rerunnable; table + JSON last line).

    .venv/bin/python scripts/prune_distill.py --threads 1 --jobs 4 --steps 400 --out edgepack-runs/prune-bench

1. one-shot pruning: held-out perplexity of dense, 50% unstructured (magnitude / wanda / sparsegpt), 2:4 with each
   criterion, depth (drop each single layer; the measured importance's choice) and width (25% of MLP channels);
2. healing: depth 5 -> 4 layers and width -25% MLP, each fine-tuned with distillation (KL + CE) and with plain CE
   (alpha = 1), same data, steps and schedule, through the real `prune` and `distill` stages (manifests kept in --out);
   the training runs go in parallel processes (--jobs), one torch thread each by default;
3. artifact bytes and CPU decode tokens/s (deploy.runtime.open_runtime + deploy.generation.generate), dense vs pruned,
   measured alternately in one process, median over --rounds.

Data: the TinyStories sample, one token stream, first 90% to calibrate / train, last 10% held out (edgepack-ppl-v1,
window 512, stride 256, BOS once). The CPU is shared: steps and seconds are reported as measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "stories260K"
DATA = ROOT.parent / "shared" / "data" / "tinystories-valid-sample.txt"


def one_shot(model_dir: Path, data: Path, threads: int) -> list[dict]:
    import torch

    from edgepack.compress import prune_algos as pa
    from edgepack.compress.prune import PruneConfig, chunk, heldout_perplexity, prune_model, split_stream
    from edgepack.hf import load_model, load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(model_dir)
    train, held, _ = split_stream(tok, data, 0.1)
    calib = chunk(train, 256, 16384)
    dense = load_model(model_dir, device="cpu", dtype=torch.float32)
    rows = [{"name": "dense", "ppl": heldout_perplexity(dense, tok, held).perplexity, "seconds": 0.0,
             "sparsity": round(pa.sparsity_of(dense), 4), "params": sum(p.numel() for p in dense.parameters())}]
    cases = [("magnitude 50%", PruneConfig(method="magnitude")), ("wanda 50%", PruneConfig(method="wanda")),
             ("sparsegpt 50%", PruneConfig(method="sparsegpt"))]
    cases += [(f"2:4 {c}", PruneConfig(method="2:4", criterion=c)) for c in ("magnitude", "wanda", "sparsegpt")]
    cases += [(f"depth: drop layer {i}", PruneConfig(method="depth", layers=(i,))) for i in range(len(pa.decoder_layers(dense)))]
    cases += [("depth 0.2 (importance)", PruneConfig(method="depth", sparsity=0.2)),
              ("width 25% MLP", PruneConfig(method="width", sparsity=0.25))]
    for name, cfg in cases:
        t0 = time.perf_counter()
        model, details = prune_model(copy.deepcopy(dense), cfg, calib)
        secs = time.perf_counter() - t0
        rows.append({"name": name, "ppl": heldout_perplexity(model, tok, held).perplexity, "seconds": round(secs, 1),
                     "sparsity": round(pa.sparsity_of(model), 4), "params": sum(p.numel() for p in model.parameters()),
                     **{k: v for k, v in details.items() if k in ("removed_layers", "layer_importance", "pattern_ok")}})
        print(f"  {name}: ppl {rows[-1]['ppl']:.3f} ({secs:.0f} s)", file=sys.stderr, flush=True)
    base = rows[0]["ppl"]
    mag = next(r for r in rows if r["name"] == "magnitude 50%")["ppl"] - base
    for r in rows:
        r["increase"] = r["ppl"] - base
        r["increase_vs_magnitude"] = r["increase"] / mag if mag else None
    return rows


def heal(job: dict) -> dict:
    """One prune -> distill run through the real stages (a worker process)."""
    import torch

    from edgepack.artifact import open_artifact
    from edgepack.compress.distill import DistillConfig, distill
    from edgepack.compress.prune import PruneConfig, prune

    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    pruned_dir = out / f"pruned-{job['method']}"
    if (pruned_dir / "edgepack.json").is_file():
        pruned = open_artifact(pruned_dir)
    else:
        pruned = prune(open_artifact(job["model"]), PruneConfig(**job["prune"]), None, pruned_dir, force=True)
    cfg = DistillConfig(**job["distill"])
    dst = out / f"{job['method']}-{job['name']}"
    art = open_artifact(dst) if (dst / "edgepack.json").is_file() else distill(pruned, cfg, None, dst, force=True,
                                                                            show_progress=False)
    m = art.history[-1]["metrics"]
    return {"run": f"{job['method']} + {job['name']}", "path": str(dst), "pruned_ppl": pruned.history[-1]["metrics"]["ppl_after"],
            **{k: m[k] for k in ("teacher_ppl", "ppl_before", "ppl_after", "ratio_to_teacher", "kl_to_teacher", "steps",
                                 "best_step", "stopped", "train_seconds", "train_cpu_seconds", "tokens_seen", "params",
                                 "bytes")},
            "stage_seconds": art.history[-1]["seconds"], "alpha": art.history[-1]["config"]["alpha"],
            "temperature": art.history[-1]["config"]["temperature"]}


def decode_speed(paths: dict[str, Path], threads: int, rounds: int, new_tokens: int) -> dict[str, dict]:
    import numpy as np

    from edgepack.artifact import open_artifact
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.runtime import open_runtime
    from edgepack.facts import weight_bytes

    rts = {n: open_runtime(open_artifact(p), threads=threads) for n, p in paths.items()}
    prompt = np.array([[1, 403, 407, 261, 1119 % 512, 280, 260, 400]], dtype=np.int64)
    gcfg = GenerationConfig(max_new_tokens=new_tokens)
    speeds: dict[str, list[float]] = {n: [] for n in rts}
    cpu: dict[str, list[float]] = {n: [] for n in rts}
    for rt in rts.values():  # warm-up
        generate(rt, prompt, GenerationConfig(max_new_tokens=8))
    for _ in range(rounds):  # alternate so that load changes hit every model alike
        for n, rt in rts.items():
            c0 = time.process_time()  # CPU time of this process: what a shared CPU cannot inflate (1 thread)
            res = generate(rt, prompt, gcfg)
            speeds[n].append(res.decode_tokens_per_s)
            cpu[n].append(res.tokens.shape[1] / (time.process_time() - c0))
    return {n: {"bytes": weight_bytes(paths[n]), "decode_tokens_per_s": statistics.median(v),
                "decode_tokens_per_s_all": [round(x, 1) for x in v],
                "tokens_per_cpu_s": statistics.median(cpu[n])} for n, v in speeds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="edgepack-runs/prune-bench")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=4, help="training runs in parallel")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=0.3, help="CE weight of the plain 'kd' runs")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-max-tokens", type=int, default=8192, help="held-out tokens per in-training evaluation")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-one-shot", action="store_true")
    ap.add_argument("--runs", default="depth-kd,depth-ce,width-kd,width-ce",
                    help="healing runs, comma-separated: depth-kd, depth-ce, width-kd, width-ce, or a variant "
                         "depth-kd:ALPHA:T (empty: none); finished runs in --out are reused, not retrained")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()

    import torch

    from edgepack.output import print_table

    torch.set_num_threads(args.threads)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": args.model, "data": args.data, "threads": args.threads, "jobs": args.jobs}
    t0 = time.perf_counter()
    if not args.skip_one_shot:
        rows = one_shot(Path(args.model), Path(args.data), args.threads)
        result["one_shot"] = rows
        print_table("one-shot pruning, held-out perplexity (last 10% of the TinyStories sample, edgepack-ppl-v1)",
                    ["method", "ppl", "increase", "increase / magnitude's", "sparsity", "params", "seconds"],
                    [[r["name"], f"{r['ppl']:.3f}", f"{r['increase']:+.3f}",
                      "-" if r["increase_vs_magnitude"] is None else f"{r['increase_vs_magnitude']:.3f}",
                      f"{r.get('sparsity', 0):.3f}", f"{r.get('params', 0):,}", f"{r['seconds']:.1f}"] for r in rows])

    distill_common = {"data": args.data, "teacher": args.model, "steps": args.steps, "batch_size": args.batch_size,
                      "lr": args.lr, "temperature": args.temperature, "eval_every": args.eval_every,
                      "checkpoint_every": args.eval_every, "eval_max_tokens": args.eval_max_tokens, "patience": 0,
                      "threads": args.threads}
    prunes = {"depth": {"method": "depth", "sparsity": 0.2, "calib": args.data},
              "width": {"method": "width", "sparsity": 0.25, "calib": args.data}}
    wanted = [r for r in args.runs.split(",") if r]
    for p in sorted({r.split("-")[0] for r in wanted}):  # prune once, before the workers race to make the same student
        heal_job = {"method": p, "prune": prunes[p], "model": args.model, "out": str(out), "threads": args.threads,
                    "name": "none", "distill": {}}
        from edgepack.artifact import open_artifact
        from edgepack.compress.prune import PruneConfig, prune

        if not (out / f"pruned-{p}" / "edgepack.json").is_file():
            prune(open_artifact(args.model), PruneConfig(**heal_job["prune"]), None, out / f"pruned-{p}", force=True)
    jobs = []
    for run in wanted:  # depth-kd | depth-ce | width-kd | width-ce | depth-kd:ALPHA:T (a variant)
        p, _, kind = run.partition("-")
        kind, *alpha_t = kind.split(":")
        alpha, temp = (float(alpha_t[0]), float(alpha_t[1])) if alpha_t else (1.0 if kind == "ce" else args.alpha,
                                                                             args.temperature)
        name = kind if not alpha_t else f"{kind}-a{alpha:g}-t{temp:g}"
        jobs.append({"method": p, "prune": prunes[p], "model": args.model, "out": str(out), "threads": args.threads,
                     "name": name, "distill": {**distill_common, "alpha": alpha, "temperature": temp}})
    heals = []
    if jobs:
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            heals = list(pool.map(heal, jobs))
        result["heal"] = heals
    if heals:
        print_table(f"healing: distillation (CE weight alpha, temperature T) vs plain CE (alpha 1), "
                    f"{args.steps} steps x {args.batch_size} x 256 tokens, {args.jobs} runs in parallel",
                    ["run", "alpha", "T", "teacher ppl", "pruned ppl", "healed ppl", "x teacher", "KL to teacher", "steps (best)",
                     "train s (wall)", "train s (CPU)", "stopped"],
                    [[h["run"], f"{h['alpha']:g}", f"{h['temperature']:g}", f"{h['teacher_ppl']:.3f}", f"{h['pruned_ppl']:.3f}", f"{h['ppl_after']:.3f}",
                      f"{h['ratio_to_teacher']:.3f}", f"{h['kl_to_teacher']:.4f}", f"{h['steps']} ({h['best_step']})",
                      f"{h['train_seconds']:.0f}", f"{h['train_cpu_seconds']:.0f}", h["stopped"]] for h in heals])

    if args.skip_decode or not all((p / "edgepack.json").is_file() for p in (out / "depth-kd", out / "width-kd")):
        print(json.dumps(result, default=str))
        return
    speed_paths = {"dense": Path(args.model), "depth 4/5 + kd": out / "depth-kd", "width -25% MLP + kd": out / "width-kd"}
    speeds = decode_speed(speed_paths, args.threads, args.rounds, args.new_tokens)
    result["decode"] = speeds
    d = speeds["dense"]
    print_table(f"bytes and CPU decode tokens/s (torch-cpu runtime, {args.threads} thread(s), {args.new_tokens} new "
                f"tokens, median of {args.rounds} alternating rounds)",
                ["model", "bytes", "x dense", "decode tok/s (wall)", "x dense", "all rounds", "tokens / CPU s",
                 "x dense"],
                [[n, f"{s['bytes']:,}", f"{s['bytes'] / d['bytes']:.3f}", f"{s['decode_tokens_per_s']:.1f}",
                  f"{s['decode_tokens_per_s'] / d['decode_tokens_per_s']:.3f}", str(s["decode_tokens_per_s_all"]),
                  f"{s['tokens_per_cpu_s']:.1f}", f"{s['tokens_per_cpu_s'] / d['tokens_per_cpu_s']:.3f}"]
                 for n, s in speeds.items()])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
