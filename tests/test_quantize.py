"""Quantization: algorithms (RTN / GPTQ / HQQ) on matrices, the torch-quant and ONNX artifacts on tiny models, target
legality before any weight loads, the quality gate, and the project's quality bars on stories260K."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.artifact import Artifact, open_artifact
from edgepack.compress.quantize import QuantizeConfig, quantize
from edgepack.errors import ConfigError, UnsupportedOnTarget, ValidationFailed
from edgepack.targets import load_target

torch = pytest.importorskip("torch")


def _layer_problem(k=172, n=24, seed=0):
    """A weight [n, k] and the Hessian of correlated inputs (what GPTQ exploits)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, k, generator=g) + 0.3 * torch.randn(2048, k, generator=g)
    return w, x, 2 * x.T @ x / x.shape[0]


def _out_err(x, w, w_hat) -> float:
    return float(((x @ (w - w_hat).T) ** 2).mean() / ((x @ w.T) ** 2).mean())


def test_group_size_not_dividing_width_and_gptq_beats_rtn():
    from edgepack.compress import quant_algos as qa

    w, x, h = _layer_problem()
    r = qa.rtn(w, 4, 32)
    assert r.codes.shape == (24, 192) and r.scales.shape == (24, 6)  # 172 = 5 groups of 32 + a short one of 12
    assert torch.equal(r.codes[:, 172:].float(), r.zeros[:, 5:6].expand(24, 20))  # padding dequantizes to 0
    assert r.dequantize().shape == (24, 172)
    rel = float(((r.dequantize() - w) ** 2).sum() / (w**2).sum())
    assert rel < 0.01  # 4-bit asymmetric, group 32: ~0.6 % of the weight energy
    e_rtn = _out_err(x, w, r.dequantize())
    e_hqq = _out_err(x, w, qa.hqq(w, 4, 32).dequantize())
    e_gptq = _out_err(x, w, qa.gptq(w, h, 4, 32).dequantize())
    assert e_gptq < 0.6 * e_rtn  # GPTQ uses the input correlations; measured ~0.3x here
    assert e_hqq < 1.05 * e_rtn
    sym = qa.rtn(w, 4, 32, symmetric=True)
    assert bool((sym.zeros == 8).all()) and int(sym.codes[:, :172].max()) <= 15


def test_pack_roundtrip_and_int8_per_channel():
    from edgepack.compress import quant_algos as qa
    from edgepack.compress.quant_torch import pack_codes, unpack_codes

    w, _, _ = _layer_problem(k=64, n=8)
    q = qa.rtn(w, 4, 16)
    packed = pack_codes(q.codes, 4)
    assert packed.shape == (8, 32) and torch.equal(unpack_codes(packed, 4), q.codes)
    assert int(packed[0, 0]) == int(q.codes[0, 0]) | (int(q.codes[0, 1]) << 4)  # MatMulNBits: low nibble first
    q8 = qa.rtn(w, 8, 64, symmetric=True)
    assert float(((q8.dequantize() - w) ** 2).sum() / (w**2).sum()) < 1e-4


# ------------------------------------------------------------------------------------------- legality, no weights
MISSING = Artifact(Path("/nonexistent/model"), {"format": "hf"}, False)  # any weight load would fail differently


@pytest.mark.parametrize("method,target,names", [("fp8", "a100-80gb", "int8, int4-rtn, int4-gptq, int4-hqq, int4-awq, nf4"),
                                                 ("fp8", "jetson-orin-nano-8gb", "int8, int4-rtn"),
                                                 ("nf4", "jetson-agx-orin-64gb", "int4-awq")])
