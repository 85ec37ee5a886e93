"""The report of a recipe run (`edgepack report RUN_DIR -o report.html|report.md [--json]`), read from run.json and
every stage's manifest (edgepack.json). Nothing is executed and nothing heavy is imported (no torch).

Per target: the bundle (path, size, id, runtime, precision), its fit verdict (targets.fit, a prediction), the
perplexity before/after every lossy stage (each stage scores its own held-out text, named in the report), the task
metric before/after (edgepack.tasks: held-out items, with its standard error and the drop's) where a stage measured
one, and the
speed: measured tokens/s + memory where the bench ran on the target's hardware, else the roofline prediction,
labelled "predicted". Numbers are copied from the manifests unchanged (the report's JSON is the manifests' values;
the tables print them at fixed precision). Plots (matplotlib, the `plot` extra, Agg backend): quality across stages,
speed and memory across targets; embedded as base64 PNG in the HTML (self-contained, no JavaScript), written as PNG
files next to the Markdown.
"""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

from edgepack.artifact import load_json
from edgepack.errors import ArtifactError, ConfigError
from edgepack.output import fmt_bytes

MANIFEST = "edgepack.json"
PREDICTED = "predicted"
MEASURED = "measured"


# ------------------------------------------------------------------------------------------------- reading
def _read_json(p: Path, what: str) -> dict:
    if not p.is_file():
        raise ArtifactError(f"{what} '{p}' does not exist", "run the recipe first: edgepack run RECIPE.toml")
    return load_json(p, "re-run the recipe to rewrite it")


def _stage_record(path: str) -> dict:
    hist = _read_json(Path(path) / MANIFEST, "stage manifest").get("history") or [{}]
    return hist[-1]


def _ppl_text(kind: str, metrics: dict, config: dict) -> str:
    proto = metrics.get("protocol") if isinstance(metrics.get("protocol"), dict) else metrics.get("ppl_protocol")
    if isinstance(proto, dict):
        text = proto.get("eval") or proto.get("text") or ""
        split = proto.get("split") or ("held-out tail" if kind in ("prune", "distill") else "")
        return f"{Path(str(text)).name} ({split})" if split else Path(str(text)).name
    if kind == "tune":
        data = config.get("data") or "data"
        if isinstance(data, (list, tuple)):  # a weighted mix of sources
            from edgepack.sources import split_weight

            names = [f"{Path(p).name}:{w:g}" if w is not None else Path(p).name for p, w in map(split_weight, data)]
            return f"mix of {', '.join(names)} (validation splits)"
        return f"{Path(str(data)).name} (validation split)"
    return ""


def quality_of(kind: str, record: dict) -> dict | None:
    """Perplexity a stage recorded: before/after for lossy stages, the value for `eval`; None when it has none."""
    m, c = record.get("metrics") or {}, record.get("config") or {}
    after = m.get("ppl_after", m.get("perplexity"))
    if after is None:
        return None
    return {"ppl_before": m.get("ppl_before"), "ppl_after": after, "text": _ppl_text(kind, m, c)}


def task_of(record: dict) -> dict | None:
    """The task metric a stage recorded (edgepack.tasks): before / after, the drop and their standard errors."""
    t = (record.get("metrics") or {}).get("task") or {}
    after, before = t.get("after"), t.get("before")
    if not after:
        return None
    p = after.get("protocol") or {}
    return {"metric": t.get("metric"), "before": before.get("score") if before else None, "after": after.get("score"),
            "after_stderr": after.get("score_stderr"), "drop": t.get("drop"), "drop_stderr": t.get("drop_stderr"),
            "max_task_drop": t.get("max_task_drop"), "items": after.get("scored_items"), "task": p.get("task"),
            "split": p.get("split"), "runtime": p.get("runtime"), "generation": after.get("generation"),
            "choice": after.get("choice")}


