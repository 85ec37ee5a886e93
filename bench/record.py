"""The bench record (JSON schema), its tables, and plots (matplotlib, Agg backend: no display needed).

Record (protocol edgepack-bench-v1), keys kept stable for tools that read them:
    decode_tokens_per_s, prefill_tokens_per_s, ttft_ms, bandwidth_utilization   headline = first sweep point
    peak_memory_bytes                                                            max over the sweep points
    device        {name, threads, kernel, runtime {...}, versions {...}, power_mode on Jetson, driver on CUDA}
    points        one object per sweep point with the same keys (+ p10/p90, ITL, roofline, memory details)
    baseline      (with --baseline) the same keys for plain transformers generate; speedup = ours / baseline decode
    figures       for each figure: "measured", "roofline prediction" or "prediction (targets.fit)"
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepack.errors import ConfigError

HEADLINE_KEYS = ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "peak_memory_bytes", "bandwidth_utilization")
REQUIRED_KEYS = HEADLINE_KEYS + ("device", "points")
FIGURES = {
    "decode_tokens_per_s": "measured", "prefill_tokens_per_s": "measured", "ttft_ms": "measured",
    "peak_memory_bytes": "measured", "itl_ms_median": "measured", "artifact_bytes": "measured",
    "bandwidth_utilization": "measured decode tokens/s x bytes_per_token / target bandwidth",
    "bytes_per_token": "prediction (model shape at the weight precision)",
    "roofline_decode_tokens_per_s": "roofline prediction (bandwidth / bytes read per token)",
    "predicted_peak_memory_bytes": "prediction (targets.fit: weights + KV cache + workspace + runtime overhead)",
    "fits": "prediction (targets.fit: predicted peak within the target's usable memory)",
    "speedup": "measured (ours / baseline decode tokens/s, runs alternating in one process)",
    "decode_tokens_per_s_paired": "measured (ours, in the runs alternating with the baseline)",
}


def _utilization(pt: dict, bandwidth: float) -> float | None:
    if pt.get("decode_tokens_per_s") is None or not pt.get("bytes_per_token") or not bandwidth:
        return None
    return pt["decode_tokens_per_s"] * pt["bytes_per_token"] / bandwidth


def _headline(points: list[dict]) -> dict:
    first = points[0]
    peaks = [p["peak_memory_bytes"] for p in points if p.get("peak_memory_bytes") is not None]
    return {"decode_tokens_per_s": first.get("decode_tokens_per_s"),
            "prefill_tokens_per_s": first.get("prefill_tokens_per_s"), "ttft_ms": first.get("ttft_ms"),
            "peak_memory_bytes": max(peaks) if peaks else None,
            "bandwidth_utilization": first.get("bandwidth_utilization")}


SPEEDUP_IS = ("ours decode tok/s measured in the same seconds as the baseline, run for run (decode_tokens_per_s_paired)"
              " / the baseline's decode tok/s; ours alone (decode_tokens_per_s) was measured before the baseline loaded")
# greedy tokens of an artifact and its own base agree far above this even at INT4 (the random prompts of the bench
# protocol); a different model agrees on a few percent
MIN_BASELINE_AGREEMENT = 0.5


def finish_record(record: dict, points: list[dict], base_points: list[dict] | None = None) -> dict:
    """Add per-point bandwidth utilisation, headline figures, the baseline and speedups; drop internal fields."""
    bw = record["target"]["bandwidth_bytes_per_s"]
    points = [{k: v for k, v in p.items() if not k.startswith("_")} for p in points]
    for p in points:
        p["bandwidth_utilization"] = _utilization(p, bw)
    record.update(_headline(points))
    record["points"] = points
    record["figures"] = dict(FIGURES)
    if base_points is not None:
        base_points = [{k: v for k, v in p.items() if not k.startswith("_")} for p in base_points]
        for ours, base in zip(points, base_points):
            base["bytes_per_token"] = ours.get("bytes_per_token")
            base["bandwidth_utilization"] = _utilization(base, bw)
            ours["speedup"] = _ratio(ours.get("decode_tokens_per_s_paired", ours.get("decode_tokens_per_s")),
                                     base.get("decode_tokens_per_s"))
        record["baseline"] = {"runtime": "hf", "method": "transformers generate, greedy, same process, runs "
                              "alternating with ours", **_headline(base_points), "points": base_points,
                              "speedup_is": SPEEDUP_IS}
        record["speedup"] = points[0]["speedup"]
        agree = [b.get("token_agreement") for b in base_points if b.get("token_agreement") is not None]
        if agree and min(agree) < MIN_BASELINE_AGREEMENT:
            record["baseline"]["warning"] = (
                f"the baseline agrees with the artifact on only {min(agree):.0%} of greedy tokens: it is not the "
                "model this artifact was made from, so the speedup compares two different models -- pass "
                "--baseline-model with the checkpoint the artifact came from")
    return record


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def validate_record(rec) -> list[str]:
    """Problems with a bench record (empty list: valid)."""
    if not isinstance(rec, dict):
        return ["a bench record is a JSON object"]
    errs = [f"missing key '{k}'" for k in REQUIRED_KEYS if k not in rec]
    for k in HEADLINE_KEYS:
        if k in rec and rec[k] is not None and not isinstance(rec[k], (int, float)):
            errs.append(f"'{k}' must be a number or null")
    if not isinstance(rec.get("device", {}), dict) or ("device" in rec and "name" not in rec["device"]):
        errs.append("'device' must be an object with a 'name'")
    pts = rec.get("points")
    if "points" in rec and (not isinstance(pts, list) or not pts):
        errs.append("'points' must be a non-empty list")
    elif isinstance(pts, list):
        for i, p in enumerate(pts):
            missing = [k for k in HEADLINE_KEYS if k not in p]
            if missing:
                errs.append(f"points[{i}] lacks {', '.join(missing)}")
    if "baseline" in rec:
        b = rec["baseline"]
        missing = [k for k in HEADLINE_KEYS + ("points",) if not isinstance(b, dict) or k not in b]
        if missing:
            errs.append(f"baseline lacks {', '.join(missing)}")
        if "speedup" not in rec:
            errs.append("a record with a baseline needs 'speedup'")
    return errs


def load_record(path) -> dict:
    """A bench record from a JSON file (e.g. `edgepack bench ... --json > a.json`) or from an artifact directory
    whose manifest holds a `bench` stage record."""
    p = Path(path)
    if p.is_dir():
        from edgepack.artifact import open_artifact

        art = open_artifact(p, trust_pickle=True)  # reads only the manifest
        recs = [r for r in art.history if r.get("stage") == "bench"]
        if not recs:
            raise ConfigError(f"'{p}' has no bench record in its manifest", "run the bench stage on it, or pass a JSON file")
        rec = dict(recs[-1]["metrics"])
    elif not p.is_file():
        raise ConfigError(f"bench record '{p}' does not exist", "pass JSON files written with 'edgepack bench ... --json'")
    else:
        lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
        try:
            rec = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"'{p}' is not a bench record: its last line is not JSON ({exc.msg})",
                              "write it with 'edgepack bench ARTIFACT --json > FILE'") from None
    errs = validate_record(rec)
    if errs:
        raise ConfigError(f"'{p}' is not a valid bench record: " + "; ".join(errs),
                          "write it with 'edgepack bench ARTIFACT --json > FILE'")
    rec.setdefault("_source", str(p))
    return rec


def label(rec: dict) -> str:
    name = Path(rec.get("artifact", rec.get("_source", "?"))).name
    return f"{name} {rec.get('precision') or '?'} {rec.get('runtime', '?')}"


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _f(x, digits=1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _with_spread(median, p10, p90) -> str:
    """'median (p10-p90)', or only what exists: an unmeasured record shows '-', never '- (---)'."""
    if median is None:
        return "-"
    return _f(median) + (f" ({_f(p10)}-{_f(p90)})" if p10 is not None and p90 is not None else "")


def point_rows(rec: dict) -> tuple[list[str], list[list[str]]]:
    cols = ["prompt", "gen", "batch", "decode tok/s (p10-p90)", "prefill tok/s", "TTFT ms", "peak mem",
            "predicted mem", "bytes/token", "MBU", "roofline tok/s"]
    rows = []
    for p in rec["points"]:
        rows.append([str(p["prompt_len"]), str(p["gen_len"]), str(p["batch"]),
                     _with_spread(p.get("decode_tokens_per_s"), p.get("decode_tokens_per_s_p10"),
                                  p.get("decode_tokens_per_s_p90")),
                     _f(p.get("prefill_tokens_per_s")), _f(p.get("ttft_ms"), 2), _mib(p.get("peak_memory_bytes")),
                     _mib(p.get("predicted_peak_memory_bytes")), _mib(p.get("bytes_per_token")),
                     "-" if p.get("bandwidth_utilization") is None else f"{p['bandwidth_utilization']:.1%}",
                     _f(p.get("roofline_decode_tokens_per_s"), 0)])
    return cols, rows


def compare_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per record (headline point), with decode tokens/s as a ratio to the first record."""
    cols = ["artifact", "device", "threads", "point", "decode tok/s (p10-p90)", "vs first", "prefill tok/s",
            "TTFT ms", "peak mem", "size", "MBU"]
    ref = records[0].get("decode_tokens_per_s")
    rows = []
    for r in records:
        p = r["points"][0]
        rows.append([label(r), str(r["device"].get("name", "?")), str(r["device"].get("threads", "-")),
                     f"{p.get('prompt_len')}/{p.get('gen_len')}/b{p.get('batch')}",
                     _with_spread(r["decode_tokens_per_s"], p.get("decode_tokens_per_s_p10"),
                                  p.get("decode_tokens_per_s_p90")),
                     "-" if not ref or r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s'] / ref:.2f}x",
                     _f(r["prefill_tokens_per_s"]), _f(r["ttft_ms"], 2), _mib(r["peak_memory_bytes"]),
                     _mib(r.get("artifact_bytes")),
                     "-" if r.get("bandwidth_utilization") is None else f"{r['bandwidth_utilization']:.1%}"])
    return cols, rows


