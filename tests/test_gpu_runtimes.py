"""GPU runtimes (issue 10): compile for CUDA targets, the static-cache torch-cuda runtime (checked on CPU without
graph capture, and on CUDA with it), the TensorRT build spec / trtexec line / engine cache, and `device prepare`.
Tests marked `gpu` / `tensorrt` skip where there is no CUDA GPU / no tensorrt module."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from edgepack.artifact import open_artifact
from edgepack.deploy import gpu_compile, trt_spec
from edgepack.deploy.compile import CompileConfig, choose_path, compile_stage
from edgepack.errors import ArtifactError, ConfigError, MissingDependency, UnsupportedOnTarget
from edgepack.targets import load_target

H100, A100, ORIN = load_target("h100-sxm"), load_target("a100-80gb"), load_target("jetson-orin-nano-8gb")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
PROMPT = np.array([[1, 403, 407, 261, 316, 289]])  # stories260K ids ("Once upon a time" style, vocab 512)


def _fake_extra(layers=2, kv=2, hd=16):
    from edgepack.deploy.onnx_export import io_names

    ins, outs = io_names(layers)
    return {"inputs": ins, "outputs": outs, "num_layers": layers, "num_kv_heads": kv, "head_dim": hd,
            "vocab_size": 512, "onnx_file": "model.onnx", "dtype": "float16"}


# ------------------------------------------------------------------------------------------- compile choice
def test_gpu_runtime_choice_per_target(monkeypatch):
    monkeypatch.setattr(gpu_compile, "tensorrt_importable", lambda: False)
    monkeypatch.setattr(gpu_compile, "local_cuda_sm", lambda: None)
    p = choose_path(CompileConfig(), H100)
    assert (p["runtime"], p["precision"], p["device"]) == ("torch-cuda", "bf16", "cuda")
    assert "tensorrt is not installed" in p["note"]
    assert choose_path(CompileConfig(), A100)["runtime"] == "torch-cuda"
    j = choose_path(CompileConfig(), ORIN)
    assert (j["runtime"], j["precision"], j["engine_build"]) == ("tensorrt", "fp16", "device")
    # tensorrt on the host only with the module AND a GPU of the target's SM to build on
    monkeypatch.setattr(gpu_compile, "tensorrt_importable", lambda: True)
    monkeypatch.setattr(gpu_compile, "local_cuda_sm", lambda: 80)
    p = choose_path(CompileConfig(), H100)
    assert p["runtime"] == "torch-cuda" and "no sm_90 GPU here" in p["note"]
    monkeypatch.setattr(gpu_compile, "local_cuda_sm", lambda: 90)
    assert choose_path(CompileConfig(), H100)["runtime"] == "tensorrt"
    assert choose_path(CompileConfig(runtime="torch-cuda", precision="int4"), H100)["precision"] == "int4"


def test_illegal_gpu_precisions_fail_before_any_weights_load(stories, monkeypatch, tmp_path):
    import edgepack.hf

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the precision check")

    monkeypatch.setattr(edgepack.hf, "load_model", boom)
    with pytest.raises(UnsupportedOnTarget, match="fp8 is not legal for torch-cuda on target 'a100-80gb'") as e:
        compile_stage(open_artifact(stories), CompileConfig(precision="fp8"), A100, tmp_path / "a")
    assert "bf16, fp16, fp32, int8, int4" in e.value.hint and "fp8" not in e.value.hint
    with pytest.raises(UnsupportedOnTarget, match="fp8 is not legal for tensorrt on target 'jetson-orin-nano-8gb'"):
        compile_stage(open_artifact(stories), CompileConfig(precision="fp8"), ORIN, tmp_path / "o")
    assert choose_path(CompileConfig(precision="fp8"), H100)["precision"] == "fp8"  # sm_90 runs it
    assert not (tmp_path / "a").exists() and not (tmp_path / "o").exists()


def test_h100_compile_writes_a_torch_cuda_artifact_on_cpu(stories, tmp_path, monkeypatch):
    import torch
    from safetensors import safe_open

    monkeypatch.setattr(gpu_compile, "tensorrt_importable", lambda: False)
    art = compile_stage(open_artifact(stories), CompileConfig(precision="int8", max_context=256), H100, tmp_path / "h")
    ex, m = art.extra, art.history[-1]["metrics"]
    assert art.format == "hf" and (ex["runtime"], ex["precision"], ex["device"], ex["target"]) == (
        "torch-cuda", "int8", "cuda", "h100-sxm")
    assert ex["dtype"] == "bfloat16" and ex["max_context"] == 256 and "sm" not in ex  # not an engine
    with safe_open(str(art.path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((art.path / "torch_cuda.json").read_text())["precision"] == "int8"
    if not torch.cuda.is_available():
        assert m["measured_on"] is None and "no speed measured" in m["speed_note"]
        assert "decode_tokens_per_s" not in m
    # the same static-cache runtime opens it on CPU (int8 weight-only via torchao's CPU kernel) and decodes
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.runtime import open_runtime

    rt = open_runtime(art, "torch-cuda", device="cpu")
    assert rt.describe()["kernel"] == "torchao int8 weight-only" and rt.max_context == 256
    res = generate(rt, PROMPT, GenerationConfig(max_new_tokens=8))
    assert res.tokens.shape == (1, 8) and (res.tokens < 512).all()


def test_quantized_torch_artifact_compiles_for_gpu_targets_keeping_its_grid(stories, tmp_path, monkeypatch):
    """`quantize --format torch` (calibrated codes) -> compile for h100: torch-cuda at the source's own precision,
    16-bit weights that are exactly the stored grid; a precision the source is not, or one the target lacks, is
    refused before any weights load."""
    import torch
    from safetensors import safe_open

    from edgepack.compress.quant_torch import load_quantized
    from edgepack.compress.quantize import QuantizeConfig, quantize

    monkeypatch.setattr(gpu_compile, "tensorrt_importable", lambda: False)
    q = quantize(open_artifact(stories), QuantizeConfig(method="int8", format="torch", eval_max_tokens=2048), H100,
                 tmp_path / "q")
    art = compile_stage(q, CompileConfig(max_context=128), H100, tmp_path / "h")
    ex = art.extra
    assert (ex["runtime"], ex["precision"], ex["quantized_from"]) == ("torch-cuda", "int8", "int8 codes from q")
    ref, _ = load_quantized(q.path, "cpu")
    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(str(art.path / "model.safetensors"), "pt") as f:
        got = f.get_tensor(name)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref.state_dict()[name].to(torch.bfloat16))  # the dequantized grid, cast once
    with pytest.raises(ConfigError, match="already quantized with int8; compile cannot make it int4"):
        compile_stage(q, CompileConfig(precision="int4"), H100, tmp_path / "x")
    with pytest.raises(ConfigError, match="compiles for CUDA targets"):
        compile_stage(q, CompileConfig(), load_target("cpu-x86-64"), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------- static cache on CPU
def test_static_cache_greedy_tokens_equal_eager_transformers(stories):
    import torch

    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.torch_cuda import TorchCudaRuntime
    from edgepack.hf import load_model

    model = load_model(open_artifact(stories), device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        ref = model.generate(torch.tensor(PROMPT), max_new_tokens=48, min_new_tokens=48, do_sample=False,
                             pad_token_id=0)[:, PROMPT.shape[1]:].numpy()
    assert len(set(ref[0].tolist())) > 5  # a real continuation, not one token repeated
    rt = TorchCudaRuntime(model, max_context=128, use_cuda_graph=False)
    got = generate(rt, PROMPT, GenerationConfig(max_new_tokens=48)).tokens  # device-side sampling path
    assert got.tolist() == ref.tolist()
    # the numpy Runtime protocol path gives the same tokens, and logits close to eager's
    toks, logits = [], rt.prefill(PROMPT)
    for _ in range(12):
        toks.append(int(logits.argmax(-1)[0]))
        logits = rt.decode_step(np.array([toks[-1]]))
    assert toks == ref[0, :12].tolist()
    eager = model(torch.tensor([PROMPT[0].tolist() + toks])).logits[0, -1].detach().numpy()
    assert np.abs(eager - logits[0]).max() < 1e-4
    # sampling is reproducible by seed and differs from greedy
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a, b = generate(rt, PROMPT, cfg).tokens, generate(rt, PROMPT, cfg).tokens
    assert a.tolist() == b.tolist() and a.tolist() != ref[:, :16].tolist()


def test_static_cache_is_what_fit_predicts_and_refuses_overflow(stories):
    import torch

    from edgepack.deploy.torch_cuda import TorchCudaRuntime
    from edgepack.facts import read_model_config
    from edgepack.hf import load_model
    from edgepack.targets.fit import fit

    model = load_model(open_artifact(stories), device="cpu", dtype=torch.bfloat16)
    rt = TorchCudaRuntime(model, max_context=64, use_cuda_graph=False)
    rt.prefill(PROMPT)
    predicted = fit(read_model_config(stories), H100, precision="bf16", context=64).kv_cache_bytes
    assert rt.kv_cache_bytes() == predicted == 2 * 5 * 4 * 8 * 64 * 2  # K+V x layers x kv heads x head_dim x ctx x 2 B
    with pytest.raises(ConfigError, match="exceeds the static cache"):
        rt.prefill(np.ones((1, 65), dtype=np.int64))
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        TorchCudaRuntime(model, max_context=8, use_cuda_graph=True)


# ------------------------------------------------------------------------------------------- TensorRT spec
def test_build_spec_profiles_workspace_and_trtexec_line(tmp_path):
    spec = trt_spec.build_spec(_fake_extra(), ORIN, "fp16", onnx_sha256="ab" * 32, engine_bytes=300 * 2**20,
                               max_context=512)
    pre, dec = spec["profiles"]
    assert pre["shapes"]["past_key_values.1.value"] == {"min": [1, 2, 0, 16], "opt": [1, 2, 0, 16],
                                                        "max": [1, 2, 0, 16]}
    assert dec["shapes"]["past_key_values.0.key"]["max"] == [1, 2, 511, 16]
    assert dec["shapes"]["input_ids"]["max"] == [1, 1] and pre["shapes"]["input_ids"]["max"] == [1, 512]
    expect = min(trt_spec.WORKSPACE_CAP, (ORIN.usable_memory_bytes - 300 * 2**20) // 4) // 2**20 * 2**20
    assert spec["workspace_bytes"] == expect and spec["flags"] == ["FP16"]
    line = trt_spec.trtexec_command(spec, tmp_path / "model.onnx", tmp_path / "e.engine", tmp_path / "t.cache")
    assert line.startswith(f"trtexec --onnx={tmp_path}/model.onnx --saveEngine={tmp_path}/e.engine ")
    assert line.count("--minShapes=") == 2 and line.count("--maxShapes=") == 2
    assert "past_key_values.0.key:1x2x511x16" in line and "input_ids:1x512" in line
    assert f"--memPoolSize=workspace:{expect // 2**20}M" in line and " --fp16" in line
    assert line.endswith(f"--timingCacheFile={tmp_path}/t.cache")
    bf = trt_spec.build_spec(_fake_extra(), ORIN, "bf16", onnx_sha256="0" * 64, engine_bytes=1, max_context=64)
    assert "--bf16" in trt_spec.trtexec_command(bf, "m.onnx", "e")
    with pytest.raises(ConfigError, match="not int8"):
        trt_spec.build_spec(_fake_extra(), ORIN, "int8", onnx_sha256="0" * 64, engine_bytes=1, max_context=64)


def test_engine_cache_key_and_mismatch_refusal(tmp_path):
    from edgepack.deploy.tensorrt_build import engine_paths, find_engine

    digest = "c0ffee" * 10 + "abcd"
    key = trt_spec.engine_key("10.3.0", 87, digest)
    assert key == f"trt10.3.0-sm87-{digest[:16]}"
    engine, meta = engine_paths(tmp_path, key)
    engine.write_bytes(b"\x00" * 100)
    meta.write_text(json.dumps({"trt_version": "10.3.0", "sm": 87, "onnx_sha256": digest, "engine_bytes": 100}))
    assert find_engine(tmp_path, digest, "10.3.0", 87) == engine
    with pytest.raises(UnsupportedOnTarget, match=r"TensorRT 10\.3\.0 for sm_87; this machine has TensorRT 10\.7\.0"):
        find_engine(tmp_path, digest, "10.7.0", 87)
    with pytest.raises(UnsupportedOnTarget, match="an sm_90 GPU") as e:
        find_engine(tmp_path, digest, "10.3.0", 90)
    assert "edgepack device prepare" in e.value.hint
    assert find_engine(tmp_path, "f" * 64, "10.3.0", 87) is None  # another graph: nothing cached, no refusal
    engine.write_bytes(b"\x00" * 50)  # truncated
    with pytest.raises(ArtifactError, match="partial write"):
        find_engine(tmp_path, digest, "10.3.0", 87)


def test_build_refuses_to_start_without_memory_and_watch_samples():
    import time

    from edgepack.deploy.tensorrt_build import MemWatch, check_memory, mem_available_bytes

    spec = {"workspace_bytes": 1024 * 2**20, "engine_estimate_bytes": 512 * 2**20}
    text = "MemTotal:  8000000 kB\nMemFree:  100000 kB\nMemAvailable:  1048576 kB\n"
    assert mem_available_bytes(text) == 2**30
    with pytest.raises(UnsupportedOnTarget, match="only 1024 MiB .* needs about 1536 MiB"):
        check_memory(spec, mem_available_bytes(text))
    check_memory(spec, 2 * 2**30)
    with MemWatch(interval_s=0.01) as w:
        junk = bytearray(64 * 2**20)  # noqa: F841
        time.sleep(0.1)
    assert w.start is not None and w.peak_used_bytes is not None and w.peak_used_bytes >= 0


# ------------------------------------------------------------------------------------------- jetson artifact
@pytest.fixture(scope="module")
def jetson_art(stories, tmp_path_factory):
    d = tmp_path_factory.mktemp("jetson")
    return compile_stage(open_artifact(stories), CompileConfig(exporter="torchscript", max_context=256), ORIN,
                         d / "orin")


def test_jetson_compile_ships_fp16_onnx_and_build_spec(jetson_art):
    import onnx

    ex, m = jetson_art.extra, jetson_art.history[-1]["metrics"]
    assert jetson_art.format == "onnx" and (ex["runtime"], ex["engine_build"], ex["precision"]) == (
        "tensorrt", "device", "fp16")
    assert "engine_sm" not in ex and "sm" not in ex  # no prebuilt engine: bundle checks must not treat it as one
    g = onnx.load(str(jetson_art.path / "model.onnx"), load_external_data=False).graph
    types = {i.name: i.type.tensor_type.elem_type for i in [*g.input, *g.output]}
    assert types["past_key_values.0.key"] == types["present.4.value"] == types["logits"] == onnx.TensorProto.FLOAT16
    assert types["input_ids"] == onnx.TensorProto.INT64
    assert m["fp16_greedy_agreement"] >= 0.9 and m["fp16_max_abs_logit_diff"] < 0.1
    spec = trt_spec.read_spec(jetson_art.path)
    assert spec["onnx_sha256"] == trt_spec.onnx_digest(jetson_art.path / "model.onnx") == m["onnx_sha256"]
    assert spec["max_context"] == 256 and spec["sm"] == 87 and spec["flags"] == ["FP16"]
    assert m["measured_on"] is None and "device prepare" in m["engine"]


def test_device_prepare_without_tensorrt_names_install_and_trtexec(jetson_art, tmp_path):
    if HAS_TRT:
        pytest.skip("tensorrt is installed here")
    from click.testing import CliRunner

    from edgepack.cli import cli
    from edgepack.deploy.bundle import make_bundle
    from edgepack.deploy.runtime import open_runtime

    bundle = make_bundle(jetson_art, ORIN, tmp_path / "b")
    r = CliRunner().invoke(cli, ["device", "prepare", str(bundle)])
    assert r.exit_code == 1 and r.output.startswith("error: this needs the Python package 'tensorrt'")
    assert "pip install tensorrt" in r.output and "JetPack" in r.output
    assert f"trtexec --onnx={bundle}/artifact/model.onnx --saveEngine={bundle}/engine-cache/" in r.output
    assert "past_key_values.0.key:1x4x255x8" in r.output and "--fp16" in r.output
    assert not (bundle / "engine-cache").exists()
    with pytest.raises(MissingDependency, match="tensorrt"):
        open_runtime(open_artifact(bundle / "artifact"), "tensorrt")


def test_device_prepare_checks_imports_and_gpu_for_torch_cuda_bundles(stories, tmp_path, monkeypatch):
    import torch

    from edgepack.deploy.bundle import make_bundle
    from edgepack.deploy.device import prepare_bundle

    monkeypatch.setattr(gpu_compile, "tensorrt_importable", lambda: False)
    art = compile_stage(open_artifact(stories), CompileConfig(max_context=64), A100, tmp_path / "a")
    bundle = make_bundle(art, A100, tmp_path / "b")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal below is for machines without one")
    with pytest.raises(UnsupportedOnTarget, match="torch sees no CUDA GPU"):
        prepare_bundle(bundle)


# ------------------------------------------------------------------------------------------- bench script
def test_gpu_decode_bench_runs_on_cpu_with_a_tiny_shape(capsys):
    from conftest import load_script

    main = load_script("gpu_decode").main

    out = main(["--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--target", "cpu-x86-64",
                "--prompt", "8", "--new-tokens", "6"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["rows"] == json.loads(json.dumps(out["rows"], default=str))
    assert [r["variant"] for r in out["rows"]] == ["hf-generate", "static"]
    assert all(r["decode_tokens_per_s"] > 0 and r["fit_required_bytes"] > 0 for r in out["rows"])


# ------------------------------------------------------------------------------------------- on a CUDA GPU
@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["graph", "graph+compile"])
def test_cuda_graph_greedy_tokens_equal_eager_on_gpu(stories, compiled):
    import torch

    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.torch_cuda import TorchCudaRuntime
    from edgepack.hf import load_model

    model = load_model(open_artifact(stories), device="cuda", dtype=torch.float32)
    with torch.inference_mode():
        ref = model.generate(torch.tensor(PROMPT, device="cuda"), max_new_tokens=48, min_new_tokens=48,
                             do_sample=False, pad_token_id=0)[:, PROMPT.shape[1]:].cpu().numpy()
    rt = TorchCudaRuntime(model, max_context=128, use_cuda_graph=True, torch_compile=compiled)
    got = generate(rt, PROMPT, GenerationConfig(max_new_tokens=48))
    assert rt._graph is not None and rt.capture_seconds is not None
    assert got.tokens.tolist() == ref.tolist()
    again = generate(rt, PROMPT, GenerationConfig(max_new_tokens=48))  # replays after reset give the same tokens
    assert again.tokens.tolist() == ref.tolist() and again.decode_tokens_per_s > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engine_builds_caches_and_matches_onnxruntime(stories, tmp_path):
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.ort_runtime import OrtRuntime
    from edgepack.deploy.runtime import open_runtime

    local = load_target("local")
    art = compile_stage(open_artifact(stories), CompileConfig(exporter="torchscript", runtime="tensorrt",
                                                              max_context=128), local, tmp_path / "t")
    m = art.history[-1]["metrics"]
    assert art.extra["engine_sm"] == gpu_compile.local_cuda_sm() and m["build_seconds"] > 0
    rt = open_runtime(art, "tensorrt")
    ref = generate(OrtRuntime(art.path, art.extra, io_binding=False), PROMPT, GenerationConfig(max_new_tokens=24))
    got = generate(rt, PROMPT, GenerationConfig(max_new_tokens=24))
    assert (ref.tokens == got.tokens).mean() >= 0.9