def speed_of(metrics: dict) -> dict:
    """Measured figures of a bench record, or its roofline prediction (labelled)."""
    measured = metrics.get("measured", metrics.get("decode_tokens_per_s") is not None)
    if measured:
        dev = metrics.get("device") or {}
        return {"kind": MEASURED, "decode_tokens_per_s": metrics.get("decode_tokens_per_s"),
                "prefill_tokens_per_s": metrics.get("prefill_tokens_per_s"), "ttft_ms": metrics.get("ttft_ms"),
                "peak_memory_bytes": metrics.get("peak_memory_bytes"), "device": dev.get("name"),
                "threads": dev.get("threads"), "runtime": metrics.get("runtime")}
    p = metrics.get("prediction") or {}
    return {"kind": PREDICTED, "label": p.get("label", PREDICTED), "reason": p.get("reason"),
            "decode_tokens_per_s_upper_bound": p.get("decode_tokens_per_s_upper_bound"),
            "predicted_peak_memory_bytes": p.get("predicted_peak_memory_bytes"), "fits": p.get("fits"),
            "bandwidth_bytes_per_s": p.get("bandwidth_bytes_per_s"), "runtime": metrics.get("runtime")}


def build_report(run_dir) -> dict:
    run_dir = Path(run_dir)
    run = _read_json(run_dir / "run.json", "run summary")
    steps = run.get("steps") or []
    shared = [s for s in steps if s.get("target") is None]
    rep = {"run": {"name": run.get("name"), "recipe": run.get("recipe"), "model": run.get("model"),
                   "run_dir": str(run_dir.absolute()), "targets": run.get("targets", [])}, "targets": [],
           "common_eval": run.get("common_eval")}
    for tname in run.get("targets", []):
        chain = shared + [s for s in steps if s.get("target") == tname]
        rows, quality, tasks = [], [], []
        t = {"name": tname, "stages": rows, "quality": quality, "tasks": tasks, "bundle": None, "fit": None,
             "speed": None}
        for s in chain:
            row = {"index": s["index"], "kind": s["kind"], "status": s["status"], "path": s["path"],
                   "seconds": s.get("seconds"), "common": s.get("common")}
            if s.get("common"):
                t["common"] = s["common"]  # the last scored stage's: the target's final artifact
            if s["status"] == "skipped":
                row["note"] = (s.get("metrics") or {}).get("skipped", "skipped")
                rows.append(row)
                continue
            rec = _stage_record(s["path"])
            m = rec.get("metrics") or {}
            q = quality_of(s["kind"], rec)
            if q:
                row["quality"] = q
                quality.append({"stage": f"{s['index']} {s['kind']}", **q})
            tq = task_of(rec)
            if tq:
                row["task"] = tq
                tasks.append({"stage": f"{s['index']} {s['kind']}", **tq})
            if s["kind"] == "quantize":
                row["note"] = m.get("method_choice") or f"{m.get('method')} ({m.get('format')})"
            elif s["kind"] == "compile":
                row["note"] = f"{m.get('runtime')} {m.get('precision')}" + (f"; {m['note']}" if m.get("note") else "")
            elif s["kind"] == "bench":
                t["speed"] = sp = speed_of(m)
                row["note"] = (f"measured: {f_rate(sp['decode_tokens_per_s'])} decode tok/s" if sp["kind"] == MEASURED
                               else f"predicted: <= {f_rate(sp['decode_tokens_per_s_upper_bound'])} decode tok/s")
            elif s["kind"] == "bundle":
                t["bundle"] = {"path": str(Path(s["path"]) / m.get("bundle_path", "bundle")), "id": m.get("bundle_id"),
                               "bytes": m.get("bundle_bytes"), "runtime": m.get("runtime"),
                               "precision": m.get("precision")}
                t["fit"] = m.get("fit")
                row["note"] = f"{m.get('bundle_id')}: {f_bytes(m.get('bundle_bytes'))}"
            rows.append(row)
        if t["fit"] is None and t["speed"] and t["speed"].get("fits") is not None:
            t["fit"] = {"fits": t["speed"]["fits"], "label": "predicted (bench roofline)"}
        rep["targets"].append(t)
    return rep


