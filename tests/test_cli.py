"""The CLI through click's CliRunner: --json keys, tables, and one-line errors (problem + fix, exit 1, no traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli import cli


def run(*args, env=None):
    r = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    return r


def last_json(r) -> dict:
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def one_line_error(r, *fragments):
    assert r.exit_code == 1, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in r.output
    for f in fragments:
        assert f in err, err
    return err


def test_targets_list_and_show():
    r = run("targets", "list")
    assert r.exit_code == 0 and "jetson-orin-nano-4gb" in r.stdout and "h100-sxm" in r.stdout
    names = [t["name"] for t in last_json(run("targets", "list", "--json"))["targets"]]
    assert "cpu-arm64" in names and "local" in names
    show = last_json(run("targets", "show", "jetson-agx-orin-64gb", "--json"))
    assert show["sm"] == 87 and show["engine_build"] == "device" and "bandwidth" in show["sources"]
    assert "source: bandwidth" in run("targets", "show", "h100-sxm").stdout


LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}


def test_fit_json_keys_and_all_table(tmp_path):
    cfg = tmp_path / "llama2-7b"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps(LLAMA2_7B))
    j = last_json(run("fit", cfg, "--target", "jetson-orin-nano-8gb", "--precision", "int4", "--json"))
    for key in ("target", "fits", "required_bytes", "usable_bytes", "decode_tokens_per_s_limit"):
        assert key in j
    assert j["fits"] is True and j["target"] == "jetson-orin-nano-8gb"
    table = run("fit", cfg, "--target", "all", "--context", "4096")
    assert table.exit_code == 0 and "n/a" in table.stdout and "roofline" in table.stdout
    allj = last_json(run("fit", cfg / "config.json", "--target", "all", "--json"))
    assert len(allj["results"]) > 40 and allj["params"] == 6_738_415_616


def test_eval_convert_inspect(tmp_path, stories, embedded_text):
    j = last_json(run("eval", stories, "--text", embedded_text, "--max-tokens", "2000", "--json"))
    assert set(j) >= {"perplexity", "tokens", "protocol"} and j["tokens"] == 2000
    assert 2 < j["perplexity"] < 8 and j["protocol"]["name"] == "edgepack-ppl-v1"
    out = tmp_path / "fp16"
    c = last_json(run("convert", stories, "-o", out, "--dtype", "float16", "--json"))
    assert c["metrics"]["sqnr_db"] > 40 and c["metrics"]["argmax_agreement"] > 0.95
    assert c["metrics"]["bytes"] < 0.55 * (stories / "model.safetensors").stat().st_size
    i = last_json(run("inspect", out, "--verify", "--json"))
    assert i["format"] == "hf" and i["history"][0]["stage"] == "convert" and "model.safetensors" in i["files"]
    assert i["verified"] is True
    assert "convert" in run("inspect", out).stdout
    # the cast model still evaluates (fp16 storage, fp32 compute on CPU) and barely moves
    j16 = last_json(run("eval", out, "--text", embedded_text, "--max-tokens", "2000", "--json"))
    assert abs(j16["perplexity"] / j["perplexity"] - 1) < 0.01
    one_line_error(run("convert", stories, "-o", out), "already exists", "--force")


def test_user_mistakes_are_one_line(tmp_path, tiny_model):
    one_line_error(run("eval", tmp_path / "nope", "--text", "x.txt"), "does not exist")
    one_line_error(run("inspect", tmp_path), "not a model directory")
    one_line_error(run("fit", tiny_model, "--target", "h100-sxn"), "unknown target 'h100-sxn'", "did you mean 'h100-sxm'")
    one_line_error(run("fit", tiny_model, "--target", "a100-40gb", "--precision", "fp8"),
                   "does not run fp8", "it supports: fp32, fp16")
    bad = tmp_path / "badcfg"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text("{not json")
    one_line_error(run("fit", bad, "--target", "cpu-x86-64"), "malformed JSON")
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_model, trunc)
    st = trunc / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    one_line_error(run("eval", trunc, "--text", "x.txt"), "corrupt or truncated")
    one_line_error(run("eval", tiny_model, "--text", tmp_path / "missing.txt"), "does not exist")
    recipe = tmp_path / "r.toml"
    recipe.write_text("[recipe\nmodel=1")
    one_line_error(run("run", recipe), "not valid TOML")
    recipe.write_text(f'[recipe]\nmodel = "{tiny_model}"\nmodle = 1\n[[stages]]\nkind = "convert"\n')
    one_line_error(run("run", recipe), "unknown key 'modle'", "did you mean 'model'")


def test_debug_env_shows_traceback(tmp_path):
    from edgepack.errors import ArtifactError

    r = run("inspect", tmp_path / "nope", env={"EDGEPACK_DEBUG": "1"})
    assert r.exit_code == 1 and isinstance(r.exception, ArtifactError)


def test_run_dry_run_and_json(tmp_path, tiny_model):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[recipe]\nname = "x"\nmodel = "{tiny_model}"\nworkdir = "wd"\n[[stages]]\nkind = "convert"\n')
    dry = run("run", recipe, "--dry-run")
    assert dry.exit_code == 0 and "planned" in dry.stdout and "dry run" in dry.stdout
    j = last_json(run("run", recipe, "--json"))
    assert j["steps"][0]["status"] == "ran"
    assert last_json(run("run", recipe, "--json"))["steps"][0]["status"] == "cached"


@pytest.mark.slow
def test_demo_runs_offline_then_does_no_work(tmp_path):
    first = run("demo", "--workdir", tmp_path / "demo")
    assert first.exit_code == 0, first.output
    assert "stories260K" in first.stdout and "ppl" in first.stdout and "PREDICTED" in first.stdout
    assert "Once upon a time" in first.output and "onnxruntime int4" in first.output  # text from the CPU bundle
    again = last_json(run("demo", "--workdir", tmp_path / "demo", "--json"))
    assert {s["status"] for s in again["steps"]} == {"cached"}  # Jetson quantizes too (INT4 Q/DQ), nothing skipped
    assert {(s["kind"], s["target"]) for s in again["steps"] if s["kind"] == "bundle"} == {
        ("bundle", t) for t in ("a100-80gb", "h100-sxm", "jetson-orin-nano-8gb", "cpu-x86-64")}
    assert all(Path(p).is_file() for p in again["reports"]) and again["cpu_bundle"].endswith("bundle")
