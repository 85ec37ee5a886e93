"""Quantization tables for the bench note.

    .venv/bin/python scripts/quantize_table.py [--model ../shared/models/stories260K] \\
        [--text ../shared/data/tinystories-valid-sample.txt] [--calib-fraction 0.9] [--groups 32,128] \\
        [--workdir edgepack-runs/bench/quantize] [--rounds 3] [--threads 1] [--skip quality|speed]

1. Quality (stories260K): method x group size -> perplexity, increase %, logits SQNR. Every row is a real
   `quantize` stage run: calibration on the first --calib-fraction of --text, perplexity (edgepack-ppl-v1) on the
   rest, measured on the written artifact through the same scorer as `edgepack eval`.
2. Size and decode speed (a 25.6M-parameter Llama built from a config, where weights, not overheads, dominate):
   bytes against fp32, and decode tokens/s for all artifacts measured in ONE process, interleaved in rounds (every
   artifact once per round, so slow phases of the shared CPU hit all alike); median over rounds, ratios to fp32.
Last line of stdout: JSON of both tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rows_to_run(groups: list[int]) -> list[tuple[str, str, int]]:
    """(method, format, group size) rows: the CPU path (onnx) for every integer method, torch for nf4 / fp8."""
    rows = [("int8", "onnx", 0), ("int8", "torch", 0)]
    for g in groups:
        rows += [(m, "onnx", g) for m in ("int4-rtn", "int4-hqq", "int4-awq", "int4-gptq", "int4-gptq-kd")]
    rows += [("int4-gptq", "torch", groups[0]), ("int4-gptq-kd", "torch", groups[0]), ("nf4", "torch", 0),
             ("fp8", "torch", 0)]
    return rows


# Speed rows on the 25M model: decode speed depends on the format, bits and block size, not on how the codes were
# chosen, so RTN codes stand for every int4 method (GPTQ's codes run through the very same MatMulNBits).
SPEED_ROWS = (("int8", "onnx", 0), ("int4-rtn", "onnx", 32), ("int4-rtn", "onnx", 128), ("int8", "torch", 0),
              ("int4-rtn", "torch", 32), ("nf4", "torch", 0), ("fp8", "torch", 0))


def decode_tokens_per_s(art, threads: int) -> float:
    import numpy as np

    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.runtime import open_runtime

    rt = open_runtime(art, threads=threads)
    prompt = np.arange(3, 19, dtype=np.int64)[None]
    generate(rt, prompt, GenerationConfig(max_new_tokens=8))  # warm-up
    return generate(rt, prompt, GenerationConfig(max_new_tokens=64)).decode_tokens_per_s


def quality_table(args, work: Path) -> list[dict]:
    from edgepack.artifact import open_artifact
    from edgepack.compress.quantize import QuantizeConfig, quantize
    from edgepack.output import print_table

    src = open_artifact(args.model)
    out = []
    for method, fmt, g in rows_to_run([int(x) for x in args.groups.split(",")]):
        cfg = QuantizeConfig(method=method, format=fmt, group_size=g or 32, calib=args.text,
                             calib_fraction=args.calib_fraction, eval_max_tokens=args.eval_max_tokens or None,
                             exporter=args.exporter)
        art = quantize(src, cfg, None, work / f"q-{method}-{fmt}-g{g}", force=True)
        m = art.history[-1]["metrics"]
        out.append({"method": method, "format": art.format, "group_size": g, "ppl_before": m["ppl_before"],
                    "ppl_after": m["ppl_after"], "increase_pct": m["ppl_increase_pct"], "sqnr_db": m["sqnr_db"],
                    "argmax_agreement": m["argmax_agreement"], "eval_tokens": m["eval_tokens"],
                    "quantize_s": art.history[-1]["seconds"]})
        print(f"  {method} {fmt} g{g}: ppl {m['ppl_after']:.4f} ({m['ppl_increase_pct']:+.2f}%)", file=sys.stderr,
              flush=True)
    print_table(f"quantize quality: {Path(args.model).name}, calibration = first {args.calib_fraction:.0%} of "
                f"{Path(args.text).name}, perplexity on the rest ({out[0]['eval_tokens']} tokens, edgepack-ppl-v1)",
                ["method", "format", "group", "ppl", "increase", "SQNR dB", "argmax agree"],
                [["fp32", "-", "-", f"{out[0]['ppl_before']:.4f}", "-", "-", "-"]]
                + [[r["method"], r["format"], str(r["group_size"] or "channel"), f"{r['ppl_after']:.4f}",
                    f"{r['increase_pct']:+.2f}%", f"{r['sqnr_db']:.1f}", f"{r['argmax_agreement']:.3f}"] for r in out])
    return out


def speed_table(args, work: Path) -> list[dict]:
    """Size and decode speed on a 25M-parameter Llama built from a config (random weights: speed and size only)."""
    from edgepack.artifact import open_artifact
    from edgepack.bench.shapes import build_llama_25m
    from edgepack.compress.quantize import QuantizeConfig, quantize
    from edgepack.deploy.onnx_export import ExportConfig, export_onnx
    from edgepack.output import fmt_bytes, print_table

    path = work / "llama-25m"
    src = open_artifact(path if (path / "config.json").is_file() else build_llama_25m(path))
    fp32_bytes = sum(v["bytes"] for k, v in src.files.items() if k.endswith(".safetensors"))
    arts = {("fp32", "hf", 0): src,
            ("fp32", "onnx", 0): export_onnx(src, ExportConfig(exporter=args.exporter, greedy_tokens=0), None,
                                             work / "s-fp32-onnx", force=True)}
    for method, fmt, g in SPEED_ROWS:
        cfg = QuantizeConfig(method=method, format=fmt, group_size=g or 32, eval_max_tokens=256, exporter=args.exporter)
        arts[(method, fmt, g)] = quantize(src, cfg, None, work / f"s-{method}-{fmt}-g{g}", force=True)
    speeds: dict = {k: [] for k in arts}
    for _ in range(args.rounds):  # interleaved: every artifact once per round
        for k, art in arts.items():
            speeds[k].append(decode_tokens_per_s(art, args.threads))
    base = {"hf": statistics.median(speeds[("fp32", "hf", 0)]), "onnx": statistics.median(speeds[("fp32", "onnx", 0)])}
    out = []
    for (method, fmt, g), art in arts.items():
        size = sum(v["bytes"] for k, v in art.files.items() if k.endswith((".safetensors", ".onnx", ".data")))
        tps = statistics.median(speeds[(method, fmt, g)])
        out.append({"method": method, "format": art.format, "group_size": g, "bytes": size,
                    "size_vs_fp32": round(size / fp32_bytes, 4), "decode_tokens_per_s": round(tps, 1),
                    "decode_spread": [round(min(speeds[(method, fmt, g)]), 1), round(max(speeds[(method, fmt, g)]), 1)],
                    "x_fp32_hf": round(tps / base["hf"], 2), "x_fp32_onnx": round(tps / base["onnx"], 2)})
    print_table(f"quantize size and decode speed: 25.6M-parameter Llama (hidden 512, 8 layers), this CPU, "
                f"{args.threads} thread(s), median of {args.rounds} interleaved rounds, 64 tokens after a 16-token prompt",
                ["method", "format", "group", "size", "size / fp32", "decode tok/s (min-max)", "x fp32 torch",
                 "x fp32 onnx"],
                [[r["method"], r["format"], "-" if r["method"] == "fp32" else str(r["group_size"] or "channel"),
                  fmt_bytes(r["bytes"]),
                  f"{r['size_vs_fp32']:.3f}", f"{r['decode_tokens_per_s']:.0f} ({r['decode_spread'][0]:.0f}-"
                  f"{r['decode_spread'][1]:.0f})", f"{r['x_fp32_hf']:.2f}", f"{r['x_fp32_onnx']:.2f}"] for r in out],
                caption="torch-quant runs dequantized fp32 weights on CPU except int8 (torch's int8 kernel); onnx int4 = "
                        "MatMulNBits accuracy_level 4, int8 = 8-bit MatMulNBits")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared/models/stories260K"))
    ap.add_argument("--text", default=str(ROOT.parent / "shared/data/tinystories-valid-sample.txt"))
    ap.add_argument("--calib-fraction", type=float, default=0.9, help="share of --text used for calibration")
    ap.add_argument("--groups", default="32,128")
    ap.add_argument("--eval-max-tokens", type=int, default=0, help="0 = the whole held-out text")
    ap.add_argument("--workdir", default="edgepack-runs/bench/quantize")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--exporter", default="torchscript", help="onnx exporter (dynamo | torchscript)")
    ap.add_argument("--skip", choices=("quality", "speed"), help="leave one table out")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    quality = quality_table(args, work) if args.skip != "quality" else []
    speed = speed_table(args, work) if args.skip != "speed" else []
    print(json.dumps({"model": args.model, "text": args.text, "calib_fraction": args.calib_fraction,
                      "quality": quality, "speed_25m": speed}))


if __name__ == "__main__":
    main()
