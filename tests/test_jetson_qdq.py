"""Jetson INT4 / INT8 through TensorRT's explicit quantization (issue 14): our symmetric codes as DequantizeLinear
weights (compress/quant_qdq.py), the fp16 graph with RMSNorm / softmax kept fp32 (deploy/onnx_fp16.py), and the
exact shipped file checked on onnxruntime against the PyTorch model (logits, perplexity, size)."""

from __future__ import annotations

import numpy as np
import pytest

from edgepack.artifact import open_artifact
from edgepack.errors import ConfigError
from edgepack.targets import load_target

ORIN = load_target("jetson-orin-nano-8gb")


def _run_dq_matmul(qw, x: np.ndarray) -> np.ndarray:
    """x @ W^T through DequantizeLinear -> (Pad) -> MatMul exactly as pack_qdq writes it, on onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgepack.compress.quant_qdq import QDQ_OPSET, qdq_weight
    from edgepack.deploy.ort_runtime import QDQ_ACCURACY_LEVEL

    inits, attrs, k_pad = qdq_weight("w", qw)
    nodes = [helper.make_node("DequantizeLinear", [inits[0].name, inits[1].name], ["wd"], **attrs)]
    a = "x"
    if k_pad != qw.in_features:
        pads = helper.make_tensor("pads", TensorProto.INT64, [2], [0, k_pad - qw.in_features])
        axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
        inits += [pads, axes]
        nodes.append(helper.make_node("Pad", ["x", "pads", "", "axes"], ["xp"]))
        a = "xp"
    nodes.append(helper.make_node("MatMul", [a, "wd"], ["y"]))
    n = qw.scales.shape[0]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", QDQ_OPSET)])
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", QDQ_ACCURACY_LEVEL)  # fp32 compute
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("bits,k,group", [(4, 172, 32), (4, 256, 128), (8, 172, 172)])
def test_dequantize_linear_runs_exactly_our_codes(bits, k, group):
    """The signed INT4 / INT8 initializers, blocked scales and the activation Pad reproduce the torch dequantized
    weight (QuantizedWeight.dequantize, what the quantize stage measured) to float rounding."""
    import torch

    from edgepack.compress import quant_algos as qa

    torch.manual_seed(0)
    w = torch.randn(48, k)
    qw = qa.rtn(w, bits, group, symmetric=True, clip_search=True)
    assert int(qw.codes.min()) >= 0 and (bits == 8 or int(qw.codes.max()) <= 15)
    x = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    want = x @ qw.dequantize().numpy().T
    got = _run_dq_matmul(qw, x)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))


def test_qdq_refuses_zero_points_and_block_sizes_tensorrt_lacks():
    import torch

    from edgepack.compress import quant_algos as qa
    from edgepack.compress.quant_qdq import qdq_config, qdq_target, qdq_weight
    from edgepack.compress.quantize import QuantizeConfig
    from edgepack.errors import ValidationFailed

    assert qdq_target(ORIN) and not qdq_target(load_target("h100-sxm")) and not qdq_target(load_target("cpu-x86-64"))
    with pytest.raises(ValidationFailed, match="zero points"):
        qdq_weight("w", qa.rtn(torch.randn(8, 64), 4, 32, symmetric=False))
    with pytest.raises(ConfigError, match="block size of 32, 64, 128, not 16"):
        qdq_config(QuantizeConfig(method="int4-gptq", group_size=16), ORIN)
    with pytest.raises(ConfigError, match="no TensorRT"):
        qdq_config(QuantizeConfig(method="int4-hqq"), ORIN)
    assert qdq_config(QuantizeConfig(method="int4-gptq", symmetric=False), ORIN).symmetric


def test_rmsnorm_statistics_stay_fp32_in_the_fp16_graph(tmp_path):
    """Activations past ~256 overflow x^2 in fp16 (max 65504). With embeddings scaled so the residual stream
    reaches ~1000, the fp16 graph must still follow the fp32 one: RMSNorm's Pow / ReduceMean / Add / Sqrt /
    Reciprocal / Mul and Softmax run in fp32 inside it."""
    import onnx
    import torch
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from edgepack.deploy.compile import CompileConfig, compile_stage
    from edgepack.hf import copy_tokenizer
    from edgepack.sources import embedded_path

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20000.0)  # init std 0.02 -> ~400, tails past 1000
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    copy_tokenizer(embedded_path("stories260K"), tmp_path / "m")
    art = compile_stage(open_artifact(tmp_path / "m"), CompileConfig(precision="fp16", exporter="torchscript",
                                                                      max_context=64), ORIN, tmp_path / "o")
    m = art.history[-1]["metrics"]
    assert m["fp16_greedy_agreement"] >= 0.9 and np.isfinite(m["fp16_max_abs_logit_diff"])
    assert art.extra["fp32_nodes"]["rmsnorm"] == 3 and art.extra["fp32_nodes"]["softmax"] == 1  # 2 norms a layer + final
    g = onnx.load(str(art.path / "model.onnx")).graph
    producers = {o: n for n in g.node for o in n.output}
    pows = [n for n in g.node if n.op_type == "Pow"]
    assert len(pows) == 3
    order = {n.name: i for i, n in enumerate(g.node)}
    for n in pows + [n for n in g.node if n.op_type == "Softmax"]:
        src = producers[n.input[0]]
        to = {a.name: a.i for a in src.attribute}.get("to")
        assert src.op_type == "Cast" and to == onnx.TensorProto.FLOAT, n.name
    for n in g.node:  # still topologically sorted (TensorRT's parser reads nodes in order)
        assert all(order[producers[i].name] < order[n.name] for i in n.input if i in producers), n.name


# ------------------------------------------------------------------------------------------ the shipped graphs
@pytest.fixture(scope="module")
def shipped(stories, tmp_path_factory):
    from edgepack.deploy.compile import CompileConfig, compile_stage

    d = tmp_path_factory.mktemp("jetson-qdq")
    return {p: compile_stage(open_artifact(stories), CompileConfig(precision=p, int4_method="int4-gptq", group_size=32,
                                                                   exporter="torchscript", max_context=256), ORIN, d / p)
            for p in ("int4", "int8")}


def _dq_layers(path):
    import onnx

    model = onnx.load(str(path / "model.onnx"))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    return model, g, inits, dq


@pytest.mark.slow  # GPTQ + export + fp16 conversion + onnxruntime perplexity of stories260K, twice (~2 min)
def test_jetson_int4_and_int8_graphs_are_what_tensorrt_takes_and_were_measured(shipped):
    """Default Jetson compile = INT4 (W4A16): blocked signed INT4 DequantizeLinear (block 32, no zero point) into
    every decoder linear, opset 21, fp16 everywhere else; INT8 per output channel. The exact shipped file, run on
    onnxruntime, against the PyTorch fp32 model: perplexity (edgepack-ppl-v1), logit SQNR, argmax agreement; and the
    quantized weights' bytes against their fp16 size."""
    import math

    import onnx

    from edgepack.deploy import trt_spec

    for prec, art in shipped.items():
        model, g, inits, dq = _dq_layers(art.path)
        m = art.history[-1]["metrics"]
        assert art.extra["precision"] == prec and art.extra["quantization"]["scheme"] == "qdq"
        assert art.extra["quantization"]["symmetric"] and trt_spec.read_spec(art.path)["precision"] == prec
        assert len(dq) == 37 and not [n for n in g.node if n.op_type == "MatMulNBits"]
        assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 21
        # quantize_embeddings (default): token table INT8 per row into the Gather, lm_head INT8 per output channel
        table = [n for n in dq if n.name.startswith("embed_tokens.")]
        head = [n for n in dq if n.name.startswith("lm_head.")]
        assert len(table) == 1 and len(head) == 1
        assert {a.name: a.i for a in table[0].attribute} == {"axis": 0}
        assert {a.name: a.i for a in head[0].attribute} == {"axis": 1}
        assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in table + head)
        assert [n.op_type for n in g.node if table[0].output[0] in n.input] == ["Gather"]
        assert not [i for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT16 and len(i.dims) == 2 and 512 in i.dims]
        assert art.history[-2]["metrics"]["embeddings_quantized"] == ["embed_tokens INT8 per row",
                                                                      "lm_head INT8 per output channel"]
        dq = [n for n in dq if n not in table + head]
        want = onnx.TensorProto.INT4 if prec == "int4" else onnx.TensorProto.INT8
        for n in dq:
            attrs = {a.name: a.i for a in n.attribute}
            assert len(n.input) == 2 and inits[n.input[0]].data_type == want  # no zero point
            assert inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16
            assert attrs == ({"axis": 0, "block_size": 32} if prec == "int4" else {"axis": 1})
        q_bytes = sum(inits[n.input[i]].ByteSize() for n in dq for i in (0, 1))
        fp16_bytes = sum(2 * math.prod(inits[n.input[0]].dims) for n in dq)
        assert m["shipped_vs"] == "the PyTorch fp32 model" and m["ppl_protocol"]["name"] == "edgepack-ppl-v1"
        if prec == "int4":
            assert len([n for n in g.node if n.op_type == "Pad"]) == 5  # down_proj: 172 = 5 x 32 + 12
            assert q_bytes <= 0.35 * fp16_bytes
            assert m["ppl_increase_pct"] < 10.0 and m["shipped_sqnr_db"] > 20 and m["shipped_argmax_agreement"] > 0.7
        else:
            assert q_bytes <= 0.55 * fp16_bytes
            assert abs(m["ppl_increase_pct"]) < 0.5 and m["shipped_sqnr_db"] > 40 and m["shipped_argmax_agreement"] > 0.95


