"""Target profiles load, carry sources, answer capability questions; fit and roofline maths are right."""

from __future__ import annotations

import json

import pytest

from edgepack.errors import ConfigError, UnsupportedOnTarget
from edgepack.targets import list_targets, load_target
from edgepack.targets.fit import fit, model_shape

REQUIRED = ["a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "jetson-agx-orin-64gb", "jetson-agx-orin-32gb",
            "jetson-orin-nx-16gb", "jetson-orin-nx-8gb", "jetson-orin-nano-8gb", "jetson-orin-nano-4gb",
            "cpu-x86-64", "cpu-arm64", "h200", "local"]
LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                 max_position_embeddings=4096)
LLAMA3_70B = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def test_all_required_targets_exist_and_load_with_sources():
    names = list_targets()
    for n in REQUIRED:
        assert n in names
    for n in names:
        if n == "local":
            continue
        t = load_target(n)
        assert t.name == n
        assert 0 < t.usable_memory_bytes <= t.memory_bytes
        assert {"memory", "usable_memory", "bandwidth"} <= set(t.sources)
        assert t.runtimes and t.precisions


def test_capabilities_not_names():
    assert load_target("h100-sxm").supports(precision="fp8")
    for n in ("a100-40gb", "a100-80gb", "jetson-agx-orin-64gb", "jetson-orin-nano-4gb"):
        assert not load_target(n).supports(precision="fp8")
    orin = load_target("jetson-orin-nano-8gb")
    assert orin.engine_build == "device" and orin.unified_memory and orin.sm == 87
    cpu = load_target("cpu-x86-64")
    assert cpu.preferred_runtime() == "onnxruntime" and cpu.supports(precision="int4") and not cpu.has_cuda


def test_unknown_target_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'h100-sxm'"):
        load_target("h100-sxn")


