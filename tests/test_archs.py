"""Architecture x stage (issue 19): tiny random-weight models of the real transformers config classes (Llama, Qwen2
with biases, Qwen3, Mistral with a sliding window, Phi-3, Gemma 2 / 3, GPT-2, Mixtral, Qwen2-MoE, DeepSeek-V2) go
through a stage, or the stage refuses them up front in one line naming the architecture and the stage."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_tiny_arch

from edgepack.artifact import open_artifact

pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'edgepack[onnx]')")


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    made = {}
    root = tmp_path_factory.mktemp("archs")

    def get(arch: str, hidden: int = 64):
        if (arch, hidden) not in made:
            made[arch, hidden] = make_tiny_arch(root / f"{arch}-{hidden}", arch, hidden)
        return made[arch, hidden]

    return get


@pytest.mark.parametrize("arch", ["mistral_sw", "gemma2"])
def test_sliding_window_onnx_runs_past_the_window(arch, arch_dir, tmp_path):
    """Window 8: the export's own greedy check (8 prompt + 24 tokens) and a 40-token decode through the cache both
    pass the window and match PyTorch token for token (before: the graph trimmed its present tensors to the window
    and onnxruntime failed in a Slice node)."""
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.onnx_export import ExportConfig, export_onnx
    from edgepack.deploy.runtime import open_runtime

    src = open_artifact(arch_dir(arch))
    art = export_onnx(src, ExportConfig(exporter="torchscript", greedy_tokens=24), None, tmp_path / "onnx")
    m = art.history[-1]["metrics"]
    assert m["greedy_agreement"] == 1.0 and m["sqnr_db"] > 60
    prompt = np.array([[1, 403, 261, 426, 306, 22, 97, 45, 300, 11]])
    gen = GenerationConfig(max_new_tokens=40)
    got = generate(open_runtime(art), prompt, gen).tokens
    ref = generate(open_runtime(src), prompt, gen).tokens
    assert got.shape == (1, 40) and np.array_equal(got, ref)


@pytest.mark.slow
def test_compile_auto_falls_back_to_our_export_when_the_genai_builder_fails(arch_dir, tmp_path):
    """onnxruntime-genai 0.18's builder fails on a Phi-3 checkpoint (KeyError 'multi_cache'): `auto` says so and
    builds our export + MatMulNBits instead, whose logits pass the gate against PyTorch; asked for by name, the
    genai builder's failure stays the stage's error."""
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install 'edgepack[genai]')")
    from edgepack.deploy.compile import CompileConfig, compile_stage
    from edgepack.errors import ValidationFailed
    from edgepack.targets import load_target

    src, cpu = open_artifact(arch_dir("phi3")), load_target("cpu-x86-64")
    art = compile_stage(src, CompileConfig(exporter="torchscript", measure_tokens=4), cpu, tmp_path / "auto")
    m = art.history[-1]["metrics"]
    assert (m["builder"], art.extra["precision"], art.extra["made_by"]) == ("edgepack", "int4", "torch.onnx (torchscript)")
    assert "onnxruntime-genai builder failed on this phi3 model" in m["builder_fallback"] == m["builder_reason"]
    assert m["sqnr_db"] >= m["min_sqnr_db"] == 5.0 and m["argmax_agreement"] > 0.5
    with pytest.raises(ValidationFailed, match="onnxruntime-genai builder failed"):
        compile_stage(src, CompileConfig(builder="genai", measure_tokens=0), cpu, tmp_path / "genai")
    assert not (tmp_path / "genai").exists()


REFUSED = [  # (architecture, command line after the model path, what the one line must name)
    ("gpt2", ["quantize", "--method", "int4-rtn", "--format", "torch"], "quantize: the 'gpt2' architecture"),
    ("gpt2", ["prune", "--method", "wanda"], "prune: the 'gpt2' architecture"),
    ("phi3", ["prune", "--method", "width"], "prune: the 'phi3' architecture"),
    ("qwen2_moe", ["prune", "--method", "width"], "prune: the 'qwen2_moe' architecture"),
    ("mixtral", ["prune", "--method", "width"], "prune: the 'mixtral' architecture"),
    ("deepseek_v2", ["export", "onnx"], "export: the 'deepseek_v2' architecture"),
    ("deepseek_v2", ["quantize", "--method", "int4-rtn", "--format", "onnx"], "quantize: the 'deepseek_v2'"),
    ("deepseek_v2", ["compile", "--target", "cpu-x86-64"], "compile: the 'deepseek_v2' architecture"),
    ("deepseek_v2", ["compile", "--target", "jetson-orin-nano-8gb"], "compile: the 'deepseek_v2' architecture"),
]


@pytest.mark.parametrize("arch,args,says", REFUSED, ids=[f"{a}-{' '.join(c[:3])}" for a, c, _ in REFUSED])
def test_cells_that_cannot_work_refuse_up_front_in_one_line(arch, args, says, arch_dir, tmp_path):
    """Before: tracebacks (GPT-2 width, Phi-3 width, MoE width, MLA export), or a reported success that changed
    nothing (GPT-2 quantize: 0 layers quantized). Now one line naming the stage and the architecture, no output."""
    from click.testing import CliRunner

    from edgepack.cli import cli

    cmd = [*args[:2], str(arch_dir(arch)), *args[2:]] if args[0] == "export" else [args[0], str(arch_dir(arch)), *args[1:]]
    r = CliRunner().invoke(cli, [*cmd, "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.output.startswith(f"error: {says}"), r.output
    assert r.output.count("\n") == 1 and " -- " in r.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_decoders_export_to_onnx_with_the_kv_cache(arch, arch_dir, tmp_path):
    """Routed experts through transformers' batched_mm (Gather + MatMul): the export validates against PyTorch on
    the probe and 16 greedy tokens through the cache (before: torch.onnx failed on `histc` / grouped_mm)."""
    from edgepack.deploy.onnx_export import ExportConfig, export_onnx

    art = export_onnx(open_artifact(arch_dir(arch)), ExportConfig(exporter="torchscript", greedy_tokens=16), None,
                      tmp_path / "onnx")
    m = art.history[-1]["metrics"]
    assert m["sqnr_db"] > 100 and m["greedy_agreement"] == 1.0


def test_moe_quantize_keeps_routers_and_quantizes_each_expert(arch_dir, tmp_path):
    """Qwen2-MoE int4 (torch): attention and shared-expert linears quantized, the routers kept (not in
    layers_quantized), and each routed expert's matrix quantized on its own (before: the 3-D experts stayed fp32
    while the record listed only embeddings / lm_head as kept). The stage's own logit check reloads the artifact,
    which stacks the experts back from their codes."""
    from edgepack.compress.quant_torch import read_quant_meta
    from edgepack.compress.quantize import QuantizeConfig, quantize

    art = quantize(open_artifact(arch_dir("qwen2_moe")), QuantizeConfig(method="int4-rtn", format="torch",
                                                                         eval_max_tokens=256), None, tmp_path / "q")
    m = art.history[-1]["metrics"]
    assert m["layers_quantized"] == 2 * (4 + 3)  # q k v o + the shared expert's gate / up / down, per layer
    assert m["experts_quantized"] == 2 * 2 * 4  # (gate_up, down) x 4 experts per layer
    left = m["unquantized_params"]
    assert "routed experts" not in left and left["routers"] == 2 * (64 * 4 + 64)
    assert left["embeddings / lm_head"] == 2 * 512 * 64 and "note" not in m
    assert m["sqnr_db"] > 10 and m["size_ratio_vs_fp32"] < 0.6
    rec = read_quant_meta(art.path)["layers"]["model.layers.1.mlp.experts.down_proj.3"]
    assert (rec["expert_of"], rec["expert"], rec["out_features"], rec["in_features"]) == (
        "model.layers.1.mlp.experts.down_proj", 3, 64, 64)


@pytest.mark.slow
def test_moe_onnx_quantize_says_the_experts_stayed_floating_point(arch_dir, tmp_path):
    """The ONNX graph gathers each token's experts from a 3-D fp32 initializer, which MatMulNBits cannot hold: the
    record counts those parameters and says so."""
    from edgepack.compress.quantize import QuantizeConfig, quantize

    art = quantize(open_artifact(arch_dir("qwen2_moe")), QuantizeConfig(method="int4-rtn", format="onnx",
                   exporter="torchscript", eval_max_tokens=256), None, tmp_path / "q")
    m = art.history[-1]["metrics"]
    assert m["layers_quantized"] == 14 and m["unquantized_params"]["routed experts"] == 2 * 4 * 3 * 64 * 64
    assert "routed-expert parameters (3-D tensors) left in floating point" in m["note"]


def test_wanda_walks_fused_projections_and_says_which_weights_stayed_dense(arch_dir, tmp_path):
    """Phi-3: the fused qkv_proj and gate_up_proj are pruned like any linear (before: only o_proj / down_proj, while
    the record said 0.5). Qwen2-MoE: the routed experts (3-D) stay dense, and the record counts them."""
    from safetensors.torch import load_file

    from edgepack.compress.prune import PruneConfig, prune

    cfg = PruneConfig(method="wanda", sparsity=0.5, calib_tokens=512, eval_max_tokens=256)
    phi = prune(open_artifact(arch_dir("phi3")), cfg, None, tmp_path / "phi3")
    w = load_file(str(phi.path / "model.safetensors"))
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"):
        assert float((w[name] == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name
    assert "unpruned_params" not in phi.history[-1]["metrics"]
    moe = prune(open_artifact(arch_dir("qwen2_moe")), cfg, None, tmp_path / "moe")
    m = moe.history[-1]["metrics"]
    assert m["unpruned_params"] == {"routed experts": 2 * 4 * 3 * 64 * 64, "routers": 2 * (64 * 4 + 64)}
    assert "stayed dense" in m["note"] and m["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_lora_on_an_moe_wraps_experts_not_routers(arch_dir):
    """DeepSeek-V2: peft maps gate/up/down onto the 3-D routed experts, whose wrapper takes no dropout (before: a
    ValueError traceback from `tune qlora`); the routers get no adapter."""
    from edgepack.hf import load_model
    from edgepack.tune.qlora import TuneConfig, add_lora

    model = add_lora(load_model(open_artifact(arch_dir("deepseek_v2")), device="cpu"), TuneConfig(method="lora"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".experts." in n for n in names) and any("self_attn" in n for n in names)
    assert not any(".mlp.gate." in n for n in names) and all("lora_" in n for n in names)


@pytest.mark.slow
def test_gpt2_cpu_compile_defaults_to_fp32_and_says_why(arch_dir, tmp_path):
    """GPT-2's Conv1D projections are not quantized, so the CPU default (int4) would be a refusal: the default
    precision becomes fp32 with a note, the graph passes the 60 dB gate (before: a KeyError traceback)."""
    from edgepack.deploy.compile import CompileConfig, compile_stage
    from edgepack.targets import load_target

    art = compile_stage(open_artifact(arch_dir("gpt2")), CompileConfig(exporter="torchscript", measure_tokens=4),
                        load_target("cpu-x86-64"), tmp_path / "c")
    m = art.history[-1]["metrics"]
    assert art.extra["precision"] == "fp32" and "Conv1D projections; wrote fp32" in m["note"]
    assert m["sqnr_db"] >= m["min_sqnr_db"] == 60.0


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2", "qwen2_moe", "deepseek_v2"])
def test_awq_scaling_leaves_every_float_model_unchanged(arch, arch_dir):
    """AWQ scales input channels and folds 1/s into the op before, which must leave the float model's logits as they
    were: Phi-3's fused qkv_proj / gate_up_proj (the up half of its rows), Gemma's (1 + weight) norms and its
    pre-feedforward norm, an MoE's attention, MLA's projections (before: AttributeError on Phi-3 and MoE models,
    and on Gemma a fold into the wrong norm)."""
    import torch

    from edgepack.compress.quant_algos import awq_scale_
    from edgepack.hf import load_model

    model = load_model(open_artifact(arch_dir(arch)), device="cpu")
    ids = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    alphas = awq_scale_(model, ids, max_tokens=64)
    with torch.no_grad():
        after = model(ids).logits
    assert alphas and float((after - before).abs().max()) < 1e-4 * float(before.abs().max())
    assert any(a > 0 for a in alphas.values())  # some group really was rescaled


def test_a_recipe_refuses_an_architecture_before_its_first_stage_runs(arch_dir, tmp_path):
    """A DeepSeek-V2 (MLA) chain whose CPU quantize step writes ONNX is refused before tune / prune run, in one line
    naming the stage and the architecture; nothing is written."""
    from edgepack.errors import UnsupportedOnTarget
    from edgepack.plan import load_recipe, run_recipe

    p = tmp_path / "r.toml"
    p.write_text(f'[recipe]\nname = "t"\nmodel = "{arch_dir("deepseek_v2")}"\ntargets = ["cpu-x86-64"]\n'
                 'workdir = "wd"\n[[stages]]\nkind = "prune"\nmethod = "depth"\n'
                 '[[stages]]\nkind = "quantize"\nmethod = "int4-rtn"\n')
    with pytest.raises(UnsupportedOnTarget, match="quantize: the 'deepseek_v2' architecture is not supported: MLA"):
        run_recipe(load_recipe(p))
    assert not (tmp_path / "wd").exists()
