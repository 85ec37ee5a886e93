"""`edgepack tune prepare` and `edgepack tune qlora`. Torch-free at import time; the work happens in the library."""

from __future__ import annotations

import os
from pathlib import Path

import click

from edgepack.commands import force_opt, headline, json_opt, trust_opt
from edgepack.output import emit_json, fmt_bytes, print_table


@click.group("tune")
def tune_group():
    """Fine-tune a model on your data: prepare the data, then QLoRA / LoRA with a merged full-precision output."""


def _first(items: list[dict], n: int = 5) -> str:
    where = [str(d.get("line", d.get("where"))) + (f" ({d['reason']})" if "reason" in d else "") for d in items[:n]]
    return "; ".join(where) + (f"; ... {len(items) - n} more" if len(items) > n else "")


@tune_group.command("prepare")
@click.argument("data", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for train/validation/test.jsonl + report.json.")
@click.option("--seed", default=0, show_default=True, help="Seed of the train/validation/test split.")
@click.option("--split", default="0.8,0.1,0.1", show_default=True, help="train,validation,test fractions.")
@click.option("--near-dup-threshold", default=0.8, show_default=True,
              help="Word-3-shingle Jaccard at which two records are near-duplicates (0 disables).")
@click.option("--no-strip-markup", is_flag=True, help="Keep HTML tags and entities.")
@click.option("--strict", is_flag=True, help="Fail on the first malformed line instead of reporting and dropping it.")
@click.option("--model", type=click.Path(), help="Tokenizer (model folder) for token counts and loss-mask statistics.")
@click.option("--seq-len", default=256, show_default=True, help="Packed sequence length for the statistics.")
@force_opt
@json_opt
def prepare_cmd(data, output, seed, split, near_dup_threshold, no_strip_markup, strict, model, seq_len, force, as_json):
    """Clean, de-duplicate and split DATA (.jsonl instruction/chat/text records, .json array, or .txt)."""
    from edgepack.artifact import check_output_dir
    from edgepack.config import build_config
    from edgepack.errors import ConfigError
    from edgepack.tune.data import PrepareConfig, prepare, write_prepared

    check_output_dir(Path(output), force)
    try:
        fractions = [float(x) for x in split.split(",")]
    except ValueError:
        raise ConfigError(f"--split '{split}' is not three comma-separated numbers", "e.g. --split 0.8,0.1,0.1") from None
    cfg = build_config(PrepareConfig, {"seed": seed, "split": fractions, "strip_markup": not no_strip_markup,
                                       "near_dup_threshold": near_dup_threshold or None}, "tune prepare options")
    prep = prepare(data, cfg)
    bad = prep.report["dropped"]["malformed"]
    if strict and bad:
        raise ConfigError(f"{data}: line {bad[0]['line']}: {bad[0]['reason']} ({len(bad)} malformed in all)",
                          "fix the lines, or run without --strict to drop and report them")
    if model:
        from edgepack.hf import load_tokenizer
        from edgepack.tune.data import tokenize_splits

        _, stats = tokenize_splits(prep, load_tokenizer(model), seq_len)
        prep.report["tokens"] = {"seq_len": seq_len, **stats}
    write_prepared(prep, Path(output))
    r = prep.report
    if as_json:
        emit_json({"output": str(output), **{k: v for k, v in r.items() if k != "dropped"}})
        return
    rows = [["lines read", f"{r['lines']:,} ({r['blank_lines']:,} blank)"], ["records read", f"{r['records_read']:,}"],
            ["changed by cleaning", f"{r['records_changed_by_cleaning']:,}"]]
    for reason, items in r["dropped"].items():
        rows.append([f"dropped: {reason.replace('_', ' ')}", f"{len(items):,}" + (f"  [{_first(items)}]" if items else "")])
    rows.append(["kept", f"{r['records_kept']:,} ({', '.join(f'{k} {v:,}' for k, v in r['kinds'].items())})"])
    rows.append([f"split (seed {seed})", ", ".join(f"{k} {v:,}" for k, v in r["splits"].items())])
    for name, st in r.get("tokens", {}).items():
        if isinstance(st, dict):
            rows.append([f"tokens: {name}", f"{st['tokens']:,} ({st['loss_tokens'] / max(st['tokens'], 1):.0%} carry loss), "
                         f"{st['blocks']:,} blocks of {seq_len}"])
    print_table(f"tune prepare: {data} -> {output}", ["", ""], rows, caption="full list of dropped lines in report.json")


@tune_group.command("qlora")
@click.argument("model", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Data file (.jsonl/.json/.txt) or a 'tune prepare' folder.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@click.option("--method", type=click.Choice(("qlora", "lora")), default="qlora", show_default=True,
              help="qlora: 4-bit NF4 base; lora: full-precision base.")
@click.option("--rank", default=16, show_default=True)
@click.option("--alpha", default=32.0, show_default=True)
@click.option("--dropout", default=0.05, show_default=True)
@click.option("--target-modules", default="all-linear", show_default=True, help="Comma-separated module names.")
@click.option("--seq-len", default=256, show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="Sequences per micro-batch (per process).")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--steps", default=400, show_default=True, help="Optimizer steps (at most).")
@click.option("--lr", default=2e-4, show_default=True, help="Peak learning rate (tiny models like ~3e-3).")
@click.option("--warmup-steps", default=20, show_default=True)
@click.option("--max-grad-norm", default=1.0, show_default=True)
@click.option("--eval-every", default=50, show_default=True)
@click.option("--eval-blocks", default=64, show_default=True, help="Validation sequences per evaluation.")
@click.option("--patience", default=3, show_default=True, help="Evaluations without improvement before stopping (0: off).")
@click.option("--save-every", default=100, show_default=True, help="Steps between checkpoints.")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--no-double-quant", is_flag=True)
@click.option("--compute-dtype", type=click.Choice(("auto", "float32", "bfloat16", "float16")), default="auto",
              show_default=True)
@click.option("--no-merge", is_flag=True, help="Write only the adapter (format lora-adapter).")
@click.option("--merge-into", type=click.Choice(("dequantized", "original")), default="dequantized", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--max-minutes", type=float, default=None, help="Stop training after this much wall time.")
@click.option("--threads", type=int, default=None, help="CPU threads (1 is fastest on a busy shared CPU).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoints of an interrupted run.")
@force_opt
@trust_opt
@json_opt
def qlora_cmd(model, data, output, method, rank, alpha, dropout, target_modules, seq_len, batch_size, grad_accum, steps,
              lr, warmup_steps, max_grad_norm, eval_every, eval_blocks, patience, save_every, gradient_checkpointing,
              no_double_quant, compute_dtype, no_merge, merge_into, seed, max_minutes, threads, resume, force, trust_pickle, as_json):
    """Fine-tune MODEL on DATA with QLoRA (or --method lora); writes a merged full-precision artifact + adapter."""
    from edgepack.artifact import check_output_dir, open_artifact
    from edgepack.config import build_config
    from edgepack.progress import progress
    from edgepack.tune.qlora import TuneConfig, tune

    check_output_dir(Path(output), force)
    raw = dict(data=str(data), method=method, rank=rank, alpha=alpha, dropout=dropout,
               target_modules=[t.strip() for t in target_modules.split(",") if t.strip()], seq_len=seq_len,
               batch_size=batch_size, grad_accum=grad_accum, steps=steps, lr=lr, warmup_steps=warmup_steps,
               max_grad_norm=max_grad_norm, eval_every=eval_every, eval_blocks=eval_blocks, patience=patience,
               save_every=save_every, gradient_checkpointing=gradient_checkpointing, double_quant=not no_double_quant,
               compute_dtype=compute_dtype, merge=not no_merge, merge_into=merge_into, seed=seed, max_minutes=max_minutes,
               threads=threads)
    cfg = build_config(TuneConfig, raw, "tune qlora options")
    src = open_artifact(model, trust_pickle=trust_pickle)
    with progress(f"tune ({method})", total=steps, enabled=not as_json) as update:
        art = tune(src, cfg, None, Path(output), force=force, resume=bool(resume),
                   on_step=lambda step, total, info: update(step, total))
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch / torchrun only the main process reports
        return
    m = art.history[-1]["metrics"]
    if as_json:
        emit_json({"path": str(art.path), "format": art.format, "metrics": m, "seconds": art.history[-1]["seconds"]})
        return
    rows = [["validation perplexity", f"{m['ppl_before']:.3f} (base) -> {m['ppl_start']:.3f} (start, "
             f"{'4-bit' if method == 'qlora' else m['compute_dtype']} base) -> {m['ppl_adapter']:.3f} (adapter) -> "
             f"{m['ppl_after']:.3f} (written)"],
            ["test perplexity", f"{m['test_ppl_before']:.3f} -> {m.get('test_ppl_after', m['test_ppl_adapter']):.3f}"],
            ["steps", f"{m['steps']} ({m['stopped']}, best at {m['best_step']})" +
             (f", resumed from {m['resumed_from']}" if m["resumed_from"] is not None else "")],
            ["training", f"{m['train_seconds']:.1f} s, {m['tokens_per_s']:,.0f} tokens/s on {m['device']} "
             f"({m['compute_dtype']}), peak memory {fmt_bytes(m['peak_memory_bytes'])}"],
            ["adapter", f"rank {rank}, {m['trainable_params']:,} trainable parameters, {m['layers_4bit']} 4-bit layers"],
            ["output", f"{art.format}: {art.path}" + (f" (merged into {m['merge_into']} fp32 base, "
                                                      f"|ppl diff| {m['merge_rel_diff']:.4%})" if 'merge_into' in m else "")]]
    print_table(f"tune {method}: {headline(m)}", ["", ""], rows,
                caption="perplexity: " + m["ppl_protocol"] + "; TensorBoard logs in " + str(art.path / "logs"))
