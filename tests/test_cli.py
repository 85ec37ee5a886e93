"""The CLI through click's CliRunner: --json keys, tables, and one-line errors (problem + fix, exit 1, no traceback)."""

from __future__ import annotations

import json
import shutil
import time
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
    assert "Once upon a time" in first.output and "its speed is the bench figure above" in first.output
    assert "(bench: median" in first.stdout and "(quick check: one cold run" in first.stdout  # what each timed
    html = tmp_path / "demo" / "report.html"
    written = html.stat().st_mtime_ns
    t0 = time.perf_counter()
    second = run("demo", "--workdir", tmp_path / "demo")
    took = time.perf_counter() - t0
    assert second.exit_code == 0 and "as it did in the first run" in second.stdout, second.output
    assert "a re-run of 'edgepack demo' does no work" in second.stdout and "make demo" not in second.stdout
    assert html.stat().st_mtime_ns == written and "unchanged: every stage was cached" in second.stdout
    assert took < 10, took  # was 11.9 s (reports re-drawn, a runtime loaded to generate the same text again)
    again = last_json(run("demo", "--workdir", tmp_path / "demo", "--json"))
    assert {s["status"] for s in again["steps"]} == {"cached"}  # Jetson quantizes too (INT4 Q/DQ), nothing skipped
    assert {(s["kind"], s["target"]) for s in again["steps"] if s["kind"] == "bundle"} == {
        ("bundle", t) for t in ("a100-80gb", "h100-sxm", "jetson-orin-nano-8gb", "cpu-x86-64")}
    assert all(Path(p).is_file() for p in again["reports"]) and again["cpu_bundle"].endswith("bundle")


def test_progress_speaks_at_once_and_only_on_rank_zero(monkeypatch, capsys):
    """Without a terminal: a line when work starts (eval was silent for minutes), one at least every PLAIN_EVERY_S,
    and nothing from the other ranks of a torchrun (every line printed twice under --nproc_per_node 2)."""
    from edgepack import progress as pg

    monkeypatch.setattr(pg, "PLAIN_EVERY_S", 0.0)
    monkeypatch.setenv("RANK", "1")
    with pg.progress("work", total=10) as update:
        update(1)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pg.progress("work", total=10) as update:
        update(1)
    err = capsys.readouterr().err
    assert err.startswith("  work: started (0/10)") and "work: 1/10" in err


def test_library_noise_is_hidden_unless_edgepack_debug(stories):
    """transformers' FutureWarnings and bitsandbytes' failed optional-kernel load are not the user's business;
    EDGEPACK_DEBUG=1 shows them. The generate line says precision, threads and why."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "edgepack.cli", "generate", str(stories), "--prompt", "Once", "--max-new-tokens", "3",
           "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_DEBUG"}
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    loud = subprocess.run(cmd, capture_output=True, text=True, env={**env, "EDGEPACK_DEBUG": "1"}, timeout=300)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr
    assert "Warning" not in quiet.stderr and "FutureWarning" in loud.stderr
    assert quiet.stderr.strip().startswith("[torch-cpu fp32: 3 tokens") and "1 thread (as asked)" in quiet.stderr
    bnb = [sys.executable, "-c", "from edgepack.cli import quiet_libraries; quiet_libraries(); import bitsandbytes"]
    assert "Failed to load" not in subprocess.run(bnb, capture_output=True, text=True, env=env, timeout=300).stderr


def test_threads_default_to_the_idle_physical_cores(monkeypatch):
    import os

    from edgepack.deploy.runtime import choose_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0.0, 0.0))
    n, why = choose_threads(None)
    assert n == 1 and "load average 3.2 on 4 CPUs leaves 0.8 idle" in why
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert choose_threads(None)[0] >= 1 and choose_threads(3) == (3, "as asked")


def test_errors_under_json_are_json_too(tmp_path):
    r = run("inspect", tmp_path / "nope", "--json")
    assert r.exit_code == 1 and r.stderr.strip() == f"error: '{tmp_path / 'nope'}' does not exist -- check the path"
    err = json.loads(r.stdout.strip().splitlines()[-1])["error"]
    assert err["type"] == "ArtifactError" and err["hint"] == "check the path" and err["message"] in r.stderr


def test_library_messages_become_one_whole_line():
    from edgepack.hf import first_sentences

    long = "Can't load tokenizer for 'x'.\nIf you were trying to load it from 'https://huggingface.co/models', make " \
           "sure you don't have a local directory with the same name. Otherwise, make sure 'x' is the correct path " \
           "to a directory containing all relevant files for a LlamaTokenizerFast tokenizer. --"
    out = first_sentences(long, limit=200)
    assert "\n" not in out and out.endswith(".") and not out.endswith("--") and len(out) <= 200
    assert first_sentences("broken config --\n") == "broken config"


def test_bench_help_names_its_default_subcommand():
    out = run("bench", "--help").stdout
    assert "edgepack bench ARTIFACT [OPTIONS]      is short for: edgepack bench run ARTIFACT [OPTIONS]" in out


def test_model_arguments_take_a_hub_id_as_recipes_do(monkeypatch, stories, tinystories_text):
    from edgepack import sources

    fetched = []
    monkeypatch.setattr(sources, "fetch_model", lambda m: fetched.append(m) or stories)
    r = run("eval", "someorg/stories", "--text", tinystories_text, "--max-tokens", "256", "--json")
    assert r.exit_code == 0, r.output
    assert fetched == ["someorg/stories"] and json.loads(r.stdout.splitlines()[-1])["perplexity"] > 1
    assert run("eval", "./not/here", "--text", tinystories_text).exit_code == 1 and fetched == ["someorg/stories"]
