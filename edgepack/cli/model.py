"""`edgepack eval`, `convert` and `inspect`: one model or artifact at a time."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.common import config_from, config_option, force_opt, headline, json_opt, report_artifact, trust_opt
from edgepack.compress.eval_stage import EvalConfig
from edgepack.convert import ConvertConfig
from edgepack.output import emit_json, fmt_bytes, print_table


# -------------------------------------------------------------------------------------------------------- eval
@click.command("eval")
@click.argument("model")
@config_option(EvalConfig, "text", required=True, type=click.Path(), help="UTF-8 text file to score.")
@config_option(EvalConfig, "window", help="Tokens per window (capped at the model's context).")
@config_option(EvalConfig, "stride", help="Tokens the window advances [default: window/2].")
@config_option(EvalConfig, "max_tokens", help="Score at most this many tokens.")
@trust_opt
@json_opt
def eval_cmd(model, trust_pickle, as_json, **settings):
    """Perplexity of MODEL (any artifact format) on a text, protocol edgepack-ppl-v1 (see docs in README)."""
    from edgepack.artifact import open_artifact
    from edgepack.progress import progress
    from edgepack.quality import evaluate_artifact

    cfg = config_from(EvalConfig, settings, "eval", text=str(settings["text"]))
    art = open_artifact(model, trust_pickle=trust_pickle)
    with progress("perplexity", enabled=not as_json) as update:
        res = evaluate_artifact(art, cfg.text, cfg.protocol(), update)
    if as_json:
        emit_json(res.to_dict())
        return
    p = res.protocol
    print_table(f"perplexity of {model}", ["perplexity", "tokens", "protocol", "text"],
                [[f"{res.perplexity:.4f}", res.tokens, f"{p['name']}: window {p['window']}, stride {p['stride']}, BOS {'once' if p['bos'] else 'no'}",
                  f"{p['text']} (sha256 {p['text_sha256'][:12]})"]])


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
    from edgepack.artifact import check_output_dir, open_artifact
    from edgepack.convert import convert

    cfg = config_from(ConvertConfig, settings, "convert")
    check_output_dir(Path(output), force)  # before loading any weights
    art = convert(open_artifact(model, trust_pickle=trust_pickle), cfg, None, Path(output), force=force)
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


