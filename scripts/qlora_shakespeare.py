"""QLoRA (NF4 base) vs plain fp32 LoRA on stories260K + tinyshakespeare, side by side in one process.

    .venv/bin/python scripts/qlora_shakespeare.py [--steps 400] [--lr 3e-3] [--methods qlora,lora] [--threads 1]

The data goes through `tune prepare` (paragraphs, de-duplicated, seeded 8:1:1 split). Held-out perplexity is the
edgepack-ppl-v1 protocol (window 512, stride 256, BOS once) on the test split's paragraphs joined by blank lines;
forgetting is the same protocol on the TinyStories sample (first --ts-tokens tokens). The stage's own masked
validation perplexity and the adapter-vs-merged difference come from the manifest. Prints a table, then one JSON line.
The CPU is shared: train seconds are wall time and CPU seconds are reported beside them (contention = wall / CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "stories260K"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
TINYSTORIES = SHARED / "data" / "tinystories-valid-sample.txt"


def ppl_on(art_path: Path, text_path: Path, max_tokens: int | None) -> float:
    from edgepack.artifact import open_artifact
    from edgepack.quality import PplProtocol, evaluate_artifact

    return evaluate_artifact(open_artifact(art_path), text_path, PplProtocol(max_tokens=max_tokens)).perplexity


def merge_into_original(art_path: Path, out: Path) -> Path:
    """The trained adapter merged into the ORIGINAL fp32 base instead (the stage's merge_into='original')."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgepack.hf import save_model

    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, art_path / "adapter").merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    save_model(merged, out, tokenizer_from=MODEL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--methods", default="qlora,lora")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ts-tokens", type=int, default=40_000, help="TinyStories tokens scored for forgetting")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from edgepack.artifact import open_artifact
    from edgepack.output import print_table
    from edgepack.tune.data import PrepareConfig, load_prepared, prepare, split_text, write_prepared
    from edgepack.tune.qlora import TuneConfig, tune

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    data_dir = work / "shakespeare"
    if not (data_dir / "report.json").is_file():
        write_prepared(prepare(SHAKESPEARE, PrepareConfig(seed=0)), data_dir)
    prep = load_prepared(data_dir)
    test_txt = work / "shakespeare-test.txt"
    test_txt.write_text(split_text(prep, "test"))

    base = {"method": "base (fp32)", "test_ppl": ppl_on(MODEL, test_txt, None),
            "tinystories_ppl": ppl_on(MODEL, TINYSTORIES, args.ts_tokens)}
    rows = [base]
    src = open_artifact(MODEL)
    for method in args.methods.split(","):
        cfg = TuneConfig(data=str(data_dir), method=method, rank=args.rank, alpha=2.0 * args.rank, dropout=args.dropout,
                         seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                         eval_every=50, patience=0, save_every=10 ** 6, threads=args.threads)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        t0 = time.perf_counter()
        art = tune(src, cfg, None, work / f"out-{method}", force=True)
        wall = time.perf_counter() - t0
        cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0
        m = art.history[-1]["metrics"]
        rows.append({"method": method, "steps": m["steps"], "train_s": m["train_seconds"],
                     "train_cpu_s": m.get("train_cpu_seconds"), "stage_wall_s": round(wall, 1),
                     "stage_cpu_s": round(cpu, 1), "tokens_per_s": m["tokens_per_s"], "val_ppl_start": m["ppl_start"],
                     "val_ppl_adapter": m["ppl_adapter"], "val_ppl_merged": m["ppl_after"],
                     "merge_rel_diff": m["merge_rel_diff"], "test_ppl": ppl_on(art.path, test_txt, None),
                     "tinystories_ppl": ppl_on(art.path, TINYSTORIES, args.ts_tokens), "layers_4bit": m["layers_4bit"],
                     "peak_rss_mib": round(m["peak_memory_bytes"] / 2 ** 20), "val_ppl_base": m["ppl_before"],
                     "curve": m["curve"]})
        if method == "qlora":  # the alternative merge: what the NF4 error of the base costs after tuning
            alt = merge_into_original(art.path, work / "qlora-merged-original")
            rows.append({"method": "qlora, merged into original fp32", "test_ppl": ppl_on(alt, test_txt, None),
                         "tinystories_ppl": ppl_on(alt, TINYSTORIES, args.ts_tokens)})
    load = os.getloadavg()
    cols = ["method", "steps", "train_s", "train_cpu_s", "val_ppl_base", "val_ppl_start", "val_ppl_adapter", "val_ppl_merged",
            "merge_rel_diff", "test_ppl", "tinystories_ppl"]
    print_table(f"stories260K on tinyshakespeare: {args.steps} steps of {args.batch_size}x{args.seq_len} tokens, "
                f"r={args.rank}, lr {args.lr}, {args.threads} thread(s); load average {load[0]:.1f}", cols,
                [[r.get(c, "-") if not isinstance(r.get(c), float) else f"{r[c]:.4g}" for c in cols] for r in rows],
                caption="test_ppl / tinystories_ppl: edgepack-ppl-v1; val_ppl: masked packed blocks (stage metric)")
    print(json.dumps({"bench": "qlora_shakespeare", "args": {k: str(v) for k, v in vars(args).items()},
                      "loadavg_1m": load[0], "results": rows}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