# ------------------------------------------------------------------------------------------------ formatting
def f_ppl(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def f_rate(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def f_bytes(v) -> str:
    return "-" if v is None else f"{fmt_bytes(v)} ({v:,} B)"


def f_task(tq: dict | None) -> str:
    """"rougeL 12.34 -> 11.20 (drop 1.14 ± 0.60), 64 items": the task metric of a stage row."""
    if not tq:
        return ""

    def num(v, se=None):
        return "-" if v is None else f"{v:.2f}" + (f" ± {se:.2f}" if se is not None else "")

    if tq["before"] is None:
        return f"{tq['metric']} {num(tq['after'], tq['after_stderr'])}, {tq['items']} items"
    return (f"{tq['metric']} {num(tq['before'])} -> {num(tq['after'])} (drop {num(tq['drop'], tq['drop_stderr'])}), "
            f"{tq['items']} items")


def _speed_cells(sp: dict | None) -> list[str]:
    """[kind, decode tok/s, memory] for the summary table."""
    if not sp:
        return ["no bench stage", "-", "-"]
    if sp["kind"] == MEASURED:
        return [f"measured on {sp.get('device') or '?'}", f_rate(sp["decode_tokens_per_s"]),
                f_bytes(sp["peak_memory_bytes"]) + " peak"]
    return ["PREDICTED (roofline, not measured)",
            "<= " + f_rate(sp["decode_tokens_per_s_upper_bound"]) + " (bandwidth bound only; per-token launch and "
            "dispatch overhead, which dominates small models, is not in it)",
            f_bytes(sp["predicted_peak_memory_bytes"]) + " predicted"]


def _fit_cell(fit: dict | None) -> str:
    if not fit:
        return "-"
    verdict = "fits" if fit.get("fits") else "DOES NOT FIT"
    extra = f", needs {fmt_bytes(fit['required_bytes'])} of {fmt_bytes(fit['usable_bytes'])}" if fit.get("required_bytes") else ""
    ctx = f" at context {fit['context']}" if fit.get("context") else ""
    return f"{verdict}{extra}{ctx} (predicted)"


def summary_rows(rep: dict) -> tuple[list[str], list[list[str]]]:
    cols = ["target", "bundle", "size", "runtime / precision", "fit verdict", "final ppl", "final ppl, common text",
            "final task", "speed is", "decode tok/s", "memory"]
    rows = []
    for t in rep["targets"]:
        b = t["bundle"] or {}
        last = t["quality"][-1]["ppl_after"] if t["quality"] else None
        tl = t.get("tasks") and t["tasks"][-1]
        task = f"{tl['metric']} {tl['after']:.2f}" if tl else "-"
        rows.append([t["name"], b.get("path", "-"), f_bytes(b.get("bytes")),
                     f"{b.get('runtime', '-')} / {b.get('precision', '-')}", _fit_cell(t["fit"]), f_ppl(last),
                     f_common(t.get("common")), task,
                     *_speed_cells(t["speed"])])
    return cols, rows


def stage_rows(t: dict) -> tuple[list[str], list[list[str]]]:
    cols = ["#", "stage", "status", "seconds", "ppl before", "ppl after", "scored on", "ppl, common text",
            "task (x100)", "note"]
    rows = []
    for r in t["stages"]:
        q = r.get("quality") or {}
        secs = r.get("seconds")
        rows.append([str(r["index"]), r["kind"], r["status"], "-" if secs is None else f"{secs:.1f}",
                     f_ppl(q.get("ppl_before")), f_ppl(q.get("ppl_after")), q.get("text", ""),
                     f_common(r.get("common")), f_task(r.get("task")), r.get("note", "")])
    return cols, rows


def f_common(c: dict | None) -> str:
    """A stage's perplexity on the recipe's common text, or why it has none."""
    if not c:
        return "-"
    return f_ppl(c["perplexity"]) if "perplexity" in c else "not scored: " + c.get("error", "?")


# ------------------------------------------------------------------------------------------------------ plots
def _pyplot():
    from edgepack.errors import require

    mpl = require("matplotlib", "plot", "plots in the report")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(rep: dict, path: Path) -> dict:
    """Per lossy stage a segment from perplexity before to after it, one colour per target (shared stages coincide).
    Segments are not joined: each stage scores its own held-out text, so only the change within a stage is exact."""
    plt = _pyplot()
    labels = []
    for t in rep["targets"]:
        labels += [q["stage"] for q in t["quality"] if q["stage"] not in labels]
    labels.sort(key=lambda s: int(s.split()[0]))
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(labels) + 2), 4.2))
    drawn, commons, n = {}, {}, max(1, len(rep["targets"]))
    for i, t in enumerate(rep["targets"]):
        dx = (i - (n - 1) / 2) * 0.08
        pts = []
        for q in t["quality"]:
            x = labels.index(q["stage"]) + dx
            before = q["ppl_before"] if q["ppl_before"] is not None else q["ppl_after"]
            ax.plot([x - 0.2, x + 0.2], [before, q["ppl_after"]], marker="o", color=f"C{i}",
                    label=t["name"] if not pts else None)
            if not any((q["stage"], q["ppl_after"]) == (s, a) for p in drawn.values() for s, _, a in p):
                ax.annotate(f"{q['ppl_after']:.2f}", (x + 0.2, q["ppl_after"]), textcoords="offset points",
                            xytext=(4, 0), fontsize=7, color=f"C{i}")  # shared stages: labelled once
            pts.append((q["stage"], before, q["ppl_after"]))
        drawn[t["name"]] = pts
        # the common text (recipe eval_text): one protocol for every stage, so these points may be joined
        common = [(labels.index(f"{r['index']} {r['kind']}") + dx + 0.2, r["common"]["perplexity"])
                  for r in t["stages"] if f"{r['index']} {r['kind']}" in labels and (r.get("common") or {}).get("perplexity")]
        if common:
            ax.plot(*zip(*common), linestyle=":", marker="s", markersize=4, color=f"C{i}", alpha=0.7,
                    label="common text (dotted; colour = target)" if i == 0 else None)
            commons[f"{t['name']} (common text)"] = common
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8, rotation=15)
    ax.set_ylabel("perplexity: before -> after the stage")
    ax.set_title("quality across stages (segments: each stage on its own held-out text; dotted squares: every stage "
                 "on the recipe's common text)" if rep.get("common_eval") else
                 "quality across stages (each segment: one stage on its own held-out text)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn | commons


def plot_speed(rep: dict, path: Path) -> dict:
    """Decode tokens/s and memory per target: measured bars solid, predicted bars hatched and labelled."""
    plt = _pyplot()
    names, rate, mem, kinds = [], [], [], []
    for t in rep["targets"]:
        sp = t["speed"]
        if not sp:
            continue
        m = sp["kind"] == MEASURED
        names.append(t["name"])
        kinds.append(sp["kind"])
        rate.append((sp["decode_tokens_per_s"] if m else sp["decode_tokens_per_s_upper_bound"]) or 0.0)
        mem.append(((sp["peak_memory_bytes"] if m else sp["predicted_peak_memory_bytes"]) or 0) / 2**20)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(names) + 3), 4.8))
    for ax, vals, ylabel in ((a1, rate, "decode tokens/s (log scale)"), (a2, mem, "memory, MiB")):
        for i, (v, k) in enumerate(zip(vals, kinds)):
            if k == MEASURED or ax is a2:
                ax.bar(i, v, color="tab:blue" if k == MEASURED else "white",
                       edgecolor="tab:blue" if k == MEASURED else "gray", hatch=None if k == MEASURED else "//")
                ax.annotate(k, (i, v), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
            else:  # a bandwidth bound is a ceiling, not a speed: a capped line, never a bar beside a measured one
                ax.plot([i - 0.35, i + 0.35], [v, v], color="gray", linestyle="--")
                ax.plot([i], [v], marker="v", color="gray")
                ax.annotate("upper bound\n(bandwidth only)", (i, v), textcoords="offset points", xytext=(0, 4),
                            ha="center", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.15)
    if any(rate):
        a1.set_yscale("log")
    fig.suptitle("speed across targets: bars = measured; dashed caps = roofline upper bounds (bandwidth only: launch "
                 "and dispatch overhead not modelled, so small models run far below them)", fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"targets": names, "decode_tokens_per_s": rate, "memory_mib": mem, "kinds": kinds,
            "speed_drawn_as": ["bar" if k == MEASURED else "upper-bound cap" for k in kinds]}


# --------------------------------------------------------------------------------------------------- writers
def _md_table(cols, rows) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |" for r in esc])


def _html_table(cols, rows) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


INTRO = ("Numbers are read from the stage manifests. Perplexity: each lossy stage scores its own held-out text "
         "(named per row), before and after the stage. Task: the gated task metric (edgepack-task-v1, x100) on "
         "held-out items, ± its standard error (for a drop: the paired standard error). Speed: **measured** where the bench ran on the target's "
         "hardware; **predicted** (roofline: target bandwidth / bytes read per decoded token, an upper bound, not a "
         "measurement) where it did not. Fit verdicts are predictions (targets.fit).")


def common_note(rep: dict) -> str:
    c = rep.get("common_eval")
    if not c:
        return ("No common text: each stage's perplexity above is on its own held-out text, so they do not chain; set "
                "[recipe] eval_text to score the input and every stage's output on one text.")
    return (f"Common text: the input and every stage's output scored on {c['text']} (sha256 {c['text_sha256'][:12]}, "
            f"{c['protocol']['name']}, at most {c['max_tokens'] or 'all'} tokens), each through its own format's "
            f"runtime on this CPU; the input model: {f_common(c.get('input'))}. A text any stage trained or "
            "calibrated on favours that stage.")


def render_markdown(rep: dict, plots: dict[str, str]) -> str:
    r = rep["run"]
    out = [f"# edgepack report: {r['name']}", "", f"Recipe `{r['recipe']}`, model `{r['model']}`, run `{r['run_dir']}`.",
           "", INTRO, "", common_note(rep), "", "## Summary", "", _md_table(*summary_rows(rep)), ""]
    for key, title in (("quality", "Quality across stages"), ("speed", "Speed across targets")):
        if key in plots:
            out += [f"## {title}", "", f"![{title}]({plots[key]})", ""]
    for t in rep["targets"]:
        out += [f"## {t['name']}", "", _md_table(*stage_rows(t)), ""]
        sp = t["speed"]
        if sp and sp["kind"] == PREDICTED:
            out += [f"Speed **predicted**, not measured: {sp.get('reason') or ''}", ""]
    return "\n".join(out) + "\n"


CSS = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0;"
       "font-size:90%}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
       "th{background:#f2f2f2}img{max-width:100%}.pred{color:#a15c00}")


