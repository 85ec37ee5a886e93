"""`edgepack report` over a real multi-target recipe run (stories260K; cpu-x86-64 measured here, h100-sxm predicted):
report numbers equal the manifests, HTML / Markdown / plots written, measured vs predicted labels; the bench stage
predicts where the hardware is absent; example recipes parse without downloading; a second run does no work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepack.bench.recipe_report import build_report, common_note, summary_rows
from edgepack.plan import load_recipe, run_recipe
from edgepack.sources import embedded_path

ROOT = Path(__file__).resolve().parents[1]


def _h100_here() -> bool:
    from edgepack.bench.stage import hardware_present
    from edgepack.targets import load_target

    return hardware_present(load_target("h100-sxm"))[0]


H100_HERE = _h100_here()
RECIPE = """[recipe]
name = "rep"
model = "{model}"
targets = ["cpu-x86-64", "h100-sxm"]
workdir = "wd"
eval_text = "embedded:tinystories-sample.txt"
eval_max_tokens = 512

[[stages]]
kind = "eval"
text = "embedded:tinystories-sample.txt"
max_tokens = 512

[[stages]]
kind = "prune"
method = "depth"
sparsity = 0.2
calib = "embedded:tinystories-sample.txt"
calib_tokens = 2048
eval_max_tokens = 512

[[stages]]
kind = "quantize"
method = "auto"
calib_samples = 4
eval_max_tokens = 512
[stages.per_target.cpu-x86-64]
skip = "kept fp32 (test speed)"

[[stages]]
kind = "bench"
prompt_lens = [8]
gen_lens = [4]
runs = 1
warmup = 0

[[stages]]
kind = "bundle"
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    p = tmp / "r.toml"
    p.write_text(RECIPE.format(model=embedded_path("stories260K")))
    res = run_recipe(load_recipe(p))
    assert [(r.kind, r.target, r.status) for r in res if r.target] == [
        ("quantize", "cpu-x86-64", "skipped"), ("bench", "cpu-x86-64", "ran"), ("bundle", "cpu-x86-64", "ran"),
        ("quantize", "h100-sxm", "ran"), ("bench", "h100-sxm", "ran"), ("bundle", "h100-sxm", "ran")]
    return tmp / "wd", p


def _metrics(path) -> dict:
    return json.loads((Path(path) / "edgepack.json").read_text())["history"][-1]["metrics"]


def test_report_numbers_equal_the_manifests(run_dir):
    from edgepack.bench.recipe_report import build_report

    rep = build_report(run_dir[0])
    assert [t["name"] for t in rep["targets"]] == ["cpu-x86-64", "h100-sxm"]
    for t in rep["targets"]:
        for row in t["stages"]:
            if row["status"] == "skipped":
                assert row["note"] == "kept fp32 (test speed)"
                continue
            m = _metrics(row["path"])
            q = row.get("quality")
            if row["kind"] in ("eval", "prune", "quantize"):
                assert q["ppl_after"] == m.get("ppl_after", m.get("perplexity"))
                assert q["ppl_before"] == m.get("ppl_before")
            if row["kind"] == "bundle":
                manifest = json.loads((Path(t["bundle"]["path"]) / "bundle.json").read_text())
                assert t["bundle"]["bytes"] == m["bundle_bytes"] == sum(f["bytes"] for f in manifest["files"].values())
                assert t["bundle"]["id"] == manifest["bundle_id"] and t["fit"] == m["fit"] and m["fit"]["fits"]
            if row["kind"] == "bench":
                bench = m
        names = [q["stage"] for q in t["quality"]]
        assert names[:2] == ["1 eval", "2 prune"]
        if t["name"] == "cpu-x86-64":  # this machine is x86-64: measured
            assert bench["measured"] is True and t["speed"]["kind"] == "measured"
            assert t["speed"]["decode_tokens_per_s"] == bench["decode_tokens_per_s"] > 0
            assert t["speed"]["peak_memory_bytes"] == bench["peak_memory_bytes"] > 0
        elif H100_HERE:  # an sm_90 GPU (H100/H200) measures the H100 bundle
            assert names[-1] == "3 quantize" and t["bundle"]["precision"] == "fp8"
            assert bench["measured"] is True and t["speed"]["decode_tokens_per_s"] == bench["decode_tokens_per_s"] > 0
        else:  # no H100 here: the roofline prediction, labelled
            assert names[-1] == "3 quantize" and t["bundle"]["precision"] == "fp8"
            assert bench["measured"] is False and bench["decode_tokens_per_s"] is None
            assert t["speed"]["kind"] == "predicted"
            assert t["speed"]["decode_tokens_per_s_upper_bound"] == bench["prediction"]["decode_tokens_per_s_upper_bound"] > 0
            assert t["speed"]["predicted_peak_memory_bytes"] == bench["prediction"]["predicted_peak_memory_bytes"]


