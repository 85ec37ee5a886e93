"""GPU runtimes (issues 10, 15): compile for CUDA targets, the low-bit torch-cuda weights (int4 tinygemm exactly our
codes, int8, fp8 W8A8: checked on CPU through torch's CPU kernels and the emulation, and on CUDA), the static-cache
torch-cuda runtime with attention over the filled length (checked on CPU without graph capture, and on CUDA with
it), the TensorRT build spec / trtexec line / engine cache, `device prepare`, and the device session's scripts.
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
H200 = load_target("h200")
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
    assert (j["runtime"], j["precision"], j["engine_build"]) == ("tensorrt", "int4", "device")  # W4A16 by default
    assert choose_path(CompileConfig(), ORIN, src_precision="fp32")["precision"] == "fp16"  # an fp32 ONNX source
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
    """bf16: a plain 16-bit checkpoint plus torch_cuda.json, opened on CPU by the same static-cache runtime."""
    import torch
    from safetensors import safe_open

    monkeypatch.setattr(gpu_compile, "tensorrt_importable", lambda: False)
    art = compile_stage(open_artifact(stories), CompileConfig(max_context=256), H100, tmp_path / "h")
    ex, m = art.extra, art.history[-1]["metrics"]
    assert art.format == "hf" and (ex["runtime"], ex["precision"], ex["device"], ex["target"]) == (
        "torch-cuda", "bf16", "cuda", "h100-sxm")
    assert ex["dtype"] == "bfloat16" and ex["max_context"] == 256 and "sm" not in ex  # not an engine
    assert ex["torch_compile"] is False  # off until a GPU measured it to pay
    with safe_open(str(art.path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    if not torch.cuda.is_available():
        assert m["measured_on"] is None and "no speed measured" in m["speed_note"]
        assert "decode_tokens_per_s" not in m
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.runtime import open_runtime

    rt = open_runtime(art, "torch-cuda", device="cpu")
    assert rt.max_context == 256 and rt.describe()["attention"] == "edgepack_sliced_sdpa"
    res = generate(rt, PROMPT, GenerationConfig(max_new_tokens=8))
    assert res.tokens.shape == (1, 8) and (res.tokens < 512).all()


@pytest.fixture(scope="module")
def quantized(stories, tmp_path_factory):
    """torch-quant artifacts of stories260K (fast settings): int4-gptq g32 (calibrated, asymmetric), int8, fp8."""
    from edgepack.compress.quantize import QuantizeConfig, quantize

    d = tmp_path_factory.mktemp("q")
    fast = dict(format="torch", eval_max_tokens=256, calib_samples=4, calib_seq_len=64)
    return {m: quantize(open_artifact(stories), QuantizeConfig(method=m, **fast), H200, d / m)
            for m in ("int4-gptq", "int8", "fp8")}


@pytest.fixture(scope="module")
def compiled_gpu(quantized, tmp_path_factory):
    """The same, compiled for the H200 on this CPU: packed low-bit torch-cuda artifacts."""
    d = tmp_path_factory.mktemp("c")
    return {m: compile_stage(q, CompileConfig(max_context=128), H200, d / m) for m, q in quantized.items()}


def test_gpu_compile_carries_the_measured_codes_packed(quantized, compiled_gpu):
    """A GPU artifact holds its low-bit weights on disk (no 16-bit linear), exactly the quantize stage's codes
    (int4: the same packed bytes; int8: the codes less 128; fp8: the same e4m3 and scales), its size is what fit
    predicts for torch-cuda, and the manifest says what was checked here and what only the GPU can check."""
    import torch
    from safetensors.torch import load_file

    from edgepack.deploy.cuda_weights import read_layers

    for method, art in compiled_gpu.items():
        ex, m = art.extra, art.history[-1]["metrics"]
        precision = {"int4-gptq": "int4", "int8": "int8", "fp8": "fp8"}[method]
        assert art.format == "torch-cuda" and (ex["runtime"], ex["precision"], ex["target"]) == (
            "torch-cuda", precision, "h200")
        assert [r["stage"] for r in art.history] == ["quantize", "compile"]
        st = load_file(str(art.path / "model.safetensors"))
        src = load_file(str(quantized[method].path / "model.safetensors"))
        layers = read_layers(art.path)
        assert len(layers) == 35 and not any(f"{n}.weight" in st for n in layers)
        assert {v.dtype for k, v in st.items() if not any(k.startswith(n + ".") for n in layers)} == {torch.bfloat16}
        name = "model.layers.2.mlp.down_proj"
        if precision == "int4":
            assert torch.equal(st[f"{name}.qweight"], src[f"{name}.qweight"])  # the measured codes, byte for byte
            assert st[f"{name}.scales_and_zeros"].dtype == torch.bfloat16
            assert st[f"{name}.scales_and_zeros"].shape == (6, 64, 2)  # 172 wide: 6 groups of 32, the last short
            assert m["padded_layers"] == {"int4 [172, 64] -> [176, 64]": 10, "int4 [64, 172] -> [64, 192]": 5}
            assert "bit-identical" in m["checked_here"][0] and any("CUDA tinygemm" in g for g in m["gpu_only"])
            assert ex["int4_group_size"] == 32
        elif precision == "int8":
            assert st[f"{name}.qweight"].dtype == torch.int8
            assert torch.equal(st[f"{name}.qweight"].to(torch.int16) + 128, src[f"{name}.qweight"].to(torch.int16))
            assert torch.equal(st[f"{name}.scales"], src[f"{name}.scales"].reshape(-1))
        else:
            assert torch.equal(st[f"{name}.fp8"].view(torch.uint8), src[f"{name}.fp8"].view(torch.uint8))
            assert "fp8 [172, 64] -> [176, 64]" in m["padded_layers"] and any("_scaled_mm" in g for g in m["gpu_only"])
        # size on disk against fit (torch-cuda int4: bf16 scale + bf16 zero per group): the short 172-wide groups
        # and the safetensors header are the difference
        assert 0.97 < m["bytes_vs_fit"] < 1.10, (method, m["bytes_vs_fit"])
        assert m["bytes"] == (art.path / "model.safetensors").stat().st_size
        # quality measured on the GPU's own weights, on the quantize stage's held-out text and protocol
        assert m["eval_tokens"] == quantized[method].history[-1]["metrics"]["eval_tokens"]
        assert abs(m["ppl_delta_vs_quantized_pct"]) < (1.0 if precision == "fp8" else 0.5), (method, m)
        assert m["parity_vs_quantized"]["sqnr_db"] > (20 if precision == "fp8" else 35)


def test_gpu_artifacts_open_on_cpu_and_load_without_a_float_copy(compiled_gpu, monkeypatch):
    """The loader builds each kernel module from the stored tensors on the meta-device skeleton: no linear ever
    holds a float weight (checked by failing any float nn.Linear weight allocation), and the CPU kernels decode."""
    import torch

    from edgepack.compress import quant_kernels as qk
    from edgepack.deploy.cuda_weights import build_model, read_layers
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.runtime import open_runtime
    from edgepack.quality import open_scorer, probe_ids, sqnr_db

    art = compiled_gpu["int4-gptq"]
    model = build_model(art.path, read_layers(art.path), "cpu")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Int4Linear" in kinds and sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 1  # lm_head
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    floats = sum(p.numel() for p in model.parameters())
    assert floats == 512 * 64 + 11 * 64  # embeddings and norms only
    rt = open_runtime(art, device="cpu")
    assert rt.describe()["kernel"] == qk.KERNEL_NAMES["int4"]
    res = generate(rt, PROMPT, GenerationConfig(max_new_tokens=8))
    assert res.tokens.shape == (1, 8)
    # the CPU kernel model (bf16 activations) against the scorer's emulation (fp32 activations, same weights)
    ids = probe_ids(512)
    scorer = open_scorer(art)[0]
    assert sqnr_db(scorer(ids), rt.forward_logits(ids)) > 25


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


def test_attention_over_the_filled_length_equals_full_attention(stories, monkeypatch):
    """Decode attends over a bucket (8, 16, 32, 64 of 8..128 here) of the filled length, not the whole static cache:
    every step's logits within float rounding of one stock-sdpa full-length forward over the same tokens (so the
    same greedy tokens), crossing every bucket boundary; only the first `bucket` slots are read (checked by
    poisoning the slots beyond the bucket, which full attention would have to mask)."""
    import copy

    import torch

    from edgepack.deploy.cuda_attention import cache_keyword, sliced_sdpa
    from edgepack.deploy.torch_cuda import TorchCudaRuntime, bucket_lengths
    from edgepack.hf import load_model

    assert bucket_lengths(4096) == (512, 1024, 2048, 4096) and bucket_lengths(384) == (384,)
    model = load_model(open_artifact(stories), device="cpu", dtype=torch.float32)
    full = copy.deepcopy(model)  # stock sdpa over everything
    rt = TorchCudaRuntime(model, max_context=128, use_cuda_graph=False, min_bucket=8)
    assert rt.buckets == (8, 16, 32, 64, 128)
    seen = []
    real = sliced_sdpa

    def spy(module, query, key, value, attention_mask, **kw):
        assert attention_mask is not None and attention_mask.dim() == 4
        seen.append(attention_mask.shape[-1])
        bucket = attention_mask.shape[-1]
        key, value = key.clone(), value.clone()
        key[:, :, bucket:], value[:, :, bucket:] = float("nan"), float("nan")  # never to be read
        return real(module, query, key, value, attention_mask, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register("edgepack_sliced_sdpa", spy)
    monkeypatch.setattr("edgepack.deploy.cuda_attention.sliced_sdpa", spy)
    try:
        toks, logits, steps = list(PROMPT[0]), rt.prefill(PROMPT), []
        for _ in range(44):
            steps.append(logits[0])
            toks.append(int(logits.argmax(-1)[0]))
            logits = rt.decode_step(np.array([toks[-1]]))
    finally:
        AttentionInterface.register("edgepack_sliced_sdpa", real)
    assert set(seen) == {8, 16, 32, 64} and rt._pos == 50
    # one full-length forward of the same tokens (stock sdpa, causal over everything) gives every step's logits
    eager = full(torch.tensor([toks[:-1]])).logits[0, PROMPT.shape[1] - 1:].detach().numpy()
    assert np.isfinite(np.stack(steps)).all() and np.abs(eager - np.stack(steps)).max() < 1e-4
    assert (eager.argmax(-1) == np.array(toks[PROMPT.shape[1]:])).all()  # the same greedy tokens
    assert full.config._attn_implementation == "sdpa"
    assert cache_keyword(model) in ("cache", "past_key_values")

    class Old(torch.nn.Module):  # transformers 5.17's forward: no `cache` parameter (an unknown one is swallowed)
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):  # 5.24: `cache`, with past_key_values deprecated
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    assert (cache_keyword(Old()), cache_keyword(New())) == ("past_key_values", "cache")


def test_gpu_compile_refusals_come_before_any_weights(quantized, tmp_path, monkeypatch):
    from edgepack.compress import quant_torch

    with pytest.raises(ConfigError, match="already quantized with int8; compile cannot make it int4"):
        compile_stage(quantized["int8"], CompileConfig(precision="int4"), H200, tmp_path / "x")
    with pytest.raises(ConfigError, match="compiles for CUDA targets"):
        compile_stage(quantized["int8"], CompileConfig(), load_target("cpu-x86-64"), tmp_path / "y")
    real = quant_torch.read_quant_meta
    monkeypatch.setattr(quant_torch, "read_quant_meta", lambda p: {**real(p), "group_size": 16})
    with pytest.raises(UnsupportedOnTarget, match="tinygemm.*groups of 16"):
        compile_stage(quantized["int4-gptq"], CompileConfig(), H200, tmp_path / "z")
    assert not any((tmp_path / n).exists() for n in "xyz")


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
    expect = min(4 * 2**30, (ORIN.usable_memory_bytes - 300 * 2**20) // 4) // 2**20 * 2**20
    assert spec["workspace_bytes"] == expect and spec["strongly_typed"] and "flags" not in spec
    assert spec["build_memory_bytes"] == expect + 3 * 300 * 2**20  # workspace + parsed weights, builder copy, plan
    line = trt_spec.trtexec_command(spec, tmp_path / "model.onnx", tmp_path / "e.engine", tmp_path / "t.cache")
    assert line.startswith(f"trtexec --onnx={tmp_path}/model.onnx --saveEngine={tmp_path}/e.engine ")
    assert line.count("--minShapes=") == 2 and line.count("--maxShapes=") == 2
    assert "past_key_values.0.key:1x2x511x16" in line and "input_ids:1x512" in line
    assert f"--memPoolSize=workspace:{expect // 2**20}M" in line and " --stronglyTyped " in line
    assert "--fp16" not in line and "--int8" not in line  # weak typing: gone in TensorRT 11
    assert line.endswith(f"--timingCacheFile={tmp_path}/t.cache")
    i4 = trt_spec.build_spec(_fake_extra(), ORIN, "int4", onnx_sha256="0" * 64, engine_bytes=1, max_context=64)
    assert i4["precision"] == "int4" and "--stronglyTyped" in trt_spec.trtexec_command(i4, "m.onnx", "e")
    with pytest.raises(ConfigError, match="not bf16"):
        trt_spec.build_spec(_fake_extra(), ORIN, "bf16", onnx_sha256="0" * 64, engine_bytes=1, max_context=64)


def test_engine_cache_key_and_mismatch_refusal(tmp_path):
    from edgepack.deploy.tensorrt_build import engine_paths, find_engine

    digest = "c0ffee" * 10 + "abcd"
    nano8 = "8sms-7gib"  # the device module: Orin Nano 8GB and 4GB (4 SMs) share sm_87
    key = trt_spec.engine_key("10.3.0", 87, digest, nano8)
    assert key == f"trt10.3.0-sm87-{nano8}-{digest[:16]}"
    engine, meta = engine_paths(tmp_path, key)
    engine.write_bytes(b"\x00" * 100)
    meta.write_text(json.dumps({"trt_version": "10.3.0", "sm": 87, "module": nano8, "onnx_sha256": digest,
                                "engine_bytes": 100}))
    assert find_engine(tmp_path, digest, "10.3.0", 87, nano8) == engine
    with pytest.raises(UnsupportedOnTarget, match=r"TensorRT 10\.3\.0 for sm_87 \(8sms-7gib\); this machine has "
                                                  r"TensorRT 10\.7\.0"):
        find_engine(tmp_path, digest, "10.7.0", 87, nano8)
    with pytest.raises(UnsupportedOnTarget, match="an sm_90 GPU") as e:
        find_engine(tmp_path, digest, "10.3.0", 90, nano8)
    assert "edgepack device prepare" in e.value.hint
    with pytest.raises(UnsupportedOnTarget, match=r"sm_87 GPU \(4sms-3gib\)"):  # same SM, another module
        find_engine(tmp_path, digest, "10.3.0", 87, "4sms-3gib")
    assert find_engine(tmp_path, "f" * 64, "10.3.0", 87, nano8) is None  # another graph: nothing cached, no refusal
    engine.write_bytes(b"\x00" * 50)  # truncated
    with pytest.raises(ArtifactError, match="partial write"):
        find_engine(tmp_path, digest, "10.3.0", 87, nano8)


def test_build_refuses_to_start_without_memory_and_watch_samples():
    import time

    from edgepack.deploy.tensorrt_build import MemWatch, check_memory, mem_available_bytes

    spec = {"workspace_bytes": 1024 * 2**20, "engine_estimate_bytes": 512 * 2**20,
            "build_memory_bytes": (1024 + 3 * 512) * 2**20}
    text = "MemTotal:  8000000 kB\nMemFree:  100000 kB\nMemAvailable:  2097152 kB\n"
    assert mem_available_bytes(text) == 2 * 2**30
    with pytest.raises(UnsupportedOnTarget, match="only 2048 MiB .* needs about 2560 MiB .* 3 x the graph's 512 MiB"):
        check_memory(spec, mem_available_bytes(text))  # workspace + engine alone (1536 MiB) would have passed
    check_memory(spec, 3 * 2**30)
    with MemWatch(interval_s=0.01) as w:
        junk = bytearray(64 * 2**20)  # noqa: F841
        time.sleep(0.1)
    assert w.start is not None and w.peak_used_bytes is not None and w.peak_used_bytes >= 0


# ------------------------------------------------------------------------------------------- jetson artifact
@pytest.fixture(scope="module")
def jetson_art(stories, tmp_path_factory):
    d = tmp_path_factory.mktemp("jetson")
    return compile_stage(open_artifact(stories), CompileConfig(exporter="torchscript", max_context=256,
                                                               precision="fp16"), ORIN, d / "orin")


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
    assert spec["max_context"] == 256 and spec["sm"] == 87 and spec["strongly_typed"]
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
    assert "past_key_values.0.key:1x4x255x8" in r.output and "--stronglyTyped" in r.output
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
def test_gpu_decode_bench_writes_each_row_as_measured_and_resumes(capsys, tmp_path):
    """scripts/gpu_decode.py's CPU mechanics: one JSON line per result the moment it exists, a rerun on the same
    file measures only what is missing, the summary checks the issue's bars (not measured on a CPU)."""
    from conftest import load_script

    main = load_script("gpu_decode").main
    out = tmp_path / "decode.jsonl"
    args = ["--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--target", "cpu-x86-64", "--prompt", "8",
            "--new-tokens", "4", "--out", str(out)]
    first = main([*args, "--variants", "fp32"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["device", "variant", "summary"]
    row = lines[1]
    assert row["variant"] == "fp32" and row["decode_tokens_per_s"] > 0 and row["fit_required_bytes"] > 0
    assert row["bytes_per_token"] > 0 and row["buckets"] == [12] and first["summary"]["pass"]["int4_over_bf16"] is None
    second = main([*args, "--variants", "fp32,int4", "--deadline-s", "1e6"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x.get("variant") for x in lines if x["kind"] == "variant"] == ["fp32", "int4"]  # fp32 not rerun
    int4 = lines[-2]
    assert int4["kernel"].startswith("tinygemm") and int4["bundle_bytes"] > 0 and int4["decode_tokens_per_s"] > 0
    assert [r["variant"] for r in second["rows"]] == ["fp32", "int4"]
    skipped = main([*args, "--variants", "fp8", "--deadline-s", "0"])["rows"][-1]
    assert "no time left" in skipped["skipped"]
    printed = capsys.readouterr().out
    assert "int4 / bf16 = None (>= 1.8): not measured" in printed and "bf16 decode = None% of the bandwidth" in printed


@pytest.mark.slow
def test_gpu_session_script_dry_run_on_cpu(tmp_path):
    """scripts/gpu_session.sh under a CPU-only python: the steps run their mechanics or skip with a reason, each
    recorded in session.jsonl, within the budget, at most 8 files in $OUT. (The full dry run, recipe included,
    is in the README; here the tests and decode steps.)"""
    import os
    import subprocess
    import sys

    from conftest import ROOT, SHARED

    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "SESSION_STEPS": "tests,decode",
           "SESSION_BUDGET_S": "200"}
    env.pop("EDGEPACK_SHARED", None)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    steps = [json.loads(x) for x in (tmp_path / "out" / "session.jsonl").read_text().splitlines()]
    by = {s["step"]: s for s in steps}
    assert by["setup"]["cuda"] is False and by["tests"]["status"] == "ran" and by["decode"]["status"] == "ran"
    assert "no CUDA device" in by["decode-1b"]["reason"] and "no CUDA device" in by["compile"]["reason"]
    assert by["recipe"]["status"] == "skipped"  # not in SESSION_STEPS, or not prepared
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8 and {"session.log", "session.jsonl", "gpu_decode.jsonl"} <= set(files)
    log = (tmp_path / "out" / "session.log").read_text()
    assert "needs a CUDA GPU" in log and "skipped" in log and " failed" not in log
    decode = [json.loads(x) for x in (tmp_path / "out" / "gpu_decode.jsonl").read_text().splitlines()]
    assert decode[-1]["kind"] == "summary" and {d["variant"] for d in decode if d["kind"] == "variant"} == {
        "hf-generate", "fp32", "int4", "fp8"}
    assert SHARED.name  # the script reads stories260K from .shared (prepared) or EDGEPACK_SHARED


# ------------------------------------------------------------------------------------------- on a CUDA GPU
@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["graph", "torch_compile"])
def test_cuda_graph_greedy_tokens_equal_eager_on_gpu(stories, compiled):
    """Graphed decoding (one graph per bucket: 16, 32, 64 here) gives transformers' own greedy tokens. Compiled:
    one bucket only (each bucket is another compile; scripts/gpu_session.sh leaves this case out of its 5-minute
    call and measures compiling in scripts/gpu_decode.py instead)."""
    import torch

    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.torch_cuda import TorchCudaRuntime
    from edgepack.hf import load_model

    model = load_model(open_artifact(stories), device="cuda", dtype=torch.float32)
    with torch.inference_mode():
        ref = model.generate(torch.tensor(PROMPT, device="cuda"), max_new_tokens=48, min_new_tokens=48,
                             do_sample=False, pad_token_id=0)[:, PROMPT.shape[1]:].cpu().numpy()
    rt = TorchCudaRuntime(model, max_context=128, use_cuda_graph=True, torch_compile=compiled,
                          min_bucket=128 if compiled else 16)
    buckets = [128] if compiled else [16, 32, 64]  # the buckets reached by 6 + 48 tokens
    got = generate(rt, PROMPT, GenerationConfig(max_new_tokens=48))
    assert sorted(rt.capture_seconds) == buckets
    assert got.tokens.tolist() == ref.tolist()
    again = generate(rt, PROMPT, GenerationConfig(max_new_tokens=48))  # replays after reset give the same tokens
    assert again.tokens.tolist() == ref.tolist() and again.decode_tokens_per_s > 0
    assert sorted(rt.capture_seconds) == buckets  # no new capture


@pytest.mark.gpu
def test_lowbit_bundles_run_on_the_gpu_as_measured(compiled_gpu):
    """The compiled int4 / int8 / fp8 artifacts load on the GPU (no 16-bit copy: the load peak stays near the file's
    size), their logits match the CPU emulation the quality was measured with, and graphed decoding runs."""
    import torch

    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.runtime import open_runtime
    from edgepack.quality import open_scorer, probe_ids, sqnr_db

    ids = probe_ids(512)
    for method, art in compiled_gpu.items():
        if method == "fp8" and torch.cuda.get_device_capability() < (8, 9):
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rt = open_runtime(art, device="cuda")
        size = (art.path / "model.safetensors").stat().st_size
        assert torch.cuda.max_memory_allocated() < 3 * size + 2**20, method
        ref = open_scorer(art)[0](ids)
        got = rt.forward_logits(ids)
        assert sqnr_db(ref, got) > (18 if method == "fp8" else 25), method
        assert (ref.argmax(-1) == got.argmax(-1)).mean() > 0.9, method
        res = generate(rt, PROMPT, GenerationConfig(max_new_tokens=24))
        assert res.tokens.shape == (1, 24) and rt.capture_seconds and res.decode_tokens_per_s > 0


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
