"""What every command shares: the common flags, options whose defaults and choices come from a stage's config
dataclass (so a default exists once), the metric headline and the one-artifact report. No heavy imports.

    @config_option(QuantizeConfig, "group_size", help="INT4 input channels per scale.")
    def quantize_cmd(..., group_size, ...):
        cfg = config_from(QuantizeConfig, locals(), "quantize")
"""

from __future__ import annotations

import dataclasses
import types
import typing

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
        elif key == "decode_tokens_per_s" and key in (metrics or {}):
            parts.append(f"{label} {fmt_num(metrics[key])} ({speed_label(metrics)})")
        elif key in (metrics or {}):
            v = metrics[key]
            parts.append(f"{label} {fmt_bytes(v) if key == 'bytes' else fmt_num(v)}")
    task = (metrics or {}).get("task") or {}
    if task.get("after"):
        a = task["after"]
        parts.append(f"task {task['metric']} {a['score']:.2f}" +
                     (f" (drop {task['drop']:+.2f})" if task.get("drop") is not None else ""))
    if (metrics or {}).get("bundle_id"):
        fit = metrics.get("fit") or {}
        verdict = "" if not fit else (", fits (predicted)" if fit.get("fits") else ", DOES NOT FIT (predicted)")
        parts.append(f"bundle {metrics['bundle_id']} {fmt_bytes(metrics.get('bundle_bytes', 0))}{verdict}")
    return ", ".join(parts) or "-"




def speed_label(metrics: dict) -> str:
    """What a recorded decode speed timed: bench's protocol (median over warm runs) or a stage's one quick check
    (compile), with the threads, so two speeds of one bundle are never read as the same measurement."""
    dev = metrics.get("device") or {}
    threads = dev.get("threads", metrics.get("threads"))
    t = f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""
    if metrics.get("protocol") == "edgepack-bench-v1" or "points" in metrics:
        return f"bench: median of warm runs{t}"
    n = metrics.get("measured_tokens")
    return f"quick check: one cold run{f' of {n} tokens' if n else ''}{t}"


def open_model(model, trust_pickle: bool = False):
    """What every model argument takes: an artifact or checkpoint directory, or a Hugging Face hub id ("org/name"),
    fetched first (safetensors, configs and tokenizer, never pickles) into the hub cache, as a recipe's model is."""
    from edgepack.artifact import open_artifact
    from edgepack.sources import fetch_model, is_hub_id_text

    return open_artifact(fetch_model(str(model)) if is_hub_id_text(str(model)) else model, trust_pickle=trust_pickle)


def report_artifact(art, as_json: bool) -> None:
    rec = art.history[-1]
    if as_json:
        emit_json({"path": str(art.path), "format": art.format, "stage": rec["stage"], "metrics": rec["metrics"],
                   "seconds": rec["seconds"]})
        return
    print_table(f"{rec['stage']}: wrote {art.path}", ["format", "size", "seconds", "metrics"],
                [[art.format, fmt_bytes(art.size_bytes()), f"{rec['seconds']:.1f}", headline(rec["metrics"])]])


# ------------------------------------------------------------------------------------------ options from configs
def _field(cls, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no field '{name}'")


def field_default(cls, name: str):
    f = _field(cls, name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def field_choices(cls, name: str) -> tuple | None:
    """The values a field takes: metadata {"choices": ...}, else the arguments of a Literal annotation."""
    f = _field(cls, name)
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"])
    tp = typing.get_type_hints(cls)[name]
    for t in (tp, *typing.get_args(tp)):
        if typing.get_origin(t) is typing.Literal:
            return tuple(a for a in typing.get_args(t) if a is not None)
    return None


def _scalar_type(tp):
    """int / float / str for a simple or Optional annotation, else None (click then keeps strings)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for t in args:
        if t in (int, float, str):
            return t
    return None


def config_option(cls, name: str, *decls: str, help: str, **kw):
    """A click option for field `name` of config dataclass `cls`: its default and choices are the field's, and the
    parameter is named after the field, so `config_from` can build the config from the command's arguments. A bool
    field becomes a flag (`--name` when it defaults to False, `--name/--no-name` when it defaults to True)."""
    default = None if kw.get("required") else field_default(cls, name)
    flag = "--" + name.replace("_", "-")
    tp = typing.get_type_hints(cls)[name]
    if tp is bool:
        decls = decls or ((flag,) if default is False else (f"{flag}/--no-{flag[2:]}",))
        return click.option(*decls, name, is_flag=True, default=default, show_default=default is True, help=help, **kw)
    choices = field_choices(cls, name)
    if isinstance(default, (list, tuple)):  # text on the command line: "a,b" (or repeated, for multiple options)
        default = tuple(str(v) for v in default) if kw.get("multiple") else ",".join(str(v) for v in default)
        kw.setdefault("type", str)
    if "type" not in kw:
        kw["type"] = click.Choice(choices) if choices else _scalar_type(tp)
    return click.option(*(decls or (flag,)), name, default=default,
                        show_default=default not in (None, "", (), []), help=help, **kw)


def config_from(cls, params: dict, where: str, **overrides):
    """Build config `cls` from a command's arguments (every parameter named after a field), then `overrides`;
    build_config checks keys, types and the config's own validate()."""
    from edgepack.config import build_config

    names = {f.name for f in dataclasses.fields(cls) if f.init}
    raw = {k: v for k, v in params.items() if k in names}
    for k, v in list(raw.items()):
        if v is None and field_default(cls, k) == "":  # optional path options: unset means the field's ""
            raw[k] = ""
    raw.update(overrides)
    return build_config(cls, raw, where)


def param_option(fn, name: str, *decls: str, help: str, **kw):
    """A click option whose default is the default of parameter `name` of library function `fn`."""
    import inspect

    default = inspect.signature(fn).parameters[name].default
    return click.option(*(decls or ("--" + name.replace("_", "-"),)), name, default=default,
                        show_default=default is not None, help=help, **kw)


def int_list(ctx, param, value):
    """Repeated and/or comma-separated integers: --prompt-len 32,128 --prompt-len 512 -> (32, 128, 512)."""
    out = []
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise click.BadParameter(f"'{part}' is not an integer", ctx=ctx, param=param) from None
    return tuple(out)

