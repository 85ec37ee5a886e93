"""bench: statistics, the measurement protocol (warm-up excluded, TTFT / ITL split), peak memory, the JSON schema,
the baseline ratio, the compare report and plot, the CLI and the `bench` stage."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.bench.measure import latency_stats, measure_point, percentile, token_agreement, ttft_stats
from edgepack.bench.record import compare_rows, finish_record, load_record, plot_compare, validate_record
from edgepack.bench.run import BenchConfig
from edgepack.errors import ConfigError

MIB = 1024**2


# ------------------------------------------------------------------------------------------------ statistics
def test_percentiles_and_latency_stats():
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 50) == pytest.approx(5.5)
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 10) == pytest.approx(1.9)
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)
    itl = [0.010] * 5 + [0.020] * 5 + [1.0]  # one scheduler hiccup: the median ignores it
    s = latency_stats(itl, batch=4)
    assert s["itl_ms_median"] == pytest.approx(20.0)
    assert s["decode_tokens_per_s"] == pytest.approx(4 / 0.020)
    assert s["decode_tokens_per_s_p10"] == pytest.approx(4 / 0.020)  # p90 ITL is still 20 ms: the 1 s outlier is beyond it
    assert s["decode_tokens_per_s_p90"] == pytest.approx(4 / 0.010)
    assert s["decode_steps"] == 11
    t = ttft_stats([0.1, 0.2, 0.3], prompt_len=10, batch=2)
    assert t["ttft_ms"] == pytest.approx(200.0)
    assert t["prefill_tokens_per_s"] == pytest.approx(100.0)  # median of 200, 100, 66.7 tokens/s
    assert token_agreement(np.array([[1, 2, 3, 4]]), np.array([[1, 2, 9, 4]])) == 0.75
    assert token_agreement(np.zeros((1, 3)), np.zeros((1, 4))) is None


class ClockedRuntime:
    """A Runtime whose calls advance a fake clock by fixed amounts: prefill costs 1 ms per prompt token x rows,
    a decode step 4 ms. Counts calls so the test can check the warm-up runs are not measured."""

    name = "clocked"

    def __init__(self, clock):
        self.clock, self.prefills, self.steps = clock, 0, 0

    def reset(self):
        pass

    def prefill(self, ids):
        self.prefills += 1
        self.clock[0] += 0.001 * ids.shape[1]
        return np.zeros((ids.shape[0], 16), dtype=np.float32)

    def decode_step(self, ids):
        self.steps += 1
        self.clock[0] += 0.004
        return np.zeros((len(ids), 16), dtype=np.float32)


def test_measure_point_protocol_on_a_clocked_runtime(monkeypatch):
    import edgepack.deploy.generation as generation

    clock = [0.0]
    monkeypatch.setattr(generation.time, "perf_counter", lambda: clock[0])
    rt = ClockedRuntime(clock)
    pt = measure_point(rt, prompt_len=20, gen_len=6, batch=2, runs=3, warmup=2, vocab=16)
    assert rt.prefills == 5 and rt.steps == 5 * 5  # 2 warm-up + 3 measured runs, 5 decode steps each
    assert pt["decode_steps"] == 3 * 5  # warm-up excluded
    assert pt["ttft_ms"] == pytest.approx(20.0)
    assert pt["prefill_tokens_per_s"] == pytest.approx(2 * 20 / 0.020)
    assert pt["itl_ms_median"] == pytest.approx(4.0)
    assert pt["decode_tokens_per_s"] == pytest.approx(2 / 0.004)
    assert pt["_tokens"].shape == (2, 6)


class LoggedHF:
    """Stands in for the `hf` runtime's hf_generate: each call costs 1 ms per prompt token plus 5 ms per new token
    on a fake clock, and is logged so the interleaving order can be checked."""

    name = "hf"

    def __init__(self, clock, log):
        self.clock, self.log = clock, log

    def hf_generate(self, ids, n):
        self.log.append(f"hf{n}")
        self.clock[0] += 0.001 * ids.shape[1] + 0.005 * n
        return np.zeros((ids.shape[0], n), dtype=np.int64), 0.001 * ids.shape[1] + 0.005 * n


def test_baseline_timing_and_interleaving():
    from edgepack.bench.measure import measure_hf_generate

    clock, log = [0.0], []
    pt = measure_hf_generate(LoggedHF(clock, log), 10, 9, 1, runs=3, warmup=1, vocab=16,
                             between=lambda ids: log.append("ours"))
    assert log == ["ours", "hf1", "hf9"] * 4  # warm-up + 3 runs, ours before every baseline run
    # decode = (generate(9) - generate(1)) / 8 steps = 5 ms per token; TTFT = generate(1) = 15 ms
    assert pt["decode_tokens_per_s"] == pytest.approx(200.0) and pt["ttft_ms"] == pytest.approx(15.0)
    with pytest.raises(ConfigError, match="gen-len >= 2"):
        measure_hf_generate(LoggedHF(clock, log), 10, 1, 1, runs=1, warmup=0, vocab=16)


# ---------------------------------------------------------------------------------------------------- memory
def test_peak_memory_window_sees_an_allocation_and_resets():
    from edgepack.bench.memory import PeakMemory

    with PeakMemory("cpu") as before:
        pass
    with PeakMemory("cpu") as m:
        buf = np.ones(96 * MIB // 8)  # 96 MiB touched
        del buf
    with PeakMemory("cpu") as after:
        pass
    grew = m.result["rss_peak_bytes"] - before.result["rss_peak_bytes"]
    assert 90 * MIB < grew < 120 * MIB
    # the window after the allocation starts from the current RSS again, not from the lifetime maximum
    assert after.result["rss_peak_bytes"] < m.result["rss_peak_bytes"] - 80 * MIB
    assert m.headline_bytes() == (m.result["rss_peak_bytes"], "process peak RSS")


# ---------------------------------------------------------------------------------------------- real runtime
@pytest.fixture(scope="module")
def cpu_target():
    from edgepack.targets import load_target

    return load_target("cpu-x86-64")  # datasheet bandwidth: no 1 s bandwidth measurement in tests


@pytest.fixture(scope="module")
def tiny_record(tiny_model, cpu_target):
    from edgepack.artifact import open_artifact
    from edgepack.bench.run import run_bench

    cfg = BenchConfig(prompt_lens=(8,), gen_lens=(6,), batches=(1, 2), runs=2, warmup=1, threads=1, baseline="hf",
                      min_seconds=0)
    return run_bench(open_artifact(tiny_model), cfg, cpu_target)


def test_record_schema_roofline_and_baseline(tiny_record, tiny_model, cpu_target):
    from edgepack.facts import read_model_config
    from edgepack.targets.fit import fit

    rec = tiny_record
    assert validate_record(rec) == []
    assert [(p["prompt_len"], p["gen_len"], p["batch"]) for p in rec["points"]] == [(8, 6, 1), (8, 6, 2)]
    for p in rec["points"]:
        assert p["decode_steps"] == 2 * 5 and p["decode_tokens_per_s"] > 0 and p["ttft_ms"] > 0
        # bytes per token from targets.fit at the mean KV length during decode (8 + 5 // 2)
        r = fit(read_model_config(tiny_model), cpu_target, "fp32", context=10, batch=p["batch"], check_support=False)
        assert p["bytes_per_token"] == r.bytes_per_token
        assert p["bandwidth_utilization"] == pytest.approx(p["decode_tokens_per_s"] * p["bytes_per_token"] / 51.2e9)
        assert p["roofline_decode_tokens_per_s"] == pytest.approx(51.2e9 / p["bytes_per_token"])
        assert p["peak_memory_bytes"] > 50 * MIB  # a process with torch loaded
        assert 0 < p["cpu_utilization"] < 3  # 1 thread: ~1 when the machine is quiet, less when it is shared
    assert rec["decode_tokens_per_s"] == rec["points"][0]["decode_tokens_per_s"]  # headline = first point
    assert rec["peak_memory_bytes"] == max(p["peak_memory_bytes"] for p in rec["points"])
    assert rec["device"]["threads"] == 1 and rec["device"]["name"]
    assert rec["device"]["scheduling"].startswith("SCHED_OTHER") and len(rec["device"]["load_average_1m"]) == 2
    assert rec["figures"]["roofline_decode_tokens_per_s"].startswith("roofline prediction")
    # the baseline: same keys, ratio is ours / plain generate, and greedy outputs agree token for token
    assert validate_record(rec["baseline"] | {"device": rec["device"]}) == []
    paired = rec["points"][0]["decode_tokens_per_s_paired"]  # ours, timed in the runs alternating with the baseline
    assert paired > 0 and rec["speedup"] == pytest.approx(paired / rec["baseline"]["decode_tokens_per_s"])
    assert [b["token_agreement"] for b in rec["baseline"]["points"]] == [1.0, 1.0]
    json.dumps(rec)  # JSON-serialisable as is (numpy arrays dropped)


def test_schema_errors_and_load_record(tiny_record, tmp_path):
    bad = {k: v for k, v in tiny_record.items() if k != "ttft_ms"}
    assert validate_record(bad) == ["missing key 'ttft_ms'"]
    no_speedup = {k: v for k, v in tiny_record.items() if k != "speedup"}
    assert validate_record(no_speedup) == ["a record with a baseline needs 'speedup'"]
    (tmp_path / "junk.json").write_text("progress line\nnot json\n")
    with pytest.raises(ConfigError, match="its last line is not JSON"):
        load_record(tmp_path / "junk.json")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="missing key 'ttft_ms'"):
        load_record(tmp_path / "bad.json")


def _scaled(rec: dict, factor: float, name: str) -> dict:
    """A copy of a record with decode rates scaled (stands in for a second artifact in compare tests)."""
    keys = ("decode_tokens_per_s", "decode_tokens_per_s_p10", "decode_tokens_per_s_p90")
    pts = [dict(p, **{k: p[k] * factor for k in keys}) for p in rec["points"]]
    out = finish_record({k: v for k, v in rec.items() if k not in ("points", "baseline", "speedup")}, pts)
    out["artifact"] = name
    return out


def test_compare_table_json_and_plot(tiny_record, tmp_path):
    from edgepack.cli import cli

    a, b = _scaled(tiny_record, 1.0, "fp32-model"), _scaled(tiny_record, 2.5, "int8-model")
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text("some progress\n" + json.dumps(b) + "\n")  # last line wins
    cols, rows = compare_rows([a, b])
    assert rows[1][cols.index("vs first")] == "2.50x"
    png = tmp_path / "cmp.png"
    res = CliRunner().invoke(cli, ["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                   "--plot", str(png), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert [r["decode_vs_first"] for r in out["records"]] == pytest.approx([1.0, 2.5])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    drawn = plot_compare([a, b], tmp_path / "again.png")
    assert drawn["decode_tokens_per_s"] == pytest.approx([a["decode_tokens_per_s"], b["decode_tokens_per_s"]])
    assert drawn["peak_memory_mib"][0] == pytest.approx(a["peak_memory_bytes"] / MIB)


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_bench_json_and_errors(tiny_model, tmp_path):
    from edgepack.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["bench", str(tiny_model), "--prompt-len", "4", "--gen-len", "3,5", "--runs", "1", "--min-seconds", "0",
                              "--warmup", "0", "--threads", "1", "--target", "cpu-x86-64", "--json",
                              "--save", str(tmp_path / "r.json"), "--plot", str(tmp_path / "points.png")])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output.strip().splitlines()[-1])
    assert validate_record(rec) == [] and [p["gen_len"] for p in rec["points"]] == [3, 5]
    assert [p["decode_steps"] for p in rec["points"]] == [2, 4]
    assert load_record(tmp_path / "r.json")["decode_tokens_per_s"] == pytest.approx(rec["decode_tokens_per_s"])
    assert (tmp_path / "points.png").read_bytes()[:4] == b"\x89PNG"
    from edgepack.bench.record import plot_points

    drawn = plot_points(rec, tmp_path / "p2.png")
    assert drawn["labels"] == ["p4/g3/b1", "p4/g5/b1"]
    assert drawn["decode_tokens_per_s"] == pytest.approx([p["decode_tokens_per_s"] for p in rec["points"]])

    res = runner.invoke(cli, ["bench", str(tiny_model), "--runtime", "torch-cpx", "--target", "cpu-x86-64"])
    assert res.exit_code == 1 and "unknown runtime 'torch-cpx' (did you mean 'torch-cpu'?)" in res.output
    res = runner.invoke(cli, ["bench", str(tiny_model), "--prompt-len", "250", "--gen-len", "10", "--target", "cpu-x86-64"])
    assert res.exit_code == 1 and "exceeds the model's max_position_embeddings (256)" in res.output
    res = runner.invoke(cli, ["bench", str(tiny_model), "--runs", "0"])
    assert res.exit_code == 1 and "runs must be >= 1" in res.output
    res = runner.invoke(cli, ["bench", str(tiny_model), "--gen-len", "1", "--baseline", "hf"])
    assert res.exit_code == 1 and "a baseline needs every gen_len >= 2" in res.output


def test_target_without_the_runtime_is_refused_before_loading(tiny_model, tmp_path):
    from edgepack.cli import cli

    toml = (tmp_path / "ort-only.toml")
    toml.write_text('name = "ort-only"\ndevice_type = "cpu"\narch = "x86-64"\nmemory_gib = 8\nusable_memory_gib = 6\n'
                    'bandwidth_gb_s = 20\nprecisions = ["fp32"]\nruntimes = ["onnxruntime"]\n[sources]\n'
                    'memory = "test"\nusable_memory = "test"\nbandwidth = "test"\n')
    res = CliRunner().invoke(cli, ["bench", str(tiny_model), "--target", str(toml)])
    assert res.exit_code == 1
    assert "target 'ort-only' does not run the 'torch-cpu' runtime" in res.output


# ----------------------------------------------------------------------------------------------------- stage
def test_bench_stage_records_metrics_and_links_files(tiny_model, tmp_path, cpu_target):
    from edgepack.artifact import open_artifact
    from edgepack.bench.stage import bench_stage
    from edgepack.stages import get_stage

    src = open_artifact(tiny_model)
    spec = get_stage("bench")
    assert spec.per_target and spec.config_class() is BenchConfig
    cfg = BenchConfig(prompt_lens=(4,), gen_lens=(4,), runs=1, warmup=0, threads=1, min_seconds=0)
    out = bench_stage(src, cfg, cpu_target, tmp_path / "benched")
    rec = out.history[-1]
    assert rec["stage"] == "bench" and rec["target"] == "cpu-x86-64"
    assert validate_record(rec["metrics"]) == [] and rec["metrics"]["points"][0]["decode_steps"] == 3
    assert os.stat(out.path / "model.safetensors").st_ino == os.stat(tiny_model / "model.safetensors").st_ino
    assert not (tiny_model / "edgepack.json").exists()  # the source is untouched
    assert load_record(out.path)["decode_tokens_per_s"] == rec["metrics"]["decode_tokens_per_s"]


def test_recipe_with_a_bench_stage_parses_lists_and_fans_out_per_target(tiny_model, tmp_path):
    from edgepack.plan import load_recipe, run_recipe

    data = {"recipe": {"model": str(tiny_model), "targets": ["cpu-x86-64", "cpu-arm64"]},
            "stages": [{"kind": "bench", "prompt_lens": [4, 8], "gen_lens": [3], "runs": 1, "warmup": 0}]}
    r = load_recipe(tmp_path / "r.toml", workdir=tmp_path / "w", data=data)
    cfg = r.steps[0].config
    assert isinstance(cfg, BenchConfig) and cfg.prompt_lens == (4, 8) and cfg.points() == [(4, 3, 1), (8, 3, 1)]
    planned = run_recipe(r, dry_run=True)
    assert [s.target for s in planned] == ["cpu-x86-64", "cpu-arm64"]  # per target: MBU depends on its bandwidth
    bad = dict(data, stages=[{"kind": "bench", "runz": 3}])
    with pytest.raises(ConfigError, match="unknown key 'runz' \\(did you mean 'runs'\\?\\)"):
        load_recipe(tmp_path / "r.toml", workdir=tmp_path / "w", data=bad)


def test_realtime_scheduling_is_restored():
    from edgepack.bench.run import scheduling

    before = os.sched_getscheduler(0)
    try:
        with scheduling(True) as how:
            assert os.sched_getscheduler(0) == os.SCHED_FIFO and how.startswith("SCHED_FIFO")
    except ConfigError as exc:
        pytest.skip(f"no permission for SCHED_FIFO here: {exc.problem}")
    assert os.sched_getscheduler(0) == before


def test_precision_and_group_size_come_from_the_lineage(tmp_path):
    from edgepack.artifact import Artifact
    from edgepack.facts import artifact_precision
    from edgepack.facts import group_size as artifact_group_size

    q = Artifact(tmp_path, {"format": "onnx", "history": [
        {"stage": "export", "config": {"opset": 18}, "metrics": {}},
        {"stage": "quantize", "config": {"bits": 4, "group_size": 32, "method": "gptq"}, "metrics": {}}]})
    assert (artifact_precision(q), artifact_group_size(q)) == ("int4", 32)
    i8 = Artifact(tmp_path, {"format": "onnx", "history": [{"stage": "quantize", "config": {"precision": "int8"}}]})
    assert (artifact_precision(i8), artifact_group_size(i8)) == ("int8", None)
    # compress.quantize records its method name ("int4-gptq", "int8", "nf4", ...) in config and metrics
    g = Artifact(tmp_path, {"format": "torch-quant", "history": [
        {"stage": "quantize", "config": {"method": "int4-gptq", "group_size": 64}, "metrics": {"method": "int4-gptq"}}]})
    assert (artifact_precision(g), artifact_group_size(g)) == ("int4", 64)
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert artifact_precision(Artifact(tmp_path, {"format": "hf", "history": []})) == "bf16"
    assert artifact_precision(Artifact(tmp_path, {"format": "onnx", "history": []})) is None  # -> weight file bytes


def test_min_seconds_adds_runs_until_enough_wall_time(tiny_model):
    """runs is a floor: a model that decodes in milliseconds keeps being measured until min_seconds passed."""
    from edgepack.artifact import open_artifact
    from edgepack.bench.measure import measure_point
    from edgepack.deploy.runtime import open_runtime

    rt = open_runtime(open_artifact(tiny_model), threads=1)
    exact = measure_point(rt, 4, 3, 1, runs=2, warmup=0, vocab=rt.model.config.vocab_size, min_seconds=0)
    more = measure_point(rt, 4, 3, 1, runs=2, warmup=0, vocab=rt.model.config.vocab_size, min_seconds=0.3)
    assert exact["runs"] == 2 and exact["decode_steps"] == 2 * 2
    assert more["runs"] > 2 and more["decode_steps"] == more["runs"] * 2


def test_baseline_table_names_its_figures_and_warns_on_a_foreign_baseline(tiny_model, tmp_path):
    """The speedup is (ours, run for run with the baseline) / baseline: the table shows exactly those two figures;
    a baseline that is not the artifact's own base (another model: few greedy tokens agree) is a warning."""
    from conftest import make_tiny_llama

    from edgepack.cli import cli

    other = make_tiny_llama(tmp_path / "other", seed=7)
    args = ["bench", str(tiny_model), "--prompt-len", "8", "--gen-len", "16", "--runs", "2", "--min-seconds", "0",
            "--warmup", "0", "--threads", "1", "--target", "cpu-x86-64", "--baseline", "hf"]
    own = CliRunner().invoke(cli, args)
    foreign = CliRunner().invoke(cli, [*args, "--baseline-model", str(other)])
    assert own.exit_code == 0 and foreign.exit_code == 0, own.output + foreign.output
    assert "ours (b) tok/s" in own.stdout and "speedup b/a" in own.stdout and "warning" not in own.stderr
    assert "warning: the baseline agrees with the artifact on only" in foreign.stderr
    js = json.loads(CliRunner().invoke(cli, [*args, "--baseline-model", str(other), "--json"]).stdout.splitlines()[-1])
    assert "not the model this artifact was made from" in js["baseline"]["warning"]
    assert js["baseline"]["speedup_is"].startswith("ours decode tok/s measured in the same seconds")