def _embed_head_graph(tmp_path, vocab=40, hidden=16, transposed=False, tied=False):
    """Gather(token table) -> MatMul(lm_head [H, V]) with per-node debug metadata, as the exporters write it
    (`transposed`: the dynamo export's tied head, MatMul(h, Transpose([V, H])))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    head = rng.standard_normal((hidden, vocab)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h"], name="emb"),
             helper.make_node("MatMul", ["h", "head"], ["logits"], name="lm_head", doc_string="trace")]
    if transposed or tied:
        nodes.insert(1, helper.make_node("Transpose", ["embed" if tied else "head_t"], ["head"], perm=[1, 0]))
        head = table.T if tied else head
    for n in nodes:
        n.metadata_props.add(key="pkg.torch.onnx.stack_trace", value="x" * 500)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "T"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "T", vocab])],
                              [numpy_helper.from_array(table, "embed")] + (
                                  [] if tied else [numpy_helper.from_array(np.ascontiguousarray(head.T), "head_t")]
                                  if transposed else [numpy_helper.from_array(head, "head")]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, str(tmp_path / "model.onnx"))
    return model, table, head


@pytest.mark.parametrize("transposed,tied", [(False, False), (True, False), (True, True)])
def test_embedding_and_lm_head_go_int8_through_dequantize_linear(tmp_path, transposed, tied):
    """quantize_embeddings: the token table as INT8 per row (DequantizeLinear -> Gather), lm_head INT8 per output
    channel (DequantizeLinear -> MatMul; the dynamo export's Transpose of a tied [V, H] head folded away), float
    tables dropped, logits within INT8 rounding on onnxruntime."""
    import onnx
    import onnxruntime as ort

    from edgepack.compress.quant_qdq import quantize_embeddings_

    model, table, head = _embed_head_graph(tmp_path, transposed=transposed, tied=tied)
    info = quantize_embeddings_(model)
    onnx.checker.check_model(model)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    ids = np.array([[3, 7, 39, 0]], dtype=np.int64)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids})[0]
    want = table[ids] @ head
    assert 0 < np.abs(got - want).max() < 0.02 * np.abs(want).max()
    if tied:  # one INT8 table for both, the head reading it through the export's Transpose
        assert set(inits) == {"embed_tokens.int8", "embed_tokens.scale"}
        assert [n.input[0] for n in g.node if n.op_type == "Transpose"] == ["embed_tokens.dq"]
        assert info["embeddings_quantized"][1].startswith("lm_head INT8 per output channel (tied")
        return
    assert set(inits) == {"embed_tokens.int8", "embed_tokens.scale", "lm_head.int8", "lm_head.scale"}
    dq = {n.name: n for n in g.node if n.op_type == "DequantizeLinear"}
    assert {a.name: a.i for a in dq["embed_tokens.DequantizeLinear"].attribute} == {"axis": 0}
    assert {a.name: a.i for a in dq["lm_head.DequantizeLinear"].attribute} == {"axis": 1}
    assert all(inits[f"{w}.int8"].data_type == onnx.TensorProto.INT8 for w in ("embed_tokens", "lm_head"))
    assert list(inits["embed_tokens.scale"].dims) == [40] and list(inits["lm_head.scale"].dims) == [40]
    assert list(inits["lm_head.int8"].dims) == [16, 40] and not [n for n in g.node if n.op_type == "Transpose"]
    assert info["embeddings_quantized"] == ["embed_tokens INT8 per row", "lm_head INT8 per output channel"]
    assert 0 < info["embeddings_rel_rms_error"]["embed_tokens"] < 0.01


def test_shipped_graphs_carry_no_debug_metadata(tmp_path):
    """The fp16 conversion (every shipped Jetson graph: fp16 and Q/DQ alike) drops per-node debug metadata and
    doc strings, so file sizes compare weights and structure only."""
    import onnx

    from edgepack.deploy.onnx_fp16 import convert_fp16

    _embed_head_graph(tmp_path)
    (tmp_path / "out").mkdir()
    extra = convert_fp16(tmp_path, tmp_path / "out", {"onnx_file": "model.onnx"}, check=False)
    assert extra["debug_info_bytes_stripped"] > 1000
    g = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    assert all(not n.metadata_props and not n.doc_string for n in g.node)


def test_jetson_graph_gives_logits_of_the_positions_asked_for(tmp_path):
    """Issue 14's runtime point: prefill must not allocate the whole prompt's logits. The Jetson graph takes
    `logits_positions` (a Gather in front of lm_head): generation asks for the last position ([B, 1, V]),
    perplexity for all of them from the same file; the TensorRT profiles carry it (prefill 1..max_context, decode 1)."""
    import onnxruntime as ort
    import torch
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from edgepack.deploy import trt_spec
    from edgepack.deploy.compile import CompileConfig, compile_stage
    from edgepack.deploy.ort_runtime import OrtRuntime
    from edgepack.hf import copy_tokenizer
    from edgepack.sources import embedded_path

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval().save_pretrained(tmp_path / "m")
    copy_tokenizer(embedded_path("stories260K"), tmp_path / "m")
    art = compile_stage(open_artifact(tmp_path / "m"), CompileConfig(precision="fp16", exporter="torchscript",
                                                                      max_context=64), ORIN, tmp_path / "o")
    assert "logits_positions" in art.extra["inputs"]
    sess = ort.InferenceSession(str(art.path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "logits_positions" in [i.name for i in sess.get_inputs()]
    ids = np.array([[1, 5, 9, 30, 7, 2]], dtype=np.int64)
    rt = OrtRuntime(art.path, art.extra)
    every = rt.forward_logits(ids)
    assert every.shape == (1, 6, art.extra["vocab_size"])
    last = rt.prefill(ids)
    assert rt._decode_logits.shape == (1, 1, art.extra["vocab_size"])  # the buffer prefill wrote: one position
    assert np.abs(last - every[:, -1]).max() < 1e-2
    step = rt.decode_step(np.array([[11]]))
    assert np.abs(step - rt.forward_logits(np.append(ids, [[11]], 1))[:, -1]).max() < 5e-2
    prof = {p["name"]: p["shapes"]["logits_positions"] for p in trt_spec.read_spec(art.path)["profiles"]}
    assert prof["prefill"]["max"] == [64] and prof["decode"] == {"min": [1], "opt": [1], "max": [1]}
