"""Stage `tune`: NF4 QLoRA really quantizes, learns, merges into a full-precision base exactly, resumes exactly,
stops early, and refuses what it should. Small data (Shakespeare paragraphs), short sequences, 1 CPU thread."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import ROOT, SHARED, make_tiny_llama

from edgepack.artifact import open_artifact
from edgepack.config import build_config
from edgepack.errors import ConfigError

pytest.importorskip("peft", reason="needs peft (pip install 'edgepack[tune]')")
pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'edgepack[tune]')")
pytest.importorskip("accelerate", reason="needs accelerate (pip install 'edgepack[tune]')")

from edgepack.tune.qlora import TuneConfig, lr_at, tune  # noqa: E402

SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
FAST = dict(seq_len=64, batch_size=4, eval_blocks=8, threads=1, warmup_steps=2)


@pytest.fixture(scope="module")
def shakespeare_small(tmp_path_factory):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found")
    p = tmp_path_factory.mktemp("data") / "shakespeare-head.txt"
    p.write_text("\n".join(SHAKESPEARE.read_text().splitlines()[:900]) + "\n")  # ~190 paragraphs
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_artifact(make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", seed=1))


def _cfg(data, **kw):
    return TuneConfig(data=str(data), **{**FAST, **kw})


def test_lr_schedule_and_config_errors():
    cfg = TuneConfig(data="x", steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1 / 10) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="unknown key 'rnak' \\(did you mean 'rank'\\?\\)"):
        build_config(TuneConfig, {"data": "x", "rnak": 8}, "tune")
    with pytest.raises(ConfigError, match="dropout must be in"):
        build_config(TuneConfig, {"data": "x", "dropout": 1.5}, "tune")


def test_qlora_on_stories260k_learns_and_merges_exactly(stories, shakespeare_small, tmp_path):
    import torch
    from safetensors import safe_open

    from edgepack.hf import load_model, load_tokenizer
    from edgepack.tune.data import load_or_prepare, tokenize_splits
    from edgepack.tune.trainer import masked_perplexity

    src = open_artifact(stories)
    art = tune(src, _cfg(shakespeare_small, steps=24, lr=5e-3, eval_every=8, patience=0), None, tmp_path / "out")
    m = art.history[-1]["metrics"]
    assert m["layers_4bit"] == 35  # 5 layers x (q, k, v, o, gate, up, down): every linear but the tied lm_head
    assert m["trainable_params"] == 92_480  # r=16 on all 35 linears
    assert m["ppl_start"] > m["ppl_before"] * 1.02  # the NF4 base is measurably worse than the fp32 base
    assert m["ppl_adapter"] < 0.6 * m["ppl_start"] and m["test_ppl_adapter"] < 0.6 * m["test_ppl_before"]
    assert m["merge_rel_diff"] < 1e-3 and m["ppl_after"] == pytest.approx(m["ppl_adapter"], rel=1e-3)
    assert [c["step"] for c in m["curve"]] == [0, 8, 16, 24] and m["steps"] == 24
    # The merged artifact, reloaded from disk by the next stage's loader, scores what the manifest says.
    assert art.format == "hf" and (art.path / "adapter" / "adapter_model.safetensors").is_file()
    assert any((art.path / "logs").glob("events.out.tfevents.*"))
    assert not (tmp_path / "out.checkpoints").exists()
    with safe_open(str(art.path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    assert not any("quant" in k or "absmax" in k or "lora" in k for k in keys)
    prep = load_or_prepare(shakespeare_small)
    blocks, _ = tokenize_splits(prep, load_tokenizer(art.path), 64)
    merged = load_model(art, device="cpu")
    ppl = masked_perplexity(merged, *blocks["validation"], 4, 8)
    assert ppl == pytest.approx(m["ppl_adapter"], rel=0.01)


def test_merge_math_dequantized_and_original(tiny, tmp_path):
    """merged W == dequant(NF4 W) + alpha/r * B A (default), or original W + alpha/r * B A; never the 4-bit base."""
    import bitsandbytes.functional as F
    import torch

    from edgepack.tune.qlora import _merge, add_lora, load_base

    cfg = TuneConfig(data="x", rank=4, alpha=8.0, dropout=0.0)
    torch.manual_seed(0)
    model = add_lora(load_base(tiny.path, cfg, "cpu", torch.float32), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B starts at zero; make the adapter do something
    model.save_pretrained(tmp_path / "adapter")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    ba = (q.lora_B["default"].weight @ q.lora_A["default"].weight).detach() * 2.0
    deq = F.dequantize_4bit(q.base_layer.weight.data, q.base_layer.weight.quant_state).float()
    orig = open_artifact(tiny.path)
    from safetensors.torch import load_file

    w0 = load_file(str(orig.path / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert (deq - w0).abs().max() > 1e-3  # NF4 changed the weights
    a = _merge(tiny, model, tmp_path / "adapter", cfg)
    b = _merge(tiny, model, tmp_path / "adapter", TuneConfig(data="x", rank=4, alpha=8.0, merge_into="original"))
    torch.testing.assert_close(a.model.layers[0].self_attn.q_proj.weight, deq + ba, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.model.layers[0].self_attn.q_proj.weight, w0 + ba, atol=1e-6, rtol=0)
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, a(input_ids=ids).logits
    assert (ref - got).abs().max() < 1e-4 * ref.abs().max()


def test_resume_reproduces_the_uninterrupted_run(tiny, shakespeare_small, tmp_path):
    import torch
    from safetensors.torch import load_file

    cfg = _cfg(shakespeare_small, steps=8, save_every=4, eval_every=4, patience=0, lr=3e-3, dropout=0.1, merge=False)
    ref = tune(tiny, cfg, None, tmp_path / "ref")

    def crash(step, total, info):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(tiny, cfg, None, tmp_path / "run", on_step=crash)
    assert not (tmp_path / "run").exists() and (tmp_path / "run.checkpoints" / "latest" / "state.json").is_file()
    with pytest.raises(ConfigError, match="pass --resume to continue them"):
        tune(tiny, cfg, None, tmp_path / "run", resume=False)
    with pytest.raises(ConfigError, match="different base, data or config"):
        tune(tiny, TuneConfig(**{**cfg.__dict__, "lr": 1e-3}), None, tmp_path / "run")
    fresh = tune(tiny, cfg, None, tmp_path / "other", resume=True)  # killed before any checkpoint: starts at 0
    assert fresh.history[-1]["metrics"]["steps"] == 8 and not fresh.history[-1]["metrics"]["resumed_from"]
    art = tune(tiny, cfg, None, tmp_path / "run", resume=True)
    m, mr = art.history[-1]["metrics"], ref.history[-1]["metrics"]
    assert art.format == "lora-adapter" and m["resumed_from"] == 4 and m["steps"] == 8
    assert [c["val_ppl"] for c in m["curve"]] == [c["val_ppl"] for c in mr["curve"]]
    a = load_file(str(art.path / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ref.path / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert max(float(b[k].abs().max()) for k in b if "lora_B" in k) > 1e-3  # it did train


def test_grad_accum_and_checkpointing_compute_the_same_update(tiny, shakespeare_small, tmp_path):
    """2 micro-batches of 2 == 1 batch of 4 (the loss is normalised over the whole step); gradient checkpointing
    recomputes activations without changing the gradients."""
    import torch
    from safetensors.torch import load_file

    base = dict(steps=3, eval_every=3, patience=0, dropout=0.0, merge=False, lr=3e-3)
    runs = {"b4": _cfg(shakespeare_small, **base),
            "b2x2": _cfg(shakespeare_small, **{**base, "batch_size": 2, "grad_accum": 2}),
            "ckpt": _cfg(shakespeare_small, **{**base, "gradient_checkpointing": True})}
    w = {}
    for name, cfg in runs.items():
        art = tune(tiny, cfg, None, tmp_path / name)
        w[name] = load_file(str(art.path / "adapter" / "adapter_model.safetensors"))
    for other in ("b2x2", "ckpt"):
        assert all(torch.allclose(w["b4"][k], w[other][k], atol=1e-5) for k in w["b4"]), other
    assert max(float(v.abs().max()) for k, v in w["b4"].items() if "lora_B" in k) > 1e-3


def test_early_stopping_keeps_the_best_adapter(stories, shakespeare_small, tmp_path):
    # lr 1.0 wrecks the pretrained model: validation perplexity rises, training stops, the step-0 adapter comes back
    cfg = _cfg(shakespeare_small, method="lora", steps=12, eval_every=2, patience=2, lr=1.0, warmup_steps=0,
               max_grad_norm=100.0)
    m = tune(open_artifact(stories), cfg, None, tmp_path / "o").history[-1]["metrics"]
    assert m["stopped"] == "early_stop" and m["steps"] < 12
    best = min(c["val_ppl"] for c in m["curve"])
    assert m["ppl_adapter"] == pytest.approx(best, rel=1e-3)
    assert m["layers_4bit"] == 0 and m["merge_rel_diff"] < 1e-4  # plain LoRA: fp32 base, exact merge


def test_cli_json_and_errors(tiny, shakespeare_small, tmp_path):
    from edgepack.cli import cli

    out = tmp_path / "cli"
    args = ["tune", "qlora", str(tiny.path), "--data", str(shakespeare_small), "-o", str(out), "--steps", "4",
            "--seq-len", "64", "--batch-size", "4", "--eval-every", "2", "--eval-blocks", "4", "--threads", "1",
            "--rank", "4", "--target-modules", "q_proj,v_proj"]
    res = CliRunner().invoke(cli, args + ["--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.output.strip().splitlines()[-1])["metrics"]
    assert m["layers_4bit"] == 2 * 7 and m["trainable_params"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))  # q, v only
    assert m["steps"] == 4 and m["merge_rel_diff"] < 1e-3
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "already exists and is not empty" in res.output
    res = CliRunner().invoke(cli, args[:6] + [str(tmp_path / "x"), "--dropout", "2"])
    assert res.exit_code == 1 and "dropout must be in [0, 1)" in res.output


@pytest.mark.slow
def test_same_command_runs_data_parallel_under_torchrun(tiny, shakespeare_small, tmp_path):
    """Two CPU processes (gloo DDP), as `accelerate launch` would start them: each trains on its own shard and the
    gradients are averaged, so both ranks end with the same adapter; only rank 0 writes and reports."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "edgepack.cli", "tune", "qlora",
           str(tiny.path), "--data", str(shakespeare_small), "-o", str(tmp_path / "ddp"), "--steps", "4", "--seq-len",
           "64", "--batch-size", "4", "--eval-every", "2", "--eval-blocks", "4", "--threads", "1", "--json"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1  # rank 0 only
    m = json.loads(lines[0])["metrics"]
    assert m["processes"] == 2 and m["trained_tokens"] == 2 * 4 * 4 * 64 and m["merge_rel_diff"] < 1e-3


