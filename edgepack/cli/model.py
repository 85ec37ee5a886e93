"""`edgepack eval`, `convert` and `inspect`: one model or artifact at a time."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.common import (
    config_from,
    config_option,
    force_opt,
    headline,
    json_opt,
    open_model,
    report_artifact,
    trust_opt,
)
from edgepack.compress.eval_stage import EvalConfig
from edgepack.convert import ConvertConfig
from edgepack.output import emit_json, fmt_bytes, print_table


# -------------------------------------------------------------------------------------------------------- eval
@click.command("eval")
@click.argument("model")
@config_option(EvalConfig, "text", type=click.Path(), help="UTF-8 text file to score (perplexity).")
@config_option(EvalConfig, "window", help="Tokens per window (capped at the model's context).")
@config_option(EvalConfig, "stride", help="Tokens the window advances [default: window/2].")
@config_option(EvalConfig, "max_tokens", help="Score at most this many tokens.")
@config_option(EvalConfig, "task", type=click.Path(),
               help="Task metrics on this file's held-out items (instruction / chat / choice JSONL, or a tune prepare folder).")
@config_option(EvalConfig, "task_split", help="Which split of the task file (all: every record).")
@config_option(EvalConfig, "task_seed", help="Seed of the task file's 8:1:1 split (tune's --data-seed).")
@config_option(EvalConfig, "task_samples", help="Items scored (the first of the split).")
@config_option(EvalConfig, "task_max_new_tokens", help="Generated tokens per item at most.")
@config_option(EvalConfig, "task_metric", help="Metric compared with --baseline (auto: rougeL, or acc for choices).")
@config_option(EvalConfig, "max_task_drop", help="With --baseline: exit 1 when the metric falls more than this (points).")
@config_option(EvalConfig, "runtime", help="Runtime that generates [default: the artifact's own].")
@config_option(EvalConfig, "threads", help="Runtime threads.")
@click.option("--baseline", type=click.Path(), help="Measure this artifact too (same items) and report the drop.")
@click.option("--save-outputs", type=click.Path(), help="Write every item's prompt, reference, answer and scores (JSONL).")
@trust_opt
@json_opt
def eval_cmd(model, baseline, save_outputs, trust_pickle, as_json, **settings):
    """Perplexity (edgepack-ppl-v1) and / or task metrics (edgepack-task-v1) of MODEL, any artifact format."""
    from edgepack.artifact import open_artifact
    from edgepack.compress.eval_stage import measure
    from edgepack.errors import ConfigError
    from edgepack.progress import progress

    cfg = config_from(EvalConfig, settings, "eval", text=str(settings["text"] or ""), task=str(settings["task"] or ""))
    if baseline and not cfg.task:
        raise ConfigError("--baseline compares task metrics", "pass --task FILE too")
    art = open_model(model, trust_pickle)
    if cfg.text:  # a missing or malformed text is one error line before any progress line
        from edgepack.quality import read_text

        read_text(cfg.text)
    base_summary = None
    if baseline:
        from edgepack.tasks import evaluate_task

        with progress("task (baseline)", enabled=not as_json) as update:
            base_summary = evaluate_task(open_artifact(baseline, trust_pickle=trust_pickle), cfg.task,
                                         cfg.task_protocol(), runtime=None, threads=cfg.threads,
                                         progress=update).summary
    with progress("eval", enabled=not as_json) as update:
        metrics, result = measure(art, _replace(cfg, max_task_drop=None) if baseline else cfg, update, note="")
    if baseline:
        from edgepack.tasks import compare

        metrics["task"] = compare(base_summary, result.summary, None)
    if save_outputs and result is not None:
        from edgepack.tasks import write_outputs

        write_outputs(result, save_outputs)
    if as_json:
        out = {k: v for k, v in metrics.items() if k != "protocol"}
        if "perplexity" in metrics:
            out.update(protocol=metrics["protocol"])
        emit_json(out)
    else:
        _print_eval(model, metrics, baseline)
    if baseline and cfg.max_task_drop is not None:
        from edgepack.tasks import compare

        compare(base_summary, result.summary, cfg.max_task_drop, note="")


def _replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def _print_eval(model, metrics: dict, baseline) -> None:
    if "perplexity" in metrics:
        p = metrics["protocol"]
        print_table(f"perplexity of {model}", ["perplexity", "tokens", "protocol", "text"],
                    [[f"{metrics['perplexity']:.4f}", metrics["tokens"],
                      f"{p['name']}: window {p['window']}, stride {p['stride']}, BOS {'once' if p['bos'] else 'no'}",
                      f"{p['text']} (sha256 {p['text_sha256'][:12]})"]])
    if "task" not in metrics:
        return
    t = metrics["task"]
    after, before = t["after"], t.get("before")
    pr = after["protocol"]

    def cell(summary, group, key):
        g = (summary or {}).get(group) or {}
        if key not in g:
            return "-"
        se = g.get(f"{key}_stderr")
        return f"{g[key]:.2f}" + (f" ± {se:.2f}" if se is not None else "")

    names = [("generation", "exact_match", "exact match"), ("generation", "f1", "token F1"),
             ("generation", "rougeL", "ROUGE-L"), ("generation", "bleu", "BLEU"),
             ("choice", "acc", "accuracy"), ("choice", "acc_norm", "accuracy (length-normalized)")]
    rows = []
    for group, key, label in names:
        if key not in (after.get(group) or {}):
            continue
        row = [label + (" *" if key == t["metric"] else "")]
        if before is not None:
            row.append(cell(before, group, key))
        row.append(cell(after, group, key))
        if before is not None:
            b, a = before[group][key], after[group][key]
            row.append(f"{b - a:+.2f}" if key != t["metric"] else f"{t['drop']:+.2f} ± {t['drop_stderr'] or 0:.2f}")
        rows.append(row)
    cols = ["metric (x100)"] + (["baseline", str(model), "drop"] if before is not None else [str(model)])
    g = after.get("generation") or {}
    print_table(f"task quality: {pr['task']} ({pr['split']} split, {after['scored_items']} items, "
                f"{pr['runtime']})", cols, rows,
                caption=f"{pr['name']}: greedy, max {pr['max_new_tokens']} new tokens"
                        + (f", {g['stopped_at_eos']}/{g['n']} stopped at EOS" if g else "")
                        + "; ± = standard error; * = the gated metric" + (f"; baseline {baseline}" if baseline else ""))


# ----------------------------------------------------------------------------------------------------- convert
@click.command("convert")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@config_option(ConvertConfig, "dtype", help="Cast the weights.")
@force_opt
@trust_opt
@json_opt
def convert_cmd(model, output, force, trust_pickle, as_json, **settings):
    """Import MODEL (a Hugging Face checkpoint directory) as an edgepack artifact."""
    from edgepack.artifact import check_output_dir
    from edgepack.convert import convert

    cfg = config_from(ConvertConfig, settings, "convert")
    check_output_dir(Path(output), force, [model])  # before loading any weights
    art = convert(open_model(model, trust_pickle), cfg, None, Path(output), force=force)
    report_artifact(art, as_json)


# ----------------------------------------------------------------------------------------------------- inspect
@click.command("inspect")
@click.argument("path")
@click.option("--verify", is_flag=True, help="Check every file's size and sha256 against the manifest.")
@json_opt
def inspect_cmd(path, verify, as_json):
    """Lineage (stage history), files and checksums of an artifact or checkpoint."""
    from edgepack.artifact import open_artifact

    art = open_artifact(path, verify=verify, trust_pickle=True)  # inspecting reads no weights
    if as_json:
        emit_json({"path": str(art.path), "format": art.format, "base_model": art.base_model, "history": art.history,
                   "files": art.files, "digest": art.digest(), "verified": bool(verify and art.has_manifest)})
        return
    rows = [[str(i + 1), r["stage"], r.get("target") or "-", f"{r['seconds']:.1f}", headline(r.get("metrics", {})),
             (r.get("finished_at") or "")[:19]] for i, r in enumerate(art.history)]
    print_table(f"{art.path} (format {art.format}, from {art.base_model})",
                ["#", "stage", "target", "seconds", "metrics", "finished"], rows or [["-", "(no history: a plain checkpoint)", "", "", "", ""]])
    print_table(None, ["file", "size", "sha256"],
                [[n, fmt_bytes(f["bytes"]), f["sha256"][:16]] for n, f in sorted(art.files.items())],
                caption=("all files verified" if verify and art.has_manifest else
                         "not verified (pass --verify)" if art.has_manifest else "no manifest: hashes computed now"))