def test_target_legality_before_weights(tmp_path, method, target, names):
    with pytest.raises(UnsupportedOnTarget) as exc:
        quantize(MISSING, QuantizeConfig(method=method), load_target(target), tmp_path / "out")
    assert f"'{method}'" in exc.value.problem and names in exc.value.hint
    with pytest.raises(ConfigError, match="no onnx path"):
        quantize(MISSING, QuantizeConfig(method="fp8", format="onnx"), load_target("h100-sxm"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_messages(tmp_path):
    from edgepack.cli import cli

    r = CliRunner().invoke(cli, ["quantize", "/nonexistent", "-m", "fp8", "--target", "a100-40gb", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "methods a100-40gb supports: int8, int4-rtn" in r.output
    r = CliRunner().invoke(cli, ["quantize", "/nonexistent", "-m", "int4-rtn", "--group-size", "24", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "power of two" in r.output
    r = CliRunner().invoke(cli, ["quantize", "/nonexistent", "-m", "int5", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "int4-gptq" in r.output


# ------------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny172(tmp_path_factory):
    from conftest import make_tiny_llama

    return open_artifact(make_tiny_llama(tmp_path_factory.mktemp("q") / "m", intermediate_size=172))


FAST = dict(eval_max_tokens=256, calib_samples=8, calib_seq_len=128, exporter="torchscript")


# method -> minimum logits SQNR (dB) on the random tiny model; measured: int8 46.0, int4-rtn 22.5, int4-hqq 24.4,
# int4-gptq 23.4 (random weights and inputs leave GPTQ little correlation to exploit), int4-awq 22.8, nf4 22.4,
# fp8 31.9
@pytest.mark.parametrize("method,min_sqnr", [("int8", 43), ("int4-rtn", 20.5), ("int4-hqq", 22), ("int4-gptq", 21),
                                             ("int4-awq", 20.5), ("nf4", 20), ("fp8", 29.5)])
def test_torch_methods_on_tiny(tiny172, tmp_path, embedded_text, method, min_sqnr):
    from edgepack.quality import PplProtocol, evaluate_artifact

    if method == "nf4":
        pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes (pip install 'edgepack[tune]')")
    art = quantize(tiny172, QuantizeConfig(method=method, format="torch", **FAST), load_target("h100-sxm"),
                   tmp_path / "q")
    m = art.history[-1]["metrics"]
    assert art.format == "torch-quant" and m["sqnr_db"] >= min_sqnr
    assert abs(m["ppl_increase_pct"]) < (0.5 if method == "int8" else 5.0)
    assert m["layers_quantized"] == 14 and m["kept_fp32"] == ["embed_tokens", "lm_head"]
    meta = json.loads((art.path / "quantization.json").read_text())
    assert meta["method"] == method and meta["layers"]["model.layers.0.mlp.down_proj"]["in_features"] == 172
    # `edgepack eval` reads the artifact back through the same scorer: identical perplexity on the same tokens
    text = tmp_path / "eval.txt"
    text.write_text(embedded_text.read_text()[-6000:])
    a = evaluate_artifact(art, text, PplProtocol(max_tokens=200)).perplexity
    b = evaluate_artifact(tiny172, text, PplProtocol(max_tokens=200)).perplexity
    assert abs(a / b - 1) * 100 < (0.5 if method == "int8" else 5.0)


def test_onnx_int4_packs_our_codes_exactly(tiny172, tmp_path):
    """MatMulNBits with accuracy_level 1 (fp32 compute) must give the torch path's perplexity to 1e-4: the very
    codes that were measured are the ones that run, including the short last block of the 172-wide down_proj and
    the RMSNorm weights AWQ rescaled before export."""
    pytest.importorskip("onnxruntime")
    import onnx

    cfg = dict(method="int4-awq", group_size=32, **FAST)
    t = quantize(tiny172, QuantizeConfig(format="torch", **cfg), None, tmp_path / "t")
    o = quantize(tiny172, QuantizeConfig(format="onnx", accuracy_level=1, **cfg), load_target("cpu-x86-64"), tmp_path / "o")
    mt, mo = t.history[-1]["metrics"], o.history[-1]["metrics"]
    assert o.format == "onnx" and o.extra["precision"] == "int4"
    assert abs(mo["ppl_after"] / mt["ppl_after"] - 1) < 1e-4 and abs(mo["sqnr_db"] - mt["sqnr_db"]) < 0.05
    ops = [n.op_type for n in onnx.load(str(o.path / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 14 and ops.count("MatMul") >= 1  # lm_head stays a float MatMul
    fast = quantize(tiny172, QuantizeConfig(format="onnx", method="int8", **FAST), None, tmp_path / "i8")
    assert fast.history[-1]["metrics"]["sqnr_db"] > 35 and abs(fast.history[-1]["metrics"]["ppl_increase_pct"]) < 0.5


def test_quality_gate_writes_nothing(tiny172, tmp_path):
    with pytest.raises(ValidationFailed, match="above the limit of 0%"):
        quantize(tiny172, QuantizeConfig(method="int4-rtn", format="torch", max_ppl_increase=0.0, group_size=128,
                                          symmetric=True, **FAST), None, tmp_path / "gate")
    assert not (tmp_path / "gate").exists() and not list(tmp_path.glob(".gate*"))


def test_kernels(tiny172, tmp_path):
    from edgepack.compress.quant_torch import load_quantized
    from edgepack.deploy.runtime import open_runtime
    from edgepack.quality import probe_ids, sqnr_db

    i4 = quantize(tiny172, QuantizeConfig(method="int4-rtn", format="torch", **FAST), None, tmp_path / "i4")
    with pytest.raises(UnsupportedOnTarget, match="runs only on a CUDA GPU"):
        load_quantized(i4.path, "cpu", kernels=True)
    i8 = quantize(tiny172, QuantizeConfig(method="int8", format="torch", **FAST), None, tmp_path / "i8")
    ids = probe_ids(512)
    ref = open_runtime(i8, kernels=False).forward_logits(ids)
    rt = open_runtime(i8)  # torch's int8 weight-only kernel on CPU (aten._weight_int8pack_mm), from the stored codes
    assert type(rt.model.model.layers[0].mlp.down_proj).__name__ == "Int8Linear"
    assert sqnr_db(ref, rt.forward_logits(ids)) > 35


# ------------------------------------------------------------------------------------- stories260K quality bars
@pytest.mark.slow
def test_stories_quality_bars(stories, tinystories_text, tmp_path):
    """Calibrate on the first 90 % of the TinyStories sample, score the held-out rest (25k tokens).
    Measured (scripts/quantize_table.py): int8 onnx -0.01 %, int4-rtn g32 +10.75 %, int4-gptq g32 +5.4..5.5 %.
    GPTQ alone does not reach the issue's INT4 bar (<= 5 %) but halves RTN's increase, which is what is asserted;
    int4-gptq-kd reaches the bar (tests/test_quant_refine.py::test_stories_int4_bar)."""
    src = open_artifact(stories)
    common = dict(calib=str(tinystories_text), group_size=32, exporter="torchscript")
    got = {}
    for method, fmt in (("int8", "onnx"), ("int4-rtn", "torch"), ("int4-gptq", "torch")):
        art = quantize(src, QuantizeConfig(method=method, format=fmt, **common), load_target("cpu-x86-64"),
                       tmp_path / method)
        got[method] = art.history[-1]["metrics"]
    assert got["int8"]["eval_tokens"] > 20000 and got["int8"]["ppl_increase_pct"] <= 0.5
    assert got["int4-gptq"]["ppl_increase_pct"] <= 6.0
    assert got["int4-gptq"]["ppl_increase_pct"] <= 0.6 * got["int4-rtn"]["ppl_increase_pct"]


@pytest.mark.slow
def test_int4_size_on_25m_model(tmp_path):
    from conftest import make_tiny_llama

    src = open_artifact(make_tiny_llama(tmp_path / "m25", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                        num_attention_heads=8, num_key_value_heads=8))
    n = sum(v["bytes"] for k, v in src.files.items() if k.endswith(".safetensors")) / 4
    assert n > 25e6
    for fmt in ("torch", "onnx"):
        art = quantize(src, QuantizeConfig(method="int4-rtn", format=fmt, eval_max_tokens=64, exporter="torchscript"),
                       None, tmp_path / fmt)
        assert art.history[-1]["metrics"]["size_ratio_vs_fp32"] <= 0.3