@pytest.mark.skipif(H100_HERE, reason="an sm_90 GPU is here: the H100 bench is measured, not predicted")
def test_bench_prediction_record_is_valid_and_labelled(run_dir):
    from edgepack.bench.recipe_report import build_report
    from edgepack.bench.record import validate_record

    t = build_report(run_dir[0])["targets"][1]
    bench = _metrics(next(r["path"] for r in t["stages"] if r["kind"] == "bench"))
    assert validate_record(bench) == []  # every bench key is present (null where not measured)
    p = bench["prediction"]
    assert "not measured" in p["label"] and "no CUDA device" in p["reason"] and p["fits"] is True
    assert p["precision"] == "fp8" and p["bandwidth_bytes_per_s"] == 3.35e12
    # the upper bound is bandwidth / bytes read per token, exactly
    assert p["decode_tokens_per_s_upper_bound"] == pytest.approx(p["bandwidth_bytes_per_s"] / p["bytes_per_token"])


def test_html_and_markdown_reports_with_plots_and_labels(run_dir, tmp_path):
    from edgepack.bench.recipe_report import build_report, f_ppl, f_rate, write_report

    rep = build_report(run_dir[0])
    html = write_report(run_dir[0], tmp_path / "report.html")
    text = Path(html["written"][0]).read_text()
    assert html["written"] == [str(tmp_path / "report.html")] and not list(tmp_path.glob("*.png"))
    assert text.count("data:image/png;base64,") == 2 and "<script" not in text.lower()
    md = write_report(run_dir[0], tmp_path / "report.md")
    md_text = (tmp_path / "report.md").read_text()
    pngs = sorted(Path(p).name for p in md["written"][1:])
    assert pngs == ["report-quality.png", "report-speed.png"]
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in md_text
    for body in (text, md_text):
        assert ("PREDICTED (roofline, not measured)" in body) is not H100_HERE and "measured on " in body
        for t in rep["targets"]:
            for q in t["quality"]:
                assert f_ppl(q["ppl_after"]) in body and f_ppl(q["ppl_before"]) in body
            sp = t["speed"]
            rate = sp.get("decode_tokens_per_s") or sp.get("decode_tokens_per_s_upper_bound")
            assert f_rate(rate) in body and t["bundle"]["path"] in body


