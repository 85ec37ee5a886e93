"""`edgepack targets` (list / show profiles) and `edgepack fit` (memory and decode roofline from config.json)."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.common import json_opt, param_option
from edgepack.formats import PRECISIONS, PROFILE_RUNTIMES
from edgepack.output import emit_json, fmt_bytes, print_table
from edgepack.targets.fit import fit


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
FIT_PRECISIONS = tuple(p for p in PRECISIONS if p != "nf4")  # the --target all table's columns (nf4 ~ int4)


def _model_config(model: str) -> dict:
    """fit reads only the model's config: a model directory, its config.json, any JSON file holding one, or a hub
    id ("meta-llama/Llama-3.1-8B": only its config.json is fetched)."""
    from edgepack.errors import ArtifactError
    from edgepack.facts import read_model_config
    from edgepack.sources import fetch_config, is_hub_id_text

    if is_hub_id_text(model):
        return read_model_config(fetch_config(model))
    if not Path(model).exists():
        raise ArtifactError(f"'{model}' does not exist", "pass a model directory, its config.json or a hub id (org/name)")
    return read_model_config(model)


@click.command("fit")
@click.argument("model")
@click.option("--target", "target_name", required=True, help="Target name, 'local', a TOML path, or 'all'.")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="Weight precision (default: fp16 where the target runs it, else fp32).")
@param_option(fit, "context", help="Context length in tokens (prompt + generated).")
@param_option(fit, "batch", help="Concurrent sequences.")
@param_option(fit, "group_size", help="Quantization group size for int4/nf4 scales.")
@click.option("--runtime", type=click.Choice(PROFILE_RUNTIMES),
              help="Runtime whose fixed memory cost to count (measured for onnxruntime on CPUs; default: torch's).")
@json_opt
def fit_cmd(model, target_name, precision, context, batch, group_size, runtime, as_json):
    """Does MODEL fit a target? Reads only config.json (works for a 70B config on a laptop)."""
    from edgepack.targets import list_targets, load_target
    from edgepack.targets.fit import model_shape, what_would_fit

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
    would = [] if r.fits else what_would_fit(cfg, t, prec, context, batch, group_size, runtime=runtime)
    if as_json:
        emit_json(r.to_dict() | ({"would_fit": would} if would else {}))
        return
    rows = [["parameters", f"{r.params:,}" + (f" ({r.active_params:,} active per token)"
                                              if r.active_params != r.params else "")], ["weights", fmt_bytes(r.weights_bytes)],
            ["KV cache", fmt_bytes(r.kv_cache_bytes)], ["workspace + runtime", fmt_bytes(r.workspace_bytes)],
            ["required", fmt_bytes(r.required_bytes)], ["usable on target", fmt_bytes(r.usable_bytes)],
            ["verdict", ("FITS, headroom " if r.fits else "DOES NOT FIT, short by ") + fmt_bytes(abs(r.headroom_bytes))],
            ["bytes read per token", fmt_bytes(r.bytes_per_token)],
            ["decode limit (roofline)", f"{r.decode_tokens_per_s_limit:,.1f} tokens/s at {r.bandwidth_bytes_per_s / 1e9:g} GB/s"]]
    rows += [[f"  in power mode {m}", f"{v:,.1f} tokens/s at {t.bandwidth_modes[m]:g} GB/s"]
             for m, v in (r.decode_limit_by_mode or {}).items()]
    if r.build_bytes is not None:
        rows.append(["TensorRT engine build", ("fits, needs " if r.build_fits else "DOES NOT FIT, needs ")
                     + fmt_bytes(r.build_bytes) + " (workspace + 3 x weights)"])
    rows += [["what would fit" if i == 0 else "", w] for i, w in enumerate(would)]
    print_table(f"fit: {model} on {t.name} at {prec}, context {context}, batch {batch}", ["", ""], rows, caption=r.note)


