"""Core CLI commands. Each parses options, calls the library and prints a table (or --json). Heavy imports stay
inside the command bodies."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.output import emit_json, fmt_bytes, fmt_num, print_table

json_opt = click.option("--json", "as_json", is_flag=True, help="Print one JSON object (last line of stdout).")
force_opt = click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
trust_opt = click.option("--trust-pickle", is_flag=True,
                         help="Allow pickled *.bin/*.pt weights (can run code: only for sources you trust).")

# Metrics shown in summary tables, in this order, with their column labels.
HEADLINE = (("perplexity", "ppl"), ("ppl_before", "ppl before"), ("ppl_after", "ppl after"), ("sqnr_db", "SQNR dB"),
            ("max_abs_diff", "max|diff|"), ("bytes", "bytes"), ("decode_tokens_per_s", "decode tok/s"))


def headline(metrics: dict) -> str:
    parts = []
    pred = (metrics or {}).get("prediction") if (metrics or {}).get("measured") is False else None
    for key, label in HEADLINE:
        if pred and key == "decode_tokens_per_s" and pred.get("decode_tokens_per_s_upper_bound"):
            parts.append(f"PREDICTED decode tok/s <= {fmt_num(pred['decode_tokens_per_s_upper_bound'])} (roofline)")
        elif key in (metrics or {}):
            v = metrics[key]
            parts.append(f"{label} {fmt_bytes(v) if key == 'bytes' else fmt_num(v)}")
    if (metrics or {}).get("bundle_id"):
        fit = metrics.get("fit") or {}
        verdict = "" if not fit else (", fits (predicted)" if fit.get("fits") else ", DOES NOT FIT (predicted)")
        parts.append(f"bundle {metrics['bundle_id']} {fmt_bytes(metrics.get('bundle_bytes', 0))}{verdict}")
    return ", ".join(parts) or "-"


# ----------------------------------------------------------------------------------------------------- targets
@click.group()
def targets():
    """Hardware target profiles (packaged TOML data, your own TOML path, or 'local')."""


@targets.command("list")
@json_opt
def targets_list(as_json):
    """Every known target with its memory, bandwidth, precisions and runtimes."""
    from edgepack.targets import list_targets, load_target

    profiles = [load_target(n) for n in list_targets() if n != "local"]
    if as_json:
        emit_json({"targets": [t.to_dict() for t in profiles] + [{"name": "local", "description": "this machine (measured)"}]})
        return
    rows = [[t.name, t.device_type, f"sm_{t.sm}" if t.sm else t.arch, fmt_bytes(t.usable_memory_bytes) + " / " + fmt_bytes(t.memory_bytes),
             f"{t.bandwidth_bytes_per_s / 1e9:g} GB/s", ",".join(t.precisions), ",".join(t.runtimes), t.engine_build]
            for t in profiles]
    rows.append(["local", "measured", "-", "-", "-", "-", "-", "-"])
    print_table("edgepack targets", ["name", "type", "arch", "usable / total memory", "bandwidth", "precisions",
                                     "runtimes (preferred first)", "engine build"], rows,
                caption="'edgepack targets show NAME' for sources; 'local' measures this machine")


@targets.command("show")
@click.argument("name")
@json_opt
def targets_show(name, as_json):
    """One profile in full, with the source of every number (NAME, 'local', or a path to a TOML)."""
    from edgepack.targets import load_target

    t = load_target(name)
    if as_json:
        emit_json(t.to_dict())
        return
    d = t.to_dict()
    rows = [[k, fmt_bytes(v) if k.endswith("_bytes") else (f"{v / 1e9:g} GB/s" if k.endswith("_per_s") else str(v))]
            for k, v in d.items() if k not in ("sources", "measured", "peak_tflops") and v not in (None, (), {})]
    rows += [[f"peak {k}", f"{v:g} TFLOPS/TOPS"] for k, v in t.peak_tflops.items()]
    rows += [[f"source: {k}", v] for k, v in t.sources.items()]
    rows += [[f"measured: {k}", str(v)] for k, v in t.measured.items()]
    print_table(f"target {t.name}: {t.description}", ["field", "value"], rows)


# --------------------------------------------------------------------------------------------------------- fit
FIT_PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")


def _model_config(model: str) -> dict:
    from edgepack.artifact import read_model_config
    from edgepack.errors import ArtifactError

    p = Path(model)
    if p.is_file() and p.name.endswith(".json"):
        return read_model_config(p.parent) if p.name == "config.json" else _json_file(p)
    if not p.exists():
        raise ArtifactError(f"'{model}' does not exist", "pass a model directory or its config.json")
    return read_model_config(p)


def _json_file(p: Path) -> dict:
    import json

    from edgepack.errors import ConfigError

    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p} is malformed JSON ({exc})", "fix the file") from None


@click.command("fit")
@click.argument("model")
@click.option("--target", "target_name", required=True, help="Target name, 'local', a TOML path, or 'all'.")
@click.option("--precision", type=click.Choice(("fp32", "fp16", "bf16", "fp8", "int8", "int4", "nf4")),
              help="Weight precision (default: fp16 where the target runs it, else fp32).")
@click.option("--context", default=2048, show_default=True, help="Context length in tokens (prompt + generated).")
@click.option("--batch", default=1, show_default=True, help="Concurrent sequences.")
@click.option("--group-size", default=128, show_default=True, help="Quantization group size for int4/nf4 scales.")
@click.option("--runtime", type=click.Choice(("onnxruntime", "torch-cpu", "torch-cuda", "tensorrt")),
              help="Runtime whose fixed memory cost to count (measured for onnxruntime on CPUs; default: torch's).")
@json_opt
def fit_cmd(model, target_name, precision, context, batch, group_size, runtime, as_json):
    """Does MODEL fit a target? Reads only config.json (works for a 70B config on a laptop)."""
    from edgepack.targets import list_targets, load_target
    from edgepack.targets.fit import fit, model_shape

    cfg = _model_config(model)
    shape = model_shape(cfg)
    if target_name == "all":
        names = [n for n in list_targets() if n != "local"]
        precs = [precision] if precision else list(FIT_PRECISIONS)
        reports, rows = [], []
        for n in names:
            t = load_target(n)
            row = [n, fmt_bytes(t.usable_memory_bytes)]
            for p in precs:
                if not t.supports(precision=p):
                    row.append("n/a")
                    continue
                r = fit(cfg, t, p, context, batch, group_size, runtime=runtime)
                reports.append(r.to_dict())
                row.append(f"{'fits' if r.fits else 'NO'} {r.required_bytes / 2**30:.1f}G {r.decode_tokens_per_s_limit:,.0f}t/s")
            rows.append(row)
        if as_json:
            emit_json({"model": model, "params": shape.total_params, "context": context, "batch": batch, "results": reports})
            return
        print_table(f"fit: {model} ({shape.total_params / 1e9:.2f}B params), context {context}, batch {batch}",
                    ["target", "usable"] + precs, rows,
                    caption="each cell: verdict, required GiB (weights + KV cache + workspace), bandwidth-bound decode "
                            "limit in tokens/s (roofline prediction, not a measurement); n/a = precision not supported")
        return
    t = load_target(target_name)
    prec = precision or ("fp16" if t.supports(precision="fp16") else "fp32")
    r = fit(cfg, t, prec, context, batch, group_size, runtime=runtime)
    if as_json:
        emit_json(r.to_dict())
        return
    rows = [["parameters", f"{r.params:,}"], ["weights", fmt_bytes(r.weights_bytes)],
            ["KV cache", fmt_bytes(r.kv_cache_bytes)], ["workspace + runtime", fmt_bytes(r.workspace_bytes)],
            ["required", fmt_bytes(r.required_bytes)], ["usable on target", fmt_bytes(r.usable_bytes)],
            ["verdict", ("FITS, headroom " if r.fits else "DOES NOT FIT, short by ") + fmt_bytes(abs(r.headroom_bytes))],
            ["bytes read per token", fmt_bytes(r.bytes_per_token)],
            ["decode limit (roofline)", f"{r.decode_tokens_per_s_limit:,.1f} tokens/s at {r.bandwidth_bytes_per_s / 1e9:g} GB/s"]]
    print_table(f"fit: {model} on {t.name} at {prec}, context {context}, batch {batch}", ["", ""], rows, caption=r.note)


# -------------------------------------------------------------------------------------------------------- eval
@click.command("eval")
@click.argument("model")
@click.option("--text", "text", required=True, type=click.Path(), help="UTF-8 text file to score.")
@click.option("--window", default=512, show_default=True, help="Tokens per window (capped at the model's context).")
@click.option("--stride", type=int, default=None, help="Tokens the window advances [default: window/2].")
@click.option("--max-tokens", type=int, default=None, help="Score at most this many tokens.")
@trust_opt
@json_opt
def eval_cmd(model, text, window, stride, max_tokens, trust_pickle, as_json):
    """Perplexity of MODEL (any artifact format) on a text, protocol edgepack-ppl-v1 (see docs in README)."""
    from edgepack.artifact import open_artifact
    from edgepack.compress.evaluate import PplProtocol, evaluate_artifact
    from edgepack.progress import progress

    art = open_artifact(model, trust_pickle=trust_pickle)
    with progress("perplexity", enabled=not as_json) as update:
        res = evaluate_artifact(art, text, PplProtocol(window=window, stride=stride, max_tokens=max_tokens), update)
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
@click.option("--dtype", type=click.Choice(("float32", "float16", "bfloat16")), help="Cast the weights.")
@force_opt
@trust_opt
@json_opt
def convert_cmd(model, output, dtype, force, trust_pickle, as_json):
    """Import MODEL (a Hugging Face checkpoint directory) as an edgepack artifact."""
    from edgepack.artifact import check_output_dir, open_artifact
    from edgepack.convert import ConvertConfig, convert

    check_output_dir(Path(output), force)  # before loading any weights
    art = convert(open_artifact(model, trust_pickle=trust_pickle), ConvertConfig(dtype=dtype), None, Path(output), force=force)
    _report_artifact(art, as_json)


def _report_artifact(art, as_json: bool) -> None:
    rec = art.history[-1]
    if as_json:
        emit_json({"path": str(art.path), "format": art.format, "stage": rec["stage"], "metrics": rec["metrics"],
                   "seconds": rec["seconds"]})
        return
    print_table(f"{rec['stage']}: wrote {art.path}", ["format", "size", "seconds", "metrics"],
                [[art.format, fmt_bytes(art.size_bytes()), f"{rec['seconds']:.1f}", headline(rec["metrics"])]])


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


# --------------------------------------------------------------------------------------------------------- run
@click.command("run")
@click.argument("recipe", type=click.Path())
@click.option("--dry-run", is_flag=True, help="Print the resolved plan and exit.")
@click.option("--workdir", type=click.Path(), help="Where stage outputs go [default: the recipe's, or ./edgepack-runs/NAME].")
@json_opt
def run_cmd(recipe, dry_run, workdir, as_json):
    """Run RECIPE.toml: the model folded through its stages. Resumes after a crash; a re-run does no work."""
    from edgepack.plan import load_recipe

    r = load_recipe(recipe, workdir=Path(workdir) if workdir else None)
    _run_and_report(r, dry_run, as_json)


def _run_and_report(r, dry_run: bool, as_json: bool):
    import sys

    from edgepack.plan import run_recipe

    def live(res):
        if not as_json:
            print(f"  [{res.status}] stage {res.index} {res.kind}" + (f" ({res.target})" if res.target else "")
                  + f" in {res.seconds:.1f} s -> {res.path}", file=sys.stderr, flush=True)

    if not as_json:
        print(f"recipe {r.name}: model {r.model}, targets {', '.join(t.name for t in r.targets)}, workdir {r.workdir}",
              file=sys.stderr)
    results = run_recipe(r, dry_run=dry_run, on_step=live)
    if as_json:
        emit_json({"recipe": r.name, "dry_run": dry_run, "workdir": str(r.workdir),
                   "steps": [vars(x) for x in results]})
        return results
    cols = ["#", "stage", "target", "status", "seconds", "metrics" if not dry_run else "config", "output"]
    rows = [[str(x.index), x.kind, x.target or "(shared)", x.status, f"{x.seconds:.1f}",
             (x.metrics.get("skipped", "") if x.status == "skipped" else headline(x.metrics) if not dry_run
              else ", ".join(f"{k}={v}" for k, v in x.metrics.items()) or "defaults"),
             Path(x.path).name] for x in results]
    print_table(f"recipe {r.name}" + (" (dry run: nothing executed)" if dry_run else ""), cols, rows)
    return results


# -------------------------------------------------------------------------------------------------------- demo
@click.command("demo")
@click.option("--workdir", type=click.Path(), default="edgepack-runs/demo", show_default=True)
@json_opt
def demo_cmd(workdir, as_json):
    """The main job on an embedded default, offline: the packaged demo recipe (fine-tune, prune, distill, then per
    target quantize, compile, bench, bundle) on the embedded stories260K model, a report, and text from the CPU
    bundle."""
    from edgepack.plan import embedded_path, load_recipe

    recipe = embedded_path("demo.toml")
    r = load_recipe(recipe, workdir=Path(workdir))
    if not as_json:
        click.echo(
            "edgepack demo: offline, on the embedded default model 'stories260K' -- Karpathy's real pretrained\n"
            "260K-parameter Llama (5 layers, hidden 64, vocab 512) trained on TinyStories, shipped inside the package\n"
            "(MIT). It is tiny so that the whole chain runs in about a minute on a CPU; point 'edgepack run' at a recipe\n"
            "with your own checkpoint for real work (examples/). Recipe: " + str(recipe))
    results = _run_and_report(r, False, as_json)
    from edgepack.bench.run_report import summary_rows, write_report

    reports = [write_report(r.workdir, r.workdir / name)["written"] for name in ("report.html", "report.md")]
    cpu = next((t.name for t in r.targets if t.device_type == "cpu"), None)
    bundle = next((Path(x.path) / "bundle" for x in results if x.kind == "bundle" and x.target == cpu), None)
    if as_json:
        emit_json({"recipe": r.name, "workdir": str(r.workdir), "steps": [vars(x) for x in results],
                   "reports": [p for w in reports for p in w], "cpu_bundle": str(bundle) if bundle else None})
        return
    from edgepack.bench.run_report import build_report

    print_table("per target: bundle, fit, quality, speed", *summary_rows(build_report(r.workdir)),
                caption="speed: measured where this machine is the target, else PREDICTED (roofline upper bound)")
    click.echo("report: " + ", ".join(p for w in reports for p in w))
    if bundle is not None:
        from edgepack.deploy.cli import generate_cmd

        click.echo(f"\nThe {cpu} bundle ({bundle}) generates (greedy, 64 tokens):")
        click.get_current_context().invoke(generate_cmd, artifact=str(bundle / "artifact"), prompt="Once upon a time",
                                           max_new_tokens=64)
    click.echo(f"\nNext: open {reports[0][0]}; 'edgepack push {bundle} HOST' ships a bundle; a re-run of "
               "'make demo' does no work.")
