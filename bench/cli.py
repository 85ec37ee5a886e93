"""`edgepack bench ARTIFACT ...` (measure) and `edgepack bench compare A.json B.json ...` (report).

No torch / transformers import at module level: `edgepack --help` stays light.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgepack.commands import json_opt
from edgepack.output import emit_json, print_table


def _int_list(ctx, param, value):
    """Repeated and/or comma-separated integers: --prompt-len 32,128 --prompt-len 512 -> (32, 128, 512)."""
    out = []
    for v in value:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise click.BadParameter(f"'{part}' is not an integer", ctx=ctx, param=param) from None
    return tuple(out)


class BenchGroup(click.Group):
    """`edgepack bench ARTIFACT` runs the `run` subcommand: anything that is not a subcommand name is an artifact."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=BenchGroup)
def bench():
    """Measure tokens/s, latency and memory of an artifact (edgepack bench ARTIFACT), or compare saved results
    (edgepack bench compare A.json B.json)."""


@bench.command("run")
@click.argument("artifact", type=click.Path())
@click.option("--runtime", help="Runtime from deploy.runtime.RUNTIMES [default: the artifact format's own].")
@click.option("--prompt-len", "prompt_lens", multiple=True, default=("64",), callback=_int_list, show_default=True,
              help="Prompt tokens per row; repeat or comma-separate to sweep.")
@click.option("--gen-len", "gen_lens", multiple=True, default=("64",), callback=_int_list, show_default=True,
              help="Generated tokens per row; repeat or comma-separate to sweep.")
@click.option("--batch", "batches", multiple=True, default=("1",), callback=_int_list, show_default=True,
              help="Rows per generation; repeat or comma-separate to sweep.")
@click.option("--runs", default=5, show_default=True, help="Measured runs per sweep point (at least).")
@click.option("--min-seconds", default=2.0, show_default=True,
              help="Keep measuring a point until this much wall time (more samples for small models); 0 = --runs.")
@click.option("--warmup", default=2, show_default=True, help="Discarded warm-up runs per sweep point.")
@click.option("--threads", type=int, help="CPU threads for the runtime [default: the runtime's].")
@click.option("--target", "target_name", default="local", show_default=True,
              help="Target whose bandwidth the utilisation is computed against ('local' measures this machine).")
@click.option("--baseline", type=click.Choice(("hf",)), help="Also measure plain transformers generate; report the ratio.")
@click.option("--baseline-model", type=click.Path(), default="", help="HF checkpoint for the baseline (ONNX artifacts).")
@click.option("--realtime", is_flag=True,
              help="Time under SCHED_FIFO (root): a dedicated core on a shared, noisy machine; recorded in the JSON.")
@click.option("--plot", "plot_path", type=click.Path(), help="Write a PNG of tokens/s per sweep point.")
@click.option("--save", "save_path", type=click.Path(), help="Also write the JSON record to this file.")
@json_opt
def run_cmd(artifact, runtime, prompt_lens, gen_lens, batches, runs, min_seconds, warmup, threads, target_name,
            baseline, baseline_model, realtime, plot_path, save_path, as_json):
    """Benchmark ARTIFACT on this machine: TTFT, prefill and decode tokens/s, peak memory, bandwidth utilisation."""
    from edgepack.artifact import open_artifact
    from edgepack.bench.run import BenchConfig, run_bench
    from edgepack.errors import ConfigError
    from edgepack.targets import load_target

    cfg = BenchConfig(runtime=runtime, prompt_lens=prompt_lens, gen_lens=gen_lens, batches=batches, runs=runs,
                      min_seconds=min_seconds, warmup=warmup, threads=threads, baseline=baseline, baseline_model=baseline_model or "",
                      realtime=realtime)
    errs = cfg.validate()
    if errs:
        raise ConfigError("bench options: " + "; ".join(errs), "fix the options named")
    art = open_artifact(artifact)
    if target_name == "local":
        click.echo("measuring this machine's memory bandwidth (target 'local')...", err=True)
    target = load_target(target_name)
    rec = run_bench(art, cfg, target, progress=lambda m: click.echo(f"  {m}", err=True))
    if save_path:
        _write_json(rec, Path(save_path))
    if plot_path:
        from edgepack.bench.report import plot_points

        plot_points(rec, plot_path)
    if as_json:
        emit_json(rec)
        return
    _print_record(rec)


def _write_json(rec: dict, path: Path) -> None:
    from edgepack.output import _clean

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(rec), default=str) + "\n")


def _print_record(rec: dict) -> None:
    from edgepack.bench.report import label, point_rows

    d = rec["device"]
    cols, rows = point_rows(rec)
    print_table(f"bench {label(rec)} on {d.get('name')} ({d.get('threads')} threads)", cols, rows,
                caption=f"medians over {rec['points'][0]['runs']} runs after {rec['settings']['warmup']} warm-up; "
                        f"peak mem = {rec['points'][0].get('peak_memory_kind', '?')}; predicted mem and roofline are "
                        f"predictions (targets.fit), MBU against {rec['target']['name']} "
                        f"({rec['target']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
    if "baseline" in rec:
        rows = [[f"{p['prompt_len']}/{p['gen_len']}/b{p['batch']}", f"{o['decode_tokens_per_s']:.1f}",
                 f"{p['decode_tokens_per_s']:.1f}", f"{o['speedup']:.2f}x", f"{p['ttft_ms']:.2f}",
                 "-" if p.get("token_agreement") is None else f"{p['token_agreement']:.0%}"]
                for o, p in zip(rec["points"], rec["baseline"]["points"])]
        print_table("ours vs plain transformers generate (same process)",
                    ["point", "ours decode tok/s", "hf generate tok/s", "speedup", "hf TTFT ms", "same tokens"], rows)


@bench.command("compare")
@click.argument("records", nargs=-1, required=True, type=click.Path())
@click.option("--plot", "plot_path", type=click.Path(), help="Write a PNG: decode tokens/s and peak memory per record.")
@json_opt
def compare_cmd(records, plot_path, as_json):
    """Compare saved bench records (JSON files from --json/--save, or artifact directories with a bench stage)."""
    from edgepack.bench.report import compare_rows, label, load_record, plot_compare

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


if __name__ == "__main__":  # pragma: no cover
    bench(sys.argv[1:])
