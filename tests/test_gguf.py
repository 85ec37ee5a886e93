"""GGUF export (deploy/gguf_export.py): our measured codes in Q4_0 / Q4_1 / Q8_0 blocks, read back with the gguf
package's own reader and dequantizers and compared tensor by tensor; and the llama.cpp runtime (skips without
llama-cpp-python)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.artifact import open_artifact
from edgepack.errors import ArtifactError, ConfigError, ValidationFailed

pytest.importorskip("gguf")
import gguf  # noqa: E402

from edgepack.deploy import gguf_export as ge  # noqa: E402

HAS_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None


def _quantize(src, out, **kw):
    from edgepack.compress.quantize import QuantizeConfig, quantize

    return quantize(open_artifact(src), QuantizeConfig(format="torch", eval_max_tokens=256, **kw), None, out)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """A random-weight Qwen2 (q/k/v bias, GQA 4 / 2, tied) with the stories260K tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from edgepack.hf import copy_tokenizer
    from edgepack.sources import embedded_path

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves the biases at zero: give them values so a lost bias shows
        for layer in model.model.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("qwen2") / "model"
    model.save_pretrained(path, safe_serialization=True)
    copy_tokenizer(embedded_path("stories260K"), path)
    return path


def _q4_codes(t) -> np.ndarray:
    """Codes [N, K] of a Q4_0 / Q4_1 tensor read raw from the file (element j low nibble, j + 16 high)."""
    head = 2 if t.tensor_type == gguf.GGMLQuantizationType.Q4_0 else 4
    raw = np.asarray(t.data, dtype=np.uint8)
    rows = raw.shape[0]
    qs = raw.reshape(rows, -1, head + 16)[..., head:]
    return np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, -1)