def test_cli_module_is_torch_free():
    code = "import sys, edgepack.cli.tune, edgepack.tune.data; print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def stories_small(tmp_path_factory):
    ts = SHARED / "data" / "tinystories-valid-sample.txt"
    if not ts.is_file():
        pytest.skip(f"{ts} not found")
    p = tmp_path_factory.mktemp("data") / "tinystories-head.txt"
    p.write_text("\n".join(ts.read_text().splitlines()[:300]) + "\n")
    return p


def test_freeze_layers_change_which_parameters_train(tiny, shakespeare_small, tmp_path):
    import torch
    from safetensors.torch import load_file

    base = dict(steps=3, eval_every=3, patience=0, dropout=0.0, lr=1e-2, warmup_steps=0)
    lora_all = tune(tiny, _cfg(shakespeare_small, method="lora", merge=False, **base), None, tmp_path / "a")
    lora = tune(tiny, _cfg(shakespeare_small, method="lora", merge=False, freeze_layers=("first:1",), **base), None,
                tmp_path / "l")
    keys = load_file(str(lora.path / "adapter" / "adapter_model.safetensors")).keys()
    assert keys and all(".layers.1." in k for k in keys)  # no adapter on the frozen layer 0
    m = lora.history[-1]["metrics"]
    assert m["frozen"] == {"layers": [0], "other": []}
    assert 2 * m["trainable_params"] == lora_all.history[-1]["metrics"]["trainable_params"]

    full = tune(tiny, _cfg(shakespeare_small, method="full", freeze_layers=(0, "embeddings"), **base), None,
                tmp_path / "f")
    m = full.history[-1]["metrics"]
    assert full.format == "hf" and not (full.path / "adapter").exists()
    before = load_file(str(tiny.path / "model.safetensors"))
    after = load_file(str(full.path / "model.safetensors"))
    frozen = {k for k in before if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert frozen and not (changed & frozen) and changed == set(before) - frozen  # everything else trained
    assert m["trainable_params"] == sum(v.numel() for k, v in before.items() if k not in frozen)
    assert m["frozen"] == {"layers": [0], "other": ["embeddings"]} and m["layers_4bit"] == 0
    assert m["ppl_after"] < m["ppl_before"]  # random weights: anything trained helps

    with pytest.raises(ConfigError, match="freezes all 2 decoder layers"):
        tune(tiny, _cfg(shakespeare_small, method="lora", freeze_layers=("last:5",), **base), None, tmp_path / "x")
    for bad, msg in (({"freeze_layers": ["top:2"]}, "is not a layer index"),
                     ({"freeze_layers": ["embeddings"], "method": "lora"}, "applies to method full"),
                     ({"freeze_layers": [1.5]}, "freeze_layers")):
        with pytest.raises(ConfigError, match=msg):
            build_config(TuneConfig, {"data": "x", **bad}, "tune")


def test_mixed_data_records_each_source_before_and_after(tiny, shakespeare_small, stories_small, tmp_path):
    import math

    cfg = TuneConfig(data=(f"{shakespeare_small}:0.7", f"{stories_small}:0.3"), steps=2, eval_every=2, patience=0,
                     **FAST)
    m = tune(tiny, cfg, None, tmp_path / "o").history[-1]["metrics"]
    per = m["ppl_by_source"]
    assert list(per) == ["shakespeare-head", "tinystories-head"] and per["shakespeare-head"]["share"] == 0.7
    for p in per.values():
        assert set(p) == {"share", "before", "adapter", "after"} and p["before"]["test"] > 0
    mixed = math.exp(sum(p["share"] * math.log(p["before"]["validation"]) for p in per.values()))
    assert m["ppl_before"] == pytest.approx(mixed, rel=1e-3)  # validation of a mix: share-weighted log perplexity
    shares = {s["name"]: s["drawn"]["share"] for s in m["data"]["mix"]["sources"]}
    assert shares["shakespeare-head"] == pytest.approx(0.7, abs=0.03) and m["data"]["mix"]["unit"] == "tokens"
    assert set(m["data"]["tokens"]["train"]["by_source"]) == set(per)


def test_a_recipe_tunes_twice_general_then_domain(tiny, shakespeare_small, stories_small, tmp_path):
    from edgepack.plan import load_recipe, run_recipe

    step = "\n".join(f"{k} = {v}" for k, v in {"steps": 2, "seq_len": 64, "batch_size": 4, "eval_every": 2,
                                               "eval_blocks": 4, "threads": 1, "patience": 0}.items())
    (tmp_path / "r.toml").write_text(f"""[recipe]
name = "two"
model = "{tiny.path}"
workdir = "wd"
[[stages]]
kind = "tune"
data = "{stories_small}"
method = "lora"
{step}
[[stages]]
kind = "tune"
data = ["{shakespeare_small}:0.7", "{stories_small}:0.3"]
{step}
""")
    res = run_recipe(load_recipe(tmp_path / "r.toml"))
    assert [(r.kind, r.status) for r in res] == [("tune", "ran"), ("tune", "ran")]
    first, second = open_artifact(res[0].path), open_artifact(res[1].path)
    assert [h["stage"] for h in second.history] == ["tune", "tune"]
    assert second.history[-1]["parent"] == first.digest() and second.history[-1]["config"]["method"] == "qlora"
    assert "ppl_by_source" in res[1].metrics and "ppl_by_source" not in res[0].metrics
    again = run_recipe(load_recipe(tmp_path / "r.toml"))
    assert [r.status for r in again] == ["cached", "cached"]