def render_html(rep: dict, plots_b64: dict[str, str]) -> str:
    r = rep["run"]
    md_bold = INTRO.replace("**measured**", "<b>measured</b>").replace("**predicted**", '<b class="pred">predicted</b>')
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>edgepack report: {html.escape(str(r['name']))}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>edgepack report: {html.escape(str(r['name']))}</h1>",
             f"<p>Recipe <code>{html.escape(str(r['recipe']))}</code>, model <code>{html.escape(str(r['model']))}</code>,"
             f" run <code>{html.escape(r['run_dir'])}</code>.</p><p>{md_bold}</p>",
             f"<p>{html.escape(common_note(rep))}</p>", "<h2>Summary</h2>", _html_table(*summary_rows(rep))]
    for key, title in (("quality", "Quality across stages"), ("speed", "Speed across targets")):
        if key in plots_b64:
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{plots_b64[key]}'>")
    for t in rep["targets"]:
        parts += [f"<h2>{html.escape(t['name'])}</h2>", _html_table(*stage_rows(t))]
        sp = t["speed"]
        if sp and sp["kind"] == PREDICTED:
            parts.append(f"<p class='pred'>Speed <b>predicted</b>, not measured: {html.escape(sp.get('reason') or '')}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir, out, *, plots: bool = True) -> dict:
    """Write the report to `out` (.html or .md by suffix); returns {report, written: [paths]}."""
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in (".html", ".htm", ".md", ".markdown"):
        raise ConfigError(f"report format '{out.suffix or out.name}' is not known", "use -o report.html or -o report.md")
    rep = build_report(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = fmt in (".md", ".markdown")
    written, pngs = [], {}
    with tempfile.TemporaryDirectory() as tmp:  # HTML embeds its plots: no PNG files next to it
        for key, fn in ((("quality", plot_quality), ("speed", plot_speed)) if plots else ()):
            p = out.with_name(f"{out.stem}-{key}.png") if markdown else Path(tmp) / f"{key}.png"
            fn(rep, p)
            pngs[key] = p
        if markdown:
            out.write_text(render_markdown(rep, {k: p.name for k, p in pngs.items()}))
            written += [str(p) for p in pngs.values()]
        else:
            out.write_text(render_html(rep, {k: base64.b64encode(p.read_bytes()).decode() for k, p in pngs.items()}))
    return {"report": rep, "written": [str(out)] + written}