def test_user_toml(tmp_path):
    src = (load_target("cpu-x86-64").path or "")  # packaged: no path
    assert src == ""
    good = tmp_path / "board.toml"
    good.write_text('name = "my-board"\ndevice_type = "cpu"\narch = "arm64"\nmemory_gib = 8\nusable_memory_gib = 6\n'
                    'bandwidth_gb_s = 25.6\nprecisions = ["fp32", "int8"]\nruntimes = ["onnxruntime"]\n'
                    '[sources]\nmemory = "spec"\nusable_memory = "guess"\nbandwidth = "spec"\n')
    t = load_target(str(good))
    assert t.name == "my-board" and t.bandwidth_bytes_per_s == 25.6e9
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("bandwidth_gb_s", "bandwith_gb_s"))
    with pytest.raises(ConfigError, match="did you mean 'bandwidth_gb_s'"):
        load_target(str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("name = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_target(str(broken))


def test_local_target_measures_this_machine():
    t = load_target("local")
    assert t.measured["cpu_cores"] >= 1 and t.memory_bytes > 1e9
    assert 0.5e9 < t.bandwidth_bytes_per_s < 2e12  # a real copy bandwidth, bytes/s


def test_llama2_7b_shape_and_memory():
    s = model_shape(LLAMA2_7B)
    assert s.total_params == 6_738_415_616  # the published Llama-2-7B parameter count
    r = fit(LLAMA2_7B, load_target("a100-40gb"), "fp16", context=4096)
    assert r.kv_cache_bytes == 2 * 32 * 32 * 128 * 4096 * 2  # 2 x layers x kv_heads x head_dim x ctx x bytes
    assert abs(r.weights_bytes - 6_738_415_616 * 2) < 1e6
    assert r.fits
    assert not fit(LLAMA2_7B, load_target("jetson-orin-nano-8gb"), "fp16").fits
    assert fit(LLAMA2_7B, load_target("jetson-orin-nx-16gb"), "int4").fits


def test_roofline_is_bandwidth_over_bytes_per_token():
    t = load_target("jetson-agx-orin-64gb")
    r = fit(LLAMA2_7B, t, "fp16", context=1)
    assert r.decode_tokens_per_s_limit == pytest.approx(t.bandwidth_bytes_per_s / r.bytes_per_token, rel=1e-3)
    # NVIDIA's rule of thumb: ~200 GB/s Orin runs an FP16 7B at <= ~15 tok/s; published AWQ INT4 31 tok/s
    assert 13 < r.decode_tokens_per_s_limit < 16
    assert 30 < fit(LLAMA2_7B, t, "int4", context=1).decode_tokens_per_s_limit < 60


def test_70b_config_on_this_machine_and_gqa():
    r = fit(LLAMA3_70B, load_target("h100-sxm"), "fp8", context=8192)
    assert 70e9 < r.params < 71e9
    assert r.kv_cache_bytes == 2 * 80 * 8 * 128 * 8192 * 2
    assert r.fits  # ~71 GB of FP8 weights + 2.7 GB KV on an 80 GB H100
    assert not fit(LLAMA3_70B, load_target("h100-sxm"), "fp16").fits


def test_unsupported_precision_and_bad_config():
    with pytest.raises(UnsupportedOnTarget, match="supports: fp32, fp16, bf16, int8, int4"):
        fit(LLAMA2_7B, load_target("a100-40gb"), "fp8")
    with pytest.raises(ConfigError, match="hidden_size"):
        fit({"model_type": "llama"}, load_target("a100-40gb"), "fp16")


def test_fit_counts_the_runtime_it_is_asked_about():
    """onnxruntime on a CPU: 80 MiB fixed + 3 bytes/parameter + the KV cache twice (ping-pong buffers) instead of
    torch's 360 MiB of libraries; other runtimes and GPU targets keep the device type's figure."""
    from edgepack.targets.fit import MIB, ORT_CPU_BYTES_PER_PARAM, ORT_CPU_FIXED_BYTES, RUNTIME_OVERHEAD_BYTES

    cpu = load_target("cpu-x86-64")
    torch_r = fit(LLAMA2_7B, cpu, "int4", context=512)
    ort_r = fit(LLAMA2_7B, cpu, "int4", context=512, runtime="onnxruntime")
    expected = (torch_r.required_bytes - RUNTIME_OVERHEAD_BYTES["cpu"] + ORT_CPU_FIXED_BYTES
                + ORT_CPU_BYTES_PER_PARAM * torch_r.params + torch_r.kv_cache_bytes)
    assert abs(ort_r.required_bytes - expected) <= 1
    assert ort_r.kv_cache_bytes == torch_r.kv_cache_bytes  # the logical cache; the second buffer is workspace
    gpu = load_target("h100-sxm")
    assert fit(LLAMA2_7B, gpu, "fp16", runtime="onnxruntime").required_bytes == fit(LLAMA2_7B, gpu, "fp16").required_bytes
    assert ORT_CPU_FIXED_BYTES < RUNTIME_OVERHEAD_BYTES["cpu"] and ORT_CPU_FIXED_BYTES == 80 * MIB


def test_h200_profile_and_local_detection_choose_it(monkeypatch):
    """The H200 has its own profile (141 GB HBM3e, 4.8 TB/s: not the H100's 3.35), and `local` on a machine whose
    CUDA device is named 'NVIDIA H200' takes it (the device facts are mocked: no GPU here)."""
    from edgepack.targets import profile

    h200 = load_target("h200")
    assert (h200.sm, h200.bandwidth_bytes_per_s, h200.device_names) == (90, 4.8e12, ("NVIDIA H200",))
    assert 139 * 2**30 == h200.usable_memory_bytes < h200.memory_bytes and h200.supports(precision="fp8")
    assert "4.3 TB/s" in h200.sources["bandwidth"] and "power" in h200.sources
    assert h200.peak_tflops == load_target("h100-sxm").peak_tflops  # same GH100 chip and clocks
    free = 130 * 2**30
    monkeypatch.setattr(profile, "cuda_device", lambda: {"name": "NVIDIA H200", "sm": 90, "memory_bytes": 143771 * 2**20,
                                                        "free_bytes": free, "multiprocessors": 132})
    monkeypatch.setattr(profile, "measure_bandwidth", lambda *a, **k: pytest.fail("a known GPU needs no host copy"))
    t = load_target("local")
    assert (t.name, t.measured["profile"], t.sm, t.device_type) == ("local", "h200", 90, "gpu")
    assert t.bandwidth_bytes_per_s == 4.8e12 and t.usable_memory_bytes == free and t.memory_bytes == 143771 * 2**20
    assert t.supports(precision="fp8", runtime="torch-cuda") and "NVIDIA H200" in t.description
    assert fit(LLAMA2_7B, t, "bf16", context=1).decode_tokens_per_s_limit == pytest.approx(
        fit(LLAMA2_7B, h200, "bf16", context=1).decode_tokens_per_s_limit)
    monkeypatch.setattr(profile, "cuda_device", lambda: {"name": "NVIDIA H100 80GB HBM3", "sm": 90,
                                                        "memory_bytes": 80 * 2**30, "free_bytes": 79 * 2**30})
    assert load_target("local").measured["profile"] == "h100-sxm"
    # a GPU no profile names keeps what torch reads off it (and the measured host copy, said to be no GPU figure)
    monkeypatch.setattr(profile, "measure_bandwidth", lambda *a, **k: 20e9)
    monkeypatch.setattr(profile, "cuda_device", lambda: {"name": "NVIDIA L4", "sm": 89, "memory_bytes": 24 * 2**30,
                                                        "free_bytes": 23 * 2**30})
    t = load_target("local")
    assert "profile" not in t.measured and t.sm == 89 and t.bandwidth_bytes_per_s == 20e9
    assert "use a packaged profile" in t.sources["bandwidth"]


def test_fit_takes_a_hub_id_and_fetches_only_its_config(monkeypatch, stories):
    import huggingface_hub
    from click.testing import CliRunner

    from edgepack.cli import cli

    asked = []

    def hf_hub_download(repo_id, filename, **kw):
        asked.append((repo_id, filename))
        return str(stories / "config.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("fit fetched weights"))
    res = CliRunner().invoke(cli, ["fit", "someorg/tiny-stories", "--target", "cpu-x86-64", "--json"])
    assert res.exit_code == 0, res.output
    assert asked == [("someorg/tiny-stories", "config.json")] and json.loads(res.stdout.splitlines()[-1])["fits"]

    def offline(repo_id, filename, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection --")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    res = CliRunner().invoke(cli, ["fit", "nobody/not-cached-xyz", "--target", "cpu-x86-64"])
    assert res.exit_code == 1 and res.output.startswith("error: cannot fetch 'nobody/not-cached-xyz'")
    assert res.output.count("\n") == 1 and "Traceback" not in res.output


LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
             "max_position_embeddings": 8192, "tie_word_embeddings": False}


def test_fit_that_fails_says_what_would_fit(tmp_path, stories):
    from click.testing import CliRunner

    from edgepack.cli import cli

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    res = CliRunner().invoke(cli, ["fit", str(tmp_path), "--target", "jetson-orin-nano-8gb", "--precision", "int4",
                                   "--json"])
    rep = json.loads(res.stdout.splitlines()[-1])
    assert not rep["fits"] and rep["would_fit"] == ["target jetson-orin-nx-16gb at int4, context 2048 (usable 13.5 GiB)"]
    res = CliRunner().invoke(cli, ["fit", str(stories), "--target", "jetson-orin-nano-8gb", "--context", "100000000"])
    assert "what would fit" in res.stdout and "context 1562500 at fp16 on jetson-orin-nano-8gb" in res.stdout
    fits = json.loads(CliRunner().invoke(cli, ["fit", str(stories), "--target", "cpu-x86-64", "--json"]).stdout)
    assert fits["fits"] and "would_fit" not in fits


# The published configs (config.json on the Hugging Face hub) of the two MoE models the issue checks against
DEEPSEEK_V2_LITE = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                        num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
                        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128,
                        qk_nope_head_dim=128, moe_layer_freq=1, first_k_dense_replace=1, tie_word_embeddings=False)
QWEN15_MOE_A27B = dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                       moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                       num_experts_per_tok=4, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                       decoder_sparse_step=1, tie_word_embeddings=False)


def test_moe_and_mla_counts_match_the_published_models():
    """All experts resident, only the routed ones read per token; MLA caches one latent per layer (issue 19: fit
    said 117.1B for DeepSeek-V2-Lite, 50.9B for Qwen1.5-MoE-A2.7B and a 1728 MiB fp32 KV cache at 4096 tokens)."""
    cpu = load_target("cpu-x86-64")
    ds = fit(DEEPSEEK_V2_LITE, cpu, "fp32", context=4096)
    assert ds.params == pytest.approx(15.7e9, rel=0.005)  # "15.7B total parameters"
    assert ds.kv_cache_bytes == 27 * (512 + 64) * 4096 * 4  # 243 MiB: latent + rope key, fp32 on a CPU
    assert 2.4e9 < ds.active_params < 2.7e9  # "2.4B activated" (lm_head in, the input embedding lookup out)
    qw = fit(QWEN15_MOE_A27B, cpu, "fp32", context=4096)
    assert qw.params == pytest.approx(14.3e9, rel=0.005)  # "14.3B parameters in total"
    assert qw.active_params == pytest.approx(2.7e9, rel=0.02)  # "2.7B activated"
    assert qw.kv_cache_bytes == 2 * 24 * 16 * 128 * 4096 * 4  # ordinary attention
    # decode reads the active experts: the roofline follows active, not resident, bytes
    assert qw.bytes_per_token < 0.25 * qw.weights_bytes
    assert "all 60 experts resident" in qw.note and "MLA" in ds.note


def test_fit_counts_every_parameter_of_the_real_config_classes():
    """model_shape's count equals the parameters transformers builds (meta device: no memory) for tiny models of
    each family, dense and MoE, with the knobs that change the count (biases, shared experts, dense first layers,
    MLA with and without q_lora_rank)."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=0)
    moe = dict(moe_intermediate_size=32, num_experts_per_tok=2)
    mla = dict(common, **moe, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, kv_lora_rank=16,
               qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1)
    configs = [tf.LlamaConfig(**common), tf.Qwen2Config(**common), tf.MistralConfig(**common),
               tf.Qwen3Config(**common, head_dim=16), tf.Phi3Config(**common), tf.Gemma2Config(**common, head_dim=16),
               tf.Gemma3TextConfig(**common, head_dim=16),
               tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
               tf.Qwen2MoeConfig(**common, **moe, num_experts=4, shared_expert_intermediate_size=48),
               tf.Qwen3MoeConfig(**common, **moe, num_experts=4, head_dim=16),
               tf.DeepseekV2Config(**mla, q_lora_rank=None), tf.DeepseekV3Config(**mla, q_lora_rank=24)]
    for c in configs:
        with torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(c)
        built = sum(p.numel() for p in model.parameters())
        assert model_shape(c.to_dict()).total_params == built, c.model_type


def test_fit_tensorrt_on_orin_nano_counts_runtime_and_build_memory():
    """DeepSeek-R1-Distill-Qwen-1.5B's shape on Orin Nano 8GB through TensorRT (issue 14): the runtime holds two KV
    buffers and the last position's logits; the engine build needs workspace + 3 x the weights, which fp16 cannot get
    on 8 GB and int4 can; the decode limit is given for 68 GB/s and the 25 W Super mode's 102 GB/s."""
    from edgepack.targets.fit import fit

    cfg = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
           "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": False}
    nano = load_target("jetson-orin-nano-8gb")
    f16 = fit(cfg, nano, "fp16", 2048, runtime="tensorrt")
    i4 = fit(cfg, nano, "int4", 2048, runtime="tensorrt")
    torch_f16 = fit(cfg, nano, "fp16", 2048)
    kv = 2 * 28 * 2 * 128 * 2048 * 2
    # the second KV buffer; logits of one position (logits_positions), as on torch, not the whole prompt's
    assert f16.kv_cache_bytes == kv and f16.workspace_bytes - torch_f16.workspace_bytes == kv
    assert f16.fits and not f16.build_fits and i4.fits and i4.build_fits
    assert f16.build_bytes > 3 * f16.weights_bytes and i4.build_bytes < nano.usable_memory_bytes
    # int4: 0.5 B + an fp16 scale per 128 weights, no zero point; embeddings and lm_head INT8 per row (Q/DQ graph's
    # quantize_embeddings: 1 B a weight + an fp16 scale a row)
    linear = 28 * (1536 * 128 * (2 * 12 + 2 * 2) + 3 * 1536 * 8960 + 128 * (12 + 2 * 2))  # q/k/v biases too
    assert i4.weights_bytes == int(linear * (0.5 + 2 / 128) + 2 * 151936 * (1536 + 2) + (2 * 28 + 1) * 1536 * 2)
    assert i4.decode_limit_by_mode == {"MAXN_SUPER": round(102e9 / i4.bytes_per_token, 2),
                                       "15W": i4.decode_tokens_per_s_limit}
    assert 65 < i4.decode_tokens_per_s_limit < 75 and 20 < f16.decode_tokens_per_s_limit < 23


def test_jetson_profiles_name_jetpack_and_tensorrt_with_sources():
    from edgepack.targets.profile import list_targets

    for name in [n for n in list_targets() if n.startswith("jetson-")]:
        t = load_target(name)
        assert any("10.3" in v for v in t.software["tensorrt"]) and "6.1" in t.software["jetpack"], name
        assert "8.6.2" in t.sources["software"] and "JetPack 6.0" in t.software["unsupported"], name
    assert load_target("jetson-orin-nano-8gb").bandwidth_modes["MAXN_SUPER"] == 102.0
