"""Mixing general data into tuning, and task quality through tune -> INT4 quantize, on stories260K (CPU).

    .venv/bin/python scripts/tune_mix.py forgetting [--steps 400] [--lr 3e-3] [--threads 1]
    .venv/bin/python scripts/tune_mix.py tasks [--steps 400] [--seeds 0,1] [--samples 200] [--threads 1]

forgetting: QLoRA on tinyshakespeare alone vs a 0.7 / 0.3 Shakespeare / TinyStories mix (tune.data.prepare_mix),
side by side in one process, same schedule. Held-out perplexity (edgepack-ppl-v1, window 512 / stride 256) on each
source's own test split (the mix splits each source 8:1:1 on its own with the same seed, so the Shakespeare test
split is the one the unmixed run holds out too, and the TinyStories test paragraphs were trained on by neither).

tasks: edgepack-task-v1 metrics (exact match, token F1, ROUGE-L, BLEU; greedy, 64 new tokens) on the held-out test
split of alpaca-sample.jsonl (data_seed 0): the base model, then QLoRA on a 0.7 / 0.3 Alpaca / TinyStories mix for
each seed, then each tuned model INT4-quantized (int4-gptq, ONNX MatMulNBits, the cpu-x86-64 path) through the
quantize stage with its task gate recording before / after / drop. Noise: the standard error of every mean, the
paired standard error of every drop, the difference between the two tuning seeds, and between two disjoint halves of
the items. Prints tables, then one JSON line. The CPU is shared: wall and CPU seconds are both reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEPACK_SHARED") or ROOT.parent / "shared")
MODEL = SHARED / "models" / "stories260K"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
TINYSTORIES = SHARED / "data" / "tinystories-valid-sample.txt"
ALPACA = SHARED / "data" / "alpaca-sample.jsonl"


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ppl(art_path: Path, text: Path) -> float:
    from edgepack.artifact import open_artifact
    from edgepack.quality import evaluate_artifact

    return evaluate_artifact(open_artifact(art_path), text).perplexity


def tune_cfg(args, data, seed: int = 0):
    from edgepack.tune.qlora import TuneConfig

    return TuneConfig(data=data, method="qlora", rank=16, alpha=32.0, dropout=0.0, seq_len=256, batch_size=8,
                      steps=args.steps, lr=args.lr, eval_every=50, patience=0, save_every=10 ** 6,
                      threads=args.threads, seed=seed)


def run_tune(args, data, out: Path, seed: int = 0) -> tuple[Path, dict]:
    from edgepack.artifact import open_artifact
    from edgepack.tune.qlora import tune

    t0, c0 = time.perf_counter(), cpu_s()
    art = tune(open_artifact(MODEL), tune_cfg(args, data, seed), None, out, force=True)
    m = art.history[-1]["metrics"]
    return art.path, {"stage_wall_s": round(time.perf_counter() - t0, 1), "stage_cpu_s": round(cpu_s() - c0, 1),
                      "train_s": m["train_seconds"], "train_cpu_s": m["train_cpu_seconds"], "steps": m["steps"],
                      "val_ppl_before": m["ppl_before"], "val_ppl_after": m["ppl_after"],
                      "ppl_by_source": m.get("ppl_by_source"), "drawn": (m["data"].get("mix") or {}).get("sources")}


def forgetting(args, work: Path) -> dict:
    from edgepack.tune.data import PrepareConfig, parse_sources, prepare_mix, split_text

    mix = [f"{SHAKESPEARE}:0.7", f"{TINYSTORIES}:0.3"]
    from edgepack.hf import load_tokenizer

    prep = prepare_mix(parse_sources(mix), PrepareConfig(seed=0), load_tokenizer(MODEL))
    names = [s["name"] for s in prep.report["sources"]]
    texts = {}
    for name in names:
        texts[name] = work / f"{name}-test.txt"
        texts[name].write_text(split_text(prep, "test", source=name))
    rows = [{"run": "base stories260K (fp32)", **{f"{n}_test_ppl": ppl(MODEL, texts[n]) for n in names}}]
    for label, data in (("QLoRA, Shakespeare only", str(SHAKESPEARE)), ("QLoRA, mix 0.7 / 0.3", tuple(mix))):
        path, info = run_tune(args, data, work / label.split(",")[1].strip().replace(" ", "-").replace("/", ""))
        rows.append({"run": label, **{f"{n}_test_ppl": ppl(path, texts[n]) for n in names}, **info})
        print(f"[tune_mix] {label}: {rows[-1]}", file=sys.stderr, flush=True)
    base = rows[0]
    for r in rows:
        for n in names:
            r[f"{n}_x_base"] = round(r[f"{n}_test_ppl"] / base[f"{n}_test_ppl"], 3)
    return {"sources": names, "rows": rows,
            "tokens": {n: prep.report["sources"][i]["drawn"] for i, n in enumerate(names)}}


def task_eval(art, args, out: Path):
    """The eval stage with the task (its record lets the next lossy stage reuse the measurement as its 'before')."""
    from edgepack.compress.eval_stage import EvalConfig, eval_stage

    t0, c0 = time.perf_counter(), cpu_s()
    ev = eval_stage(art, EvalConfig(task=str(ALPACA), task_samples=args.samples, threads=args.threads), None, out,
                    force=True)
    summary = ev.history[-1]["metrics"]["task"]["after"]
    summary["wall_s"], summary["cpu_s"] = round(time.perf_counter() - t0, 1), round(cpu_s() - c0, 1)
    return ev, summary


def halves(values: list[float]) -> tuple[float, float]:
    h = len(values) // 2
    return sum(values[:h]) / h, sum(values[h:2 * h]) / h


def tasks(args, work: Path) -> dict:
    from edgepack.artifact import open_artifact
    from edgepack.compress.quantize import QuantizeConfig, quantize
    from edgepack.targets import load_target

    mix = (f"{ALPACA}:0.7", f"{TINYSTORIES}:0.3")
    out = {}
    _, out["base"] = task_eval(open_artifact(MODEL), args, work / "base-eval")
    print(f"[tune_mix] base: rougeL {out['base']['score']}", file=sys.stderr, flush=True)
    for seed in args.seeds:
        path, info = run_tune(args, mix, work / f"alpaca-s{seed}", seed)
        ev, out[f"tune_s{seed}"] = task_eval(open_artifact(path), args, work / f"alpaca-s{seed}-eval")
        out[f"tune_s{seed}"]["tune"] = info
        print(f"[tune_mix] tune seed {seed}: rougeL {out[f'tune_s{seed}']['score']}", file=sys.stderr, flush=True)
        t0, c0 = time.perf_counter(), cpu_s()
        q = quantize(ev, QuantizeConfig(method="int4-gptq", format="onnx", group_size=32, exporter="torchscript",
                                        calib_samples=32, task=str(ALPACA), task_samples=args.samples),
                     load_target("cpu-x86-64"), work / f"alpaca-s{seed}-int4", force=True)
        qm = q.history[-1]["metrics"]
        out[f"int4_s{seed}"] = {**qm["task"]["after"], "stage_task": {k: qm["task"][k] for k in
                                ("drop", "drop_stderr", "before_from")},
                                "ppl_before": qm["ppl_before"], "ppl_after": qm["ppl_after"],
                                "stage_wall_s": round(time.perf_counter() - t0, 1), "stage_cpu_s": round(cpu_s() - c0, 1)}
        print(f"[tune_mix] int4 seed {seed}: rougeL {out[f'int4_s{seed}']['score']} drop {qm['task']['drop']}",
              file=sys.stderr, flush=True)
    return out


def noise(res: dict, seeds: list[int]) -> dict:
    """Points of ROUGE-L (the gated metric, per item in the records) and of the other means: seed to seed, half to
    half of the items, and the paired standard error of each drop (also scaled to the default 64 items)."""
    import numpy as np

    d = {}
    items = {k: np.asarray(v["per_item"], dtype=np.float64) for k, v in res.items()}
    if len(seeds) >= 2:
        for kind in ("tune", "int4"):
            a, b = (res[f"{kind}_s{s}"] for s in seeds[:2])
            for m in ("exact_match", "f1", "rougeL", "bleu"):
                d[f"{kind} seed diff {m}"] = round(abs(a["generation"][m] - b["generation"][m]), 3)
    for name in res:
        h1, h2 = halves(list(items[name]))
        d[f"{name} half diff rougeL"] = round(abs(h1 - h2), 3)
    for s in seeds:
        for label, x, y in (("tune gain", f"tune_s{s}", "base"), ("int4 drop", f"tune_s{s}", f"int4_s{s}")):
            diff = items[x] - items[y]
            se = float(diff.std(ddof=1))
            d[f"{label} s{s} rougeL"] = round(float(diff.mean()), 3)
            d[f"{label} s{s} paired se"] = round(se / math.sqrt(len(diff)), 3)
            d[f"{label} s{s} paired se at 64 items"] = round(se / math.sqrt(64), 3)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("forgetting", "tasks"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--samples", type=int, default=200, help="held-out Alpaca items scored (tasks)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from edgepack.output import print_table

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tune-mix-"))
    work.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), cpu_s()
    load0 = os.getloadavg()[0]
    if args.what == "forgetting":
        res = forgetting(args, work)
        n = res["sources"]
        cols = ["run", *(f"{x} test ppl" for x in n), *(f"{x} x base" for x in n), "train wall / CPU s"]
        print_table(f"stories260K QLoRA, {args.steps} steps x 8 x 256 tokens, lr {args.lr}, r 16, {args.threads} thread",
                    cols, [[r["run"], *(f"{r[f'{x}_test_ppl']:.3f}" for x in n), *(f"{r[f'{x}_x_base']:.2f}x" for x in n),
                            f"{r['train_s']:.0f} / {r['train_cpu_s']:.0f}" if "train_s" in r else "-"]
                           for r in res["rows"]],
                    caption="edgepack-ppl-v1 on each source's own held-out test split (never trained on)")
    else:
        res = tasks(args, work)
        noise_ = noise(res, args.seeds)
        res["noise"] = noise_
        names = ["base"] + [f"{k}_s{s}" for s in args.seeds for k in ("tune", "int4")]

        def cell(s, key):
            g = s["generation"]
            return f"{g[key]:.2f} ± {g[key + '_stderr']:.2f}"

        print_table(f"alpaca-sample.jsonl held-out test split: {res['base']['scored_items']} items, greedy, 64 new "
                    f"tokens, {args.threads} thread", ["model", "exact match", "token F1", "ROUGE-L", "BLEU"],
                    [[n, cell(res[n], "exact_match"), cell(res[n], "f1"), cell(res[n], "rougeL"), cell(res[n], "bleu")]
                     for n in names], caption="x100, ± standard error over items (BLEU: bootstrap)")
        print_table("noise (points, x100)", ["what", "points"], [[k, str(v)] for k, v in res["noise"].items()])
    load1 = os.getloadavg()[0]
    print(json.dumps({"bench": "tune_mix", "what": args.what, "args": {k: str(v) for k, v in vars(args).items()},
                      "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu_s() - c0, 1),
                      "loadavg_1m": [load0, load1], "results": res}), flush=True)


if __name__ == "__main__":
    main()
