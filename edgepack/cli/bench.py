"""`edgepack bench ARTIFACT ...` (measure) and `edgepack bench compare A.json B.json ...` (report).

No torch / transformers import at module level: `edgepack --help` stays light.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.bench.run import BenchConfig
from edgepack.cli.common import config_from, config_option, int_list, json_opt
from edgepack.output import emit_json, print_table

B = BenchConfig


class BenchGroup(click.Group):
    """`edgepack bench ARTIFACT` runs the `run` subcommand: anything that is not a subcommand name is an artifact."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=BenchGroup)
def bench():
    """Measure tokens/s, latency and memory of an artifact, or compare saved results.

    \b
    edgepack bench ARTIFACT [OPTIONS]      is short for: edgepack bench run ARTIFACT [OPTIONS]
                                          (its options: edgepack bench run --help)
    edgepack bench compare A.json B.json  side by side"""


@bench.command("run")
@click.argument("artifact", type=click.Path())
@config_option(B, "runtime", help="Runtime from edgepack.formats.RUNTIMES [default: the artifact's own].")
@config_option(B, "prompt_lens", "--prompt-len", multiple=True, callback=int_list,
               help="Prompt tokens per row; repeat or comma-separate to sweep.")
@config_option(B, "gen_lens", "--gen-len", multiple=True, callback=int_list,
               help="Generated tokens per row; repeat or comma-separate to sweep.")
@config_option(B, "batches", "--batch", multiple=True, callback=int_list,
               help="Rows per generation; repeat or comma-separate to sweep.")
@config_option(B, "runs", help="Measured runs per sweep point (at least).")
@config_option(B, "min_seconds",
               help="Keep measuring a point until this much wall time (more samples for small models); 0 = --runs.")
@config_option(B, "warmup", help="Discarded warm-up runs per sweep point.")
@config_option(B, "threads", help="CPU threads for the runtime [default: the runtime's].")
@click.option("--target", "target_name", default="local", show_default=True,
              help="Target whose bandwidth the utilisation is computed against ('local' measures this machine).")
@config_option(B, "baseline", help="Also measure plain transformers generate; report the ratio.")
@config_option(B, "baseline_model", type=click.Path(), help="HF checkpoint for the baseline (ONNX artifacts).")
@config_option(B, "realtime",
               help="Time under SCHED_FIFO (root): a dedicated core on a shared, noisy machine; recorded in the JSON.")
@click.option("--plot", "plot_path", type=click.Path(), help="Write a PNG of tokens/s per sweep point.")
@click.option("--save", "save_path", type=click.Path(), help="Also write the JSON record to this file.")
@json_opt
def run_cmd(artifact, target_name, plot_path, save_path, as_json, **settings):
    """Benchmark ARTIFACT on this machine: TTFT, prefill and decode tokens/s, peak memory, bandwidth utilisation."""
    from edgepack.artifact import open_artifact
    from edgepack.bench.run import run_bench
    from edgepack.targets import load_target

    cfg = config_from(BenchConfig, settings, "bench options")
    art = open_artifact(artifact)
    if target_name == "local":
        click.echo("measuring this machine's memory bandwidth (target 'local')...", err=True)
    target = load_target(target_name)
    from edgepack.bench.stage import hardware_present

    present, why = hardware_present(target)
    if not present:
        click.echo(f"warning: {why}: every figure below is measured on THIS machine; the roofline and bandwidth use "
                   f"are computed with {target.name}'s bandwidth, so they do not describe either machine -- run bench "
                   f"on the {target.name} itself (edgepack remote bench), or pass --target local", err=True)
    rec = run_bench(art, cfg, target, progress=lambda m: click.echo(f"  {m}", err=True))
    rec["target_hardware"] = {"present": present, "reason": why}
    if save_path:
        _write_json(rec, Path(save_path))
    if plot_path:
        from edgepack.bench.record import plot_points

        plot_points(rec, plot_path)
    if as_json:
        emit_json(rec)
        return
    _print_record(rec)


def _write_json(rec: dict, path: Path) -> None:
    from edgepack.output import to_json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(rec) + "\n")


def _print_record(rec: dict) -> None:
    from edgepack.bench.record import label, point_rows

    d = rec["device"]
    cols, rows = point_rows(rec)
    absent = rec.get("target_hardware", {}).get("present") is False
    print_table(f"bench {label(rec)} on {d.get('name')} ({d.get('threads')} thread{'s' if d.get('threads') != 1 else ''})"
                + (f" -- NOT {rec['target']['name']} hardware: measured here" if absent else ""), cols, rows,
                caption=f"medians over {rec['points'][0]['runs']} runs after {rec['settings']['warmup']} warm-up; "
                        f"peak mem = {rec['points'][0].get('peak_memory_kind', '?')}; predicted mem and roofline are "
                        f"predictions (targets.fit), MBU against {rec['target']['name']} "
                        f"({rec['target']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
    if "baseline" in rec:
        rows = [[f"{p['prompt_len']}/{p['gen_len']}/b{p['batch']}", f"{o['decode_tokens_per_s']:.1f}",
                 f"{o.get('decode_tokens_per_s_paired', o['decode_tokens_per_s']):.1f}",
                 f"{p['decode_tokens_per_s']:.1f}", f"{o['speedup']:.2f}x", f"{p['ttft_ms']:.2f}",
                 "-" if p.get("token_agreement") is None else f"{p['token_agreement']:.0%}"]
                for o, p in zip(rec["points"], rec["baseline"]["points"])]
        print_table("ours vs plain transformers generate (same process)",
                    ["point", "ours alone tok/s", "ours (b) tok/s", "hf generate (a) tok/s", "speedup b/a",
                     "hf TTFT ms", "same tokens"], rows,
                    caption="(a) and (b) were measured run for run in the same seconds; 'ours alone' before the "
                            "baseline loaded")
        if rec["baseline"].get("warning"):
            click.echo("warning: " + rec["baseline"]["warning"], err=True)


@bench.command("compare")
@click.argument("records", nargs=-1, required=True, type=click.Path())
@click.option("--plot", "plot_path", type=click.Path(), help="Write a PNG: decode tokens/s and peak memory per record.")
@json_opt
def compare_cmd(records, plot_path, as_json):
    """Compare saved bench records (JSON files from --json/--save, or artifact directories with a bench stage)."""
    from edgepack.bench.record import compare_rows, label, load_record, plot_compare

    recs = [load_record(r) for r in records]
    if plot_path:
        plot_compare(recs, plot_path)
    if as_json:
        ref = recs[0]["decode_tokens_per_s"]
        emit_json({"records": [{"label": label(r), "source": r["_source"], "device": r["device"].get("name"),
                                **{k: r.get(k) for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms",
                                                         "peak_memory_bytes", "bandwidth_utilization", "artifact_bytes")},
                                "decode_vs_first": (r["decode_tokens_per_s"] / ref) if ref and r["decode_tokens_per_s"] else None}
                               for r in recs], "plot": plot_path})
        return
    cols, rows = compare_rows(recs)
    print_table("edgepack bench compare", cols, rows,
                caption="headline point of each record (first sweep point); medians; 'vs first' = decode tokens/s "
                        "ratio to the first record; only records measured side by side on one machine compare fairly")
    if plot_path:
        click.echo(f"plot written to {plot_path}", err=True)