def _pyplot():
    from edgepack.errors import require

    mpl = require("matplotlib", "plot", "plots for bench")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(records: list[dict], path) -> dict:
    """Bar charts of decode tokens/s (with p10-p90 whiskers) and peak memory per record; returns what it drew."""
    plt = _pyplot()
    labels = [label(r) + f"\n{r['device'].get('name', '?')[:28]}" for r in records]
    decode = [r["decode_tokens_per_s"] or 0.0 for r in records]
    lo = [max(0.0, d - (r["points"][0].get("decode_tokens_per_s_p10") or d)) for d, r in zip(decode, records)]
    hi = [max(0.0, (r["points"][0].get("decode_tokens_per_s_p90") or d) - d) for d, r in zip(decode, records)]
    mem = [(r["peak_memory_bytes"] or 0) / 2**20 for r in records]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.8 * len(records) + 4), 4.5))
    x = range(len(records))
    a1.bar(x, decode, yerr=[lo, hi], capsize=4, color="tab:blue")
    a1.set_ylabel("decode tokens/s (median, p10-p90)")
    a2.bar(x, mem, color="tab:orange")
    a2.set_ylabel("peak memory (MiB)")
    for ax in (a1, a2):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    fig.suptitle("edgepack bench compare")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"labels": labels, "decode_tokens_per_s": decode, "peak_memory_mib": mem}


def plot_points(rec: dict, path) -> dict:
    """Decode and prefill tokens/s per sweep point of one record; returns what it drew."""
    plt = _pyplot()
    pts = rec["points"]
    labels = [f"p{p['prompt_len']}/g{p['gen_len']}/b{p['batch']}" for p in pts]
    decode = [p.get("decode_tokens_per_s") or 0.0 for p in pts]
    prefill = [p.get("prefill_tokens_per_s") or 0.0 for p in pts]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(pts) * 2), 4))
    x = range(len(pts))
    a1.bar(x, decode, color="tab:blue")
    a1.set_ylabel("decode tokens/s (median)")
    a2.bar(x, prefill, color="tab:green")
    a2.set_ylabel("prefill tokens/s (median)")
    for ax in (a1, a2):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"{label(rec)} on {rec['device'].get('name', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"labels": labels, "decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill}
