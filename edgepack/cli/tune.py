"""`edgepack tune prepare` and `edgepack tune qlora`. Torch-free at import time; the work happens in the library."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.common import config_from, config_option, force_opt, headline, json_opt, open_model, trust_opt
from edgepack.output import emit_json, fmt_bytes, print_table
from edgepack.tune.data import PrepareConfig
from edgepack.tune.qlora import TuneConfig

T = TuneConfig


@click.group("tune")
def tune_group():
    """Fine-tune a model on your data: prepare the data, then QLoRA / LoRA with a merged full-precision output."""


def _first(items: list[dict], n: int = 5) -> str:
    where = [str(d.get("line", d.get("where"))) + (f" ({d['reason']})" if "reason" in d else "") for d in items[:n]]
    return "; ".join(where) + (f"; ... {len(items) - n} more" if len(items) > n else "")


mix_opt = click.option("--mix", "mix", multiple=True, metavar="PATH:WEIGHT",
                       help="A weighted source of a mix (repeat: --mix domain.jsonl:0.7 --mix general.txt:0.3); each "
                            "source is split 8:1:1 on its own, the training split drawn by weight.")


@tune_group.command("prepare")
@click.argument("data", type=click.Path(), required=False)
@mix_opt
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for train/validation/test.jsonl + report.json.")
@config_option(PrepareConfig, "seed", help="Seed of the train/validation/test split.")
@config_option(PrepareConfig, "split", help="train,validation,test fractions.")
@config_option(PrepareConfig, "near_dup_threshold",
               help="Word-3-shingle Jaccard at which two records are near-duplicates (0 disables).")
@config_option(PrepareConfig, "strip_markup", help="Remove HTML tags and entities (--no-strip-markup keeps them).")
@config_option(PrepareConfig, "mix_strategy", help="A mix: under = largest mix repeating nothing, over = smallest dropping nothing.")
@click.option("--strict", is_flag=True, help="Fail on the first malformed line instead of reporting and dropping it.")
@click.option("--model", type=click.Path(), help="Tokenizer (model folder) for token counts and loss-mask statistics.")
@click.option("--seq-len", default=256, show_default=True, help="Packed sequence length for the statistics.")
@force_opt
@json_opt
def prepare_cmd(data, mix, output, split, near_dup_threshold, strict, model, seq_len, force, as_json, **settings):
    """Clean, de-duplicate and split DATA (.jsonl instruction/chat/text/choice records, .json array, or .txt), or a
    weighted mix of sources (--mix PATH:WEIGHT, repeated)."""
    from edgepack.artifact import check_output_dir
    from edgepack.errors import ConfigError
    from edgepack.tune.data import parse_sources, prepare, prepare_mix, write_prepared

    if bool(data) == bool(mix):
        raise ConfigError("give DATA or --mix sources" if not data else "DATA and --mix are exclusive",
                          "one file: edgepack tune prepare DATA -o DIR; a mix: --mix a.jsonl:0.7 --mix b.txt:0.3")
    check_output_dir(Path(output), force, [data, model])
    try:
        fractions = [float(x) for x in split.split(",")]
    except ValueError:
        raise ConfigError(f"--split '{split}' is not three comma-separated numbers", "e.g. --split 0.8,0.1,0.1") from None
    cfg = config_from(PrepareConfig, settings, "tune prepare options", split=fractions,
                      near_dup_threshold=near_dup_threshold or None)
    seed = cfg.seed
    tok = None
    if model:
        from edgepack.hf import load_tokenizer

        tok = load_tokenizer(model)
    sources = parse_sources(list(mix)) if mix else None
    prep = prepare_mix(sources, cfg, tok) if sources and len(sources) > 1 else prepare(sources[0].path if sources else data, cfg)
    bad = prep.report["dropped"]["malformed"]
    if strict and bad:
        where = f"{bad[0]['source']}: " if "source" in bad[0] else f"{data}: "
        raise ConfigError(f"{where}line {bad[0]['line']}: {bad[0]['reason']} ({len(bad)} malformed in all)",
                          "fix the lines, or run without --strict to drop and report them")
    if tok is not None:
        from edgepack.tune.data import tokenize_splits

        _, stats = tokenize_splits(prep, tok, seq_len)
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
    print_table(f"tune prepare: {data or 'mix of ' + str(len(mix))} -> {output}", ["", ""], rows,
                caption="full list of dropped lines in report.json")
    if "sources" in r:
        unit = r["mix"]["unit"]
        srows = []
        for s in r["sources"]:
            d = s["drawn"]
            by = {k: (r.get("tokens", {}).get(k) or {}).get("by_source", {}).get(s["name"]) for k in ("train", "validation", "test")}
            toks = " / ".join(f"{b['tokens']:,}" if b else "-" for b in by.values())
            srows.append([s["name"], f"{s['weight']:g} ({s['share']:.0%})", f"{s['records_kept']:,}",
                          f"{d['records']:,} of {s['splits']['train']:,}" + (f" ({d['whole_copies']}x whole)" if d["whole_copies"] > 1 else ""),
                          f"{d['size']:,} ({d['share']:.1%})", f"{s['splits']['validation']:,} / {s['splits']['test']:,}", toks])
        print_table(f"mix ({r['mix']['strategy']}, weights are shares of training {unit})",
                    ["source", "weight", "kept", "train drawn", f"train {unit}", "validation / test records",
                     "tokens train / val / test"], srows,
                    caption="held-out splits are each source's own; pass --model for token counts" if not tok else None)


@tune_group.command("qlora")
@click.argument("model", type=click.Path())
@config_option(T, "data", type=click.Path(), help="Data file (.jsonl/.json/.txt) or a 'tune prepare' folder.")
@mix_opt
@config_option(T, "mix_strategy", help="A mix: under = largest mix repeating nothing, over = smallest dropping nothing.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@config_option(T, "method", help="qlora: 4-bit NF4 base + LoRA; lora: full-precision base + LoRA; full: every weight.")
@config_option(T, "freeze_layers", help="Comma-separated layers that do not train: indices, first:N, last:N "
                                        "(full also: embeddings, lm_head).")
@config_option(T, "rank", help="LoRA rank r.")
@config_option(T, "alpha", help="LoRA scaling numerator (update = alpha / r * B A).")
@config_option(T, "dropout", help="Dropout on the LoRA input path.")
@config_option(T, "target_modules", help="Comma-separated module names, or all-linear.")
@config_option(T, "seq_len", help="Tokens per packed sequence.")
@config_option(T, "batch_size", help="Sequences per micro-batch (per process).")
@config_option(T, "grad_accum", help="Micro-batches per optimizer step.")
@config_option(T, "steps", help="Optimizer steps (at most).")
@config_option(T, "lr", help="Peak learning rate (tiny models like ~3e-3).")
@config_option(T, "warmup_steps", help="Linear warm-up steps (then cosine decay).")
@config_option(T, "max_grad_norm", help="Gradient clipping (L2 norm).")
@config_option(T, "eval_every", help="Optimizer steps between validation measurements.")
@config_option(T, "eval_blocks", help="Validation sequences per evaluation.")
@config_option(T, "patience", help="Evaluations without improvement before stopping (0: off).")
@config_option(T, "save_every", help="Steps between checkpoints.")
@config_option(T, "gradient_checkpointing", help="Recompute activations in backward (less memory, slower).")
@config_option(T, "double_quant", help="Quantize the NF4 scales too (QLoRA double quantization).")
@config_option(T, "compute_dtype", help="auto: float32 on CPU, bfloat16 on GPUs that have it.")
@config_option(T, "merge", help="Write a merged full-precision model (--no-merge: the adapter alone, format lora-adapter).")
@config_option(T, "merge_into", help="Which full-precision base the adapter is merged into.")
@config_option(T, "seed", help="LoRA init, dropout and data order.")
@config_option(T, "max_minutes", help="Stop training after this much wall time.")
@config_option(T, "threads", help="CPU threads (1 is fastest on a busy shared CPU).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoints of an interrupted run.")
@force_opt
@trust_opt
@json_opt
def qlora_cmd(model, mix, output, resume, force, trust_pickle, as_json, **settings):
    """Fine-tune MODEL on DATA (or a --mix) with QLoRA (or --method lora / full); writes a merged full-precision
    artifact + adapter."""
    from edgepack.artifact import check_output_dir
    from edgepack.errors import ConfigError
    from edgepack.progress import is_rank_zero, progress
    from edgepack.tune.qlora import tune

    if bool(settings["data"]) == bool(mix):
        raise ConfigError("give --data or --mix sources" if not mix else "--data and --mix are exclusive",
                          "one source: --data FILE; a mix: --mix a.jsonl:0.7 --mix b.txt:0.3")
    check_output_dir(Path(output), force, [model])
    modules = [t.strip() for t in settings["target_modules"].split(",") if t.strip()]
    frozen = [t.strip() for t in (settings["freeze_layers"] or "").split(",") if t.strip()]
    cfg = config_from(TuneConfig, settings, "tune qlora options", data=tuple(mix) if mix else str(settings["data"]),
                      target_modules=modules, freeze_layers=frozen)
    method, steps, rank = cfg.method, cfg.steps, cfg.rank
    src = open_model(model, trust_pickle)
    with progress(f"tune ({method})", total=steps, enabled=not as_json) as update:
        art = tune(src, cfg, None, Path(output), force=force, resume=bool(resume),
                   on_step=lambda step, total, info: update(step, total))
    if not is_rank_zero():  # under accelerate launch / torchrun only the main process reports
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
            ["trained", (f"all weights, {m['trainable_params']:,} parameters" if method == "full" else
                         f"rank {rank} adapter, {m['trainable_params']:,} parameters, {m['layers_4bit']} 4-bit layers")
             + (f"; frozen layers {m['frozen']['layers'] + m['frozen']['other']}" if m.get("frozen", {}).get("layers")
                or m.get("frozen", {}).get("other") else "")],
            ["output", f"{art.format}: {art.path}" + (f" (merged into {m['merge_into']} fp32 base, "
                                                      f"|ppl diff| {m['merge_rel_diff']:.4%})" if 'merge_into' in m else "")]]
    for name, p in (m.get("ppl_by_source") or {}).items():
        def f(split, p=p):
            b, a = p["before"].get(split), p.get("after", p["adapter"]).get(split)
            return f"{split} {'-' if b is None else f'{b:.3f}'} -> {'-' if a is None else f'{a:.3f}'}"

        rows.append([f"source {name} ({p['share']:.0%})", f"{f('validation')}, {f('test')}"])
    print_table(f"tune {method}: {headline(m)}", ["", ""], rows,
                caption="perplexity: " + m["ppl_protocol"] + "; TensorBoard logs in " + str(art.path / "logs"))