def test_block_packing_matches_gguf_reference_dequantizers():
    rng = np.random.default_rng(0)
    n, k, g = 6, 128, 64
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, k // g)).astype(np.float32)
    zeros = rng.integers(0, 16, (n, k // g)).astype(np.float32)
    s_blk = np.repeat(scales, g, 1).astype(np.float16).astype(np.float32)
    sym = gguf.quants.dequantize(ge.pack_q4(codes, scales, None, g, k, True), gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(sym, (codes.astype(np.float32) - 8) * s_blk)
    asym = gguf.quants.dequantize(ge.pack_q4(codes, scales, zeros, g, k, False), gguf.GGMLQuantizationType.Q4_1)
    m16 = (-np.repeat(zeros, g, 1) * np.repeat(scales, g, 1)).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(asym, codes * s_blk + m16, rtol=0, atol=1e-6)
    c8 = rng.integers(1, 256, (n, k)).astype(np.uint8)
    s8 = scales[:, :1]
    q8 = gguf.quants.dequantize(ge.pack_q8(c8, s8, k), gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(q8, (c8.astype(np.float32) - 128) * np.float32(1) * s8.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("method,symmetric,want", [("int4-rtn", True, "Q4_0"), ("int4-gptq", False, "Q4_1"),
                                                   ("int8", False, "Q8_0")])
def test_torch_quant_codes_round_trip(tiny_model, tmp_path, method, symmetric, want):
    """Every decoder linear holds exactly our codes (bit for bit, q/k rows permuted as llama.cpp wants) and
    dequantizes, through gguf's reference code, to our weights within fp16 scale rounding."""
    import torch

    from edgepack.compress.quant_torch import read_quant_meta, unpack_codes

    q = _quantize(tiny_model, tmp_path / "q", method=method, symmetric=symmetric)
    art = ge.export_gguf(q, ge.GgufConfig(), None, tmp_path / "g")
    m = art.history[-1]["metrics"]
    assert art.format == "gguf" and m["arch"] == "llama" and m["file_type"] == want
    assert m["max_err_steps"] < 0.07 and m["tensors_checked"] == 2 * 9 + 3
    reader = gguf.GGUFReader(str(art.path / "model.gguf"))
    raw = {t.name: t for t in reader.tensors}
    back = ge.read_gguf_tensors(art.path / "model.gguf")
    meta = read_quant_meta(q.path)["layers"]
    from safetensors.torch import load_file

    st = load_file(str(q.path / "model.safetensors"))
    from edgepack.compress.quant_torch import dequantized_weight

    hf = {v: k for k, v in ge.LAYER_TENSORS.items()}
    for name, t in raw.items():
        if not name.startswith("blk.") or "norm" in name:
            continue
        i, part = name.split(".")[1], name.split(".")[2]
        base = f"model.layers.{i}.{hf[part]}"
        assert t.tensor_type.name == want, name
        ours = dequantized_weight(base, meta[base], st).numpy()
        codes = unpack_codes(st[f"{base}.qweight"], meta[base]["bits"]).numpy()
        heads = {"attn_q": 4, "attn_k": 2}.get(part)
        if heads:
            ours, codes = ge._permute_rows(ours, heads), ge._permute_rows(codes, heads)
        if want == "Q8_0":
            got_codes = (np.asarray(t.data, dtype=np.uint8).reshape(codes.shape[0], -1, 34)[..., 2:]
                         .view(np.int8).reshape(codes.shape[0], -1).astype(np.int16) + 128)
        else:
            got_codes = _q4_codes(t)
        np.testing.assert_array_equal(got_codes, codes.astype(np.int16 if want == "Q8_0" else np.uint8))
        step = float(st[f"{base}.scales"].abs().max())
        assert np.abs(back[name] - ours).max() <= 0.07 * step, name
    emb = torch.from_numpy(back["token_embd.weight"])  # float in our artifact: Q8_0 (head_type) of the fp32 matrix
    assert raw["token_embd.weight"].tensor_type.name == "Q8_0" and tuple(emb.shape) == (512, 64)
    np.testing.assert_allclose(emb.numpy(), st["model.embed_tokens.weight"].numpy(), atol=0.01)


def test_qwen2_biases_tied_head_and_float_types(tiny_qwen2, tmp_path):
    from safetensors.numpy import load_file

    art = ge.export_gguf(open_artifact(tiny_qwen2), ge.GgufConfig(type="f32", head_type="f32"), None, tmp_path / "g")
    m = art.history[-1]["metrics"]
    assert m["arch"] == "qwen2" and "output.weight" not in m["tensors"]  # tied: llama.cpp reuses token_embd
    back = ge.read_gguf_tensors(art.path / "model.gguf")
    st = load_file(str(tiny_qwen2 / "model.safetensors"))
    for i in range(2):  # qwen2: no q/k permutation (NEOX rope), biases kept
        for p, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            np.testing.assert_array_equal(back[f"blk.{i}.{g}.weight"], st[f"model.layers.{i}.self_attn.{p}.weight"])
            np.testing.assert_array_equal(back[f"blk.{i}.{g}.bias"], st[f"model.layers.{i}.self_attn.{p}.bias"])
    np.testing.assert_array_equal(back["token_embd.weight"], st["model.embed_tokens.weight"])
    reader = gguf.GGUFReader(str(art.path / "model.gguf"))
    f = reader.fields
    assert bytes(f["general.architecture"].parts[-1]).decode() == "qwen2"
    assert int(f["qwen2.attention.head_count_kv"].parts[-1][0]) == 2
    assert len(f["tokenizer.ggml.tokens"].data) == 512
    q4 = ge.export_gguf(open_artifact(tiny_qwen2), ge.GgufConfig(type="q4_0"), None, tmp_path / "g4")
    assert q4.history[-1]["metrics"]["tensor_types"]["Q4_0"] == 2 * 7


def test_same_input_same_bytes_and_nearest_types(tiny_model, tmp_path):
    q = _quantize(tiny_model, tmp_path / "q", method="int4-rtn", group_size=16)
    a = ge.export_gguf(q, ge.GgufConfig(), None, tmp_path / "a")
    b = ge.export_gguf(q, ge.GgufConfig(), None, tmp_path / "b")
    assert (a.path / "model.gguf").read_bytes() == (b.path / "model.gguf").read_bytes()
    m = a.history[-1]["metrics"]  # group 16 has no exact 32-wide block: the nearest finer type, said so
    assert m["tensor_types"]["Q8_0"] == 2 * 7 + 2 and m["file_type"] == "Q8_0"
    assert all("nearest" in v["source"] for k, v in m["tensors"].items() if k.startswith("blk.") and "norm" not in k)


def test_refusals_and_no_half_written_artifact(tiny_model, tmp_path, monkeypatch):
    from edgepack.cli import cli as main

    q = _quantize(tiny_model, tmp_path / "q", method="int4-rtn")
    r = CliRunner().invoke(main, ["export", "gguf", str(q.path), "-o", str(tmp_path / "x"), "--type", "q4_0"])
    assert r.exit_code == 1 and "error: a torch-quant artifact is written with its own codes" in r.output
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**json.loads((tiny_model / "config.json").read_text()),
                                                 "model_type": "gpt2"}))
    (bad / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="architectures llama, qwen2, not 'gpt2'"):
        ge.export_gguf(open_artifact(bad), ge.GgufConfig(), None, tmp_path / "y")
    onnx_like = tmp_path / "o"
    with pytest.raises(ArtifactError):
        ge.export_gguf(open_artifact(q.path), ge.GgufConfig(), None, q.path)  # non-empty output refused
    monkeypatch.setattr(ge, "MAX_ERR_STEPS", -1.0)  # the read-back check fails: nothing may be left behind
    with pytest.raises(ValidationFailed, match="quantization steps"):
        ge.export_gguf(q, ge.GgufConfig(), None, onnx_like)
    assert not onnx_like.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]
    r = CliRunner().invoke(main, ["export", "gguf", str(q.path), "-o", str(tmp_path / "z"), "--json"])
    assert r.exit_code == 1  # still patched: one error line, no traceback
    assert r.output.strip().startswith("error:") and "Traceback" not in r.output


@pytest.mark.skipif(not HAS_LLAMACPP, reason="llama-cpp-python is not installed (extra 'llamacpp')")
@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_llamacpp_runs_the_export_like_torch(tiny_model, tiny_qwen2, tmp_path, which):
    """llama.cpp on the f32 GGUF gives PyTorch's logits (so names, permutation, rope, biases are right), and on our
    int4 codes the torch-quant model's greedy tokens."""
    import torch

    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.runtime import open_runtime
    from edgepack.hf import load_model
    from edgepack.quality import probe_ids, sqnr_db

    src = tiny_model if which == "llama" else tiny_qwen2
    f32 = ge.export_gguf(open_artifact(src), ge.GgufConfig(type="f32", head_type="f32"), None, tmp_path / "f32")
    ids = probe_ids(512, length=24)
    with torch.no_grad():
        ref = load_model(open_artifact(src), device="cpu")(torch.as_tensor(ids)).logits.float().numpy()
    rt = open_runtime(f32, threads=1)
    got = rt.forward_logits(ids)
    assert sqnr_db(ref, got) > 60  # measured 74.6 dB (llama); a wrong q/k permutation or a lost bias: < 20 dB
    assert rt.describe()["runtime"] == "llama.cpp"  # bench / generate print it (no dist metadata needed)
    last = rt.prefill(ids)
    np.testing.assert_allclose(last[0], ref[0, -1], atol=1e-3 * max(1.0, np.abs(ref).max()))
    q = _quantize(src, tmp_path / "q", method="int4-rtn", symmetric=True)
    g = ge.export_gguf(q, ge.GgufConfig(head_type="f32"), None, tmp_path / "g")
    ours, theirs = open_runtime(q).forward_logits(ids), open_runtime(g, threads=1).forward_logits(ids)
    assert sqnr_db(ours, theirs) > 30  # same codes; llama.cpp's Q4_0 kernels round activations to 8 bits (44.6 dB)
    want = generate(open_runtime(q), ids[:, :8], GenerationConfig(max_new_tokens=16)).tokens
    got_toks = generate(open_runtime(g, threads=1), ids[:, :8], GenerationConfig(max_new_tokens=16)).tokens
    assert (np.asarray(want) == np.asarray(got_toks)).mean() >= 0.9


def test_gguf_bundles_for_targets_that_list_llamacpp(tiny_model, tmp_path):
    from edgepack.deploy.bundle import make_bundle
    from edgepack.errors import UnsupportedOnTarget
    from edgepack.targets import load_target

    q = _quantize(tiny_model, tmp_path / "q", method="int4-rtn", symmetric=True)
    g = ge.export_gguf(q, ge.GgufConfig(), None, tmp_path / "g")
    out = make_bundle(g, load_target("cpu-x86-64"), tmp_path / "b")
    assert "llama-cpp-python" in (out / "requirements.txt").read_text()
    assert json.loads((out / "runtime.json").read_text())["runtime"] == "llama.cpp"
    with pytest.raises(UnsupportedOnTarget, match="llama.cpp"):
        make_bundle(g, load_target("h100-sxm"), tmp_path / "b2")