def test_report_cli_json_and_errors(run_dir, tmp_path):
    from click.testing import CliRunner

    from edgepack.bench.recipe_report import build_report
    from edgepack.cli import cli

    r = CliRunner().invoke(cli, ["report", str(run_dir[0]), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["targets"] == json.loads(json.dumps(build_report(run_dir[0])["targets"]))
    bad = CliRunner().invoke(cli, ["report", str(run_dir[0]), "-o", str(tmp_path / "r.pdf")])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: report format '.pdf'")
    missing = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert missing.exit_code == 1 and "run.json" in missing.stderr and "Traceback" not in missing.output


def test_second_run_does_no_work(run_dir):
    res = run_recipe(load_recipe(run_dir[1]))
    assert {r.status for r in res} == {"cached", "skipped"}


def test_example_recipes_parse_and_plan_without_downloading(monkeypatch, tmp_path):
    import huggingface_hub

    def no_download(*a, **k):
        raise AssertionError("a recipe load or dry run must not download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    for name, hub in (("smollm2-135m", "HuggingFaceTB/SmolLM2-135M"), ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"),
                      ("llama-3.2-1b", "meta-llama/Llama-3.2-1B")):
        rec = load_recipe(ROOT / "examples" / f"{name}.toml", workdir=tmp_path / name)
        assert rec.model == hub and [t.name for t in rec.targets] == ["a100-80gb", "h100-sxm", "jetson-orin-nano-8gb",
                                                                      "cpu-x86-64"]
        assert [s.spec.kind for s in rec.steps] == ["prune", "distill", "tune", "quantize", "compile", "bench", "bundle"]
        plan = run_recipe(rec, dry_run=True)
        assert len(plan) == 3 + 4 * 4 and not (tmp_path / name).exists()
        skipped = {(r.kind, r.target) for r in plan if r.status == "skipped"}
        assert skipped == set()  # Jetson too: its quantize stage writes the INT4 Q/DQ graph TensorRT builds
    small = load_recipe(ROOT / "examples" / "small.toml")
    assert isinstance(small.model, Path) and [s.spec.kind for s in small.steps][-4:] == ["quantize", "compile", "bench",
                                                                                         "bundle"]


def test_auto_quantize_method_and_hardware_presence_per_target():
    import platform

    from edgepack.bench.stage import hardware_present
    from edgepack.compress.quantize import QuantizeConfig, check_legal, resolve_method
    from edgepack.targets import load_target

    picks = {}
    for name in ("h100-sxm", "a100-80gb", "jetson-orin-nano-8gb", "cpu-x86-64"):
        t = load_target(name)
        cfg, why = resolve_method(QuantizeConfig(method="auto"), t)
        picks[name] = (cfg.method, check_legal(cfg, t))
        assert why.startswith(f"auto for target {name}: {cfg.method}")
    assert picks == {"h100-sxm": ("fp8", "torch"), "a100-80gb": ("int4-gptq", "torch"),
                     "jetson-orin-nano-8gb": ("int4-gptq-kd", "onnx"), "cpu-x86-64": ("int4-gptq", "onnx")}
    import torch

    if not torch.cuda.is_available():
        assert hardware_present(load_target("h100-sxm")) == (
            False, "target 'h100-sxm' is a CUDA gpu (sm_90); this machine has no CUDA device")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert hardware_present(load_target("cpu-x86-64"))[0] is x86 and hardware_present(load_target("cpu-arm64"))[0] is not x86


def test_common_text_scores_the_input_and_every_stage_on_one_protocol(run_dir):
    """Every stage's own held-out text differs (so 'ppl before' of one stage is not 'ppl after' of the one before);
    the recipe's eval_text scores the input and every output alike, the final artifact of every target included."""
    run = json.loads((run_dir[0] / "run.json").read_text())
    common = run["common_eval"]
    assert common["text"] == "tinystories-sample.txt" and common["max_tokens"] == 512
    steps = [s for s in run["steps"] if s["status"] != "skipped"]
    assert all("perplexity" in s["common"] for s in steps), [s["common"] for s in steps]
    first = steps[0]  # the eval stage scored the same text with the same protocol: the same number
    assert first["kind"] == "eval" and first["common"]["perplexity"] == pytest.approx(_metrics(first["path"])["perplexity"])
    assert common["input"]["perplexity"] == pytest.approx(first["common"]["perplexity"])
    prune = next(s for s in steps if s["kind"] == "prune")
    assert prune["common"]["perplexity"] > first["common"]["perplexity"]  # a removed layer costs on the common text too
    rep = build_report(run_dir[0])
    assert all(t["common"] and "perplexity" in t["common"] for t in rep["targets"])  # every target's final artifact
    cols, rows = summary_rows(rep)
    assert "final ppl, common text" in cols and all(r[cols.index("final ppl, common text")] != "-" for r in rows)
    assert common_note(rep).startswith("Common text: the input and every stage's output scored on tinystories-sample")
    from edgepack.bench.recipe_report import plot_quality

    drawn = plot_quality(rep, run_dir[0] / "q.png")
    assert all(len(drawn[f"{t['name']} (common text)"]) >= 2 for t in rep["targets"])  # one joined line per target
    cache = run_dir[0] / "common-eval.json"
    before = cache.read_text()
    again = run_recipe(load_recipe(run_dir[1]))
    assert cache.read_text() == before and all(r.common == s["common"] for r, s in zip(
        [r for r in again if r.status != "skipped"], steps))


def test_roofline_bounds_are_drawn_and_written_as_bounds(run_dir, tmp_path):
    """A bandwidth bound (stories260K on an H100: millions of tokens/s) is never a bar beside a measured speed."""
    from edgepack.bench.recipe_report import plot_speed

    rep = build_report(run_dir[0])
    drawn = plot_speed(rep, tmp_path / "s.png")
    assert [d for d, k in zip(drawn["speed_drawn_as"], drawn["kinds"]) if k == "measured"] == ["bar"]
    if not H100_HERE:
        assert "upper-bound cap" in drawn["speed_drawn_as"]
        cols, rows = summary_rows(rep)
        cell = next(r for r in rows if r[0] == "h100-sxm")[cols.index("decode tok/s")]
        assert cell.startswith("<= ") and "bandwidth bound only" in cell