def test_bench_for_an_absent_target_says_so(tiny_model):
    from edgepack.cli import cli
    from edgepack.targets.profile import machine_arch

    other = "cpu-arm64" if machine_arch() != "arm64" else "cpu-x86-64"
    args = ["bench", str(tiny_model), "--prompt-len", "4", "--gen-len", "3", "--runs", "1", "--min-seconds", "0",
            "--warmup", "0", "--threads", "1", "--target", other]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert f"warning: target '{other}' is" in res.stderr and "measured on THIS machine" in res.stderr
    assert f"NOT {other} hardware: measured here" in res.stdout and "1 thread)" in res.stdout
    rec = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout.splitlines()[-1])
    assert rec["target_hardware"]["present"] is False and "this machine is" in rec["target_hardware"]["reason"]


def test_compare_row_of_an_unmeasured_record_is_a_dash(tiny_record):
    """A prediction record (bench stage for an absent target) has no measured decode speed: '-', not '- (---)'."""
    pred = json.loads(json.dumps(tiny_record))
    pred["decode_tokens_per_s"] = None
    for p in pred["points"]:
        p.update(decode_tokens_per_s=None, decode_tokens_per_s_p10=None, decode_tokens_per_s_p90=None)
    cols, rows = compare_rows([tiny_record, pred])
    col = cols.index("decode tok/s (p10-p90)")
    assert rows[1][col] == "-" and "(" in rows[0][col]
