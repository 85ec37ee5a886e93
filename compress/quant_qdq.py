"""Explicit-quantization (Q/DQ) ONNX for TensorRT: our calibrated codes as `DequantizeLinear` weights feeding the
decoder's MatMuls, the form TensorRT's strongly typed builder turns into weight-only INT4 (W4A16) and INT8 GEMMs.

    int4  signed INT4 initializer [K, N] (the MatMul's B layout), blocked along K (`axis=0`, `block_size` = the
          group size), scales [K / block, N], no zero point: TensorRT's DequantizeLinear takes INT4 blocks only
          symmetric. Our symmetric grid stores codes 0..15 around zero 8, so the signed value is `code ^ 8`.
    int8  signed INT8 initializer [K, N], one scale per output channel (`axis=1`), no zero point.

The codes are exactly those quant_algos produced (GPTQ / GPTQ-KD / RTN, symmetric), so the graph that is measured
here on onnxruntime (which runs blocked INT4 DequantizeLinear on the CPU) is the one the device builds.

A layer whose input width is not a multiple of the block (stories260K's MLP down_proj: 172 = 5 x 32 + 12) keeps the
padded last block (its padding codes are the zero point, i.e. exactly 0) and the activation is zero-padded to the
same width (`Pad`), so blocks always divide the quantized axis as TensorRT requires; the product is unchanged.
Real checkpoints (hidden 1536, MLP 8960, ...) are multiples of 128 and get no Pad.

Blocked DequantizeLinear and the INT4 type need ONNX opset 21; the default domain's opset is raised to 21 (the
operators this decoder uses have the same meaning in 18..21).
"""

from __future__ import annotations

from pathlib import Path

from edgepack.errors import ConfigError, ValidationFailed

QDQ_OPSET = 21
# INT4 block sizes written for TensorRT (weight-only INT4 GEMM; NVIDIA's Edge-LLM and ModelOpt use 128)
TRT_INT4_BLOCKS = (32, 64, 128)
SCHEME = "qdq"  # extra["quantization"]["scheme"] of these graphs


def write_qdq_quant(model, src, cfg, dst: Path, calib) -> dict:
    """quant_onnx.write_onnx_quant for TensorRT: quantize (our codes, symmetric), export the fp32 decoder whose
    linears hold the dequantized weights, and swap each linear's weight for DequantizeLinear(codes)."""
    from edgepack.compress.quant_methods import quantize_weights_
    from edgepack.compress.quant_onnx import export_fp32, linear_digests, onnx_quant_result

    info: dict = {}
    qweights = quantize_weights_(model, cfg, calib, info)  # int8: per output channel, symmetric
    digests = linear_digests(model)
    extra = export_fp32(model, src.path, dst, cfg.exporter)
    details = pack_qdq(dst / extra.get("onnx_file", "model.onnx"), digests, qweights, cfg.quantize_embeddings) | info
    extra["opset"] = max(int(extra.get("opset", 0)), QDQ_OPSET)
    return onnx_quant_result(cfg, extra, details, {"scheme": SCHEME})


def qdq_target(target) -> bool:
    """True for targets whose ONNX goes to TensorRT built on the device (Jetson): they get Q/DQ graphs."""
    return target is not None and target.engine_build == "device" and target.supports(runtime="tensorrt")


QDQ_METHODS = ("int8", "int4-rtn", "int4-gptq", "int4-gptq-kd", "int4-awq")  # symmetric integer codes


def qdq_config(cfg, target):
    """The quantize config for a TensorRT Q/DQ graph: symmetric codes (TensorRT's DequantizeLinear takes no zero
    points), a block size TensorRT takes. Raises ConfigError before any weights load."""
    from dataclasses import replace

    if cfg.method not in QDQ_METHODS:
        raise ConfigError(f"'{cfg.method}' has no TensorRT (Q/DQ) form for target '{target.name}': TensorRT's "
                          "DequantizeLinear is symmetric, without zero points",
                          f"use one of {', '.join(QDQ_METHODS)}")
    if cfg.method != "int8" and cfg.group_size not in TRT_INT4_BLOCKS:
        raise ConfigError(f"TensorRT INT4 weights need a block size of {', '.join(map(str, TRT_INT4_BLOCKS))}, "
                          f"not {cfg.group_size}", "pass --group-size 128 (or 64 / 32)")
    return replace(cfg, symmetric=True)


def _int4_tensor(name: str, signed_codes):
    """ONNX INT4 initializer from int8 values in [-8, 7] of any shape (two per byte, element 2i in the low nibble)."""
    import numpy as np
    from onnx import TensorProto, helper

    flat = (np.asarray(signed_codes, dtype=np.int16).reshape(-1) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = flat[0::2] | (flat[1::2] << 4)
    return helper.make_tensor(name, TensorProto.INT4, list(signed_codes.shape), packed.tobytes(), raw=True)


def qdq_weight(name: str, qw) -> tuple[list, dict, int]:
    """(initializers, DequantizeLinear attributes, padded K) for one QuantizedWeight (symmetric codes)."""
    import numpy as np
    from onnx import numpy_helper

    zero = 2 ** (qw.bits - 1)
    if not bool((qw.zeros == zero).all()):
        raise ValidationFailed(f"'{name}' has zero points: TensorRT's INT4 / INT8 DequantizeLinear is symmetric only",
                               "quantize with symmetric = true")
    n, groups = qw.scales.shape
    codes = qw.codes.numpy().astype(np.int16) - zero  # [N, K_pad] signed
    scales = qw.scales.numpy().astype(np.float32)
    k_pad = codes.shape[1]
    if qw.bits == 4:
        w = _int4_tensor(f"{name}.int4", np.ascontiguousarray(codes.T))  # [K_pad, N]
        s = numpy_helper.from_array(np.ascontiguousarray(scales.T), f"{name}.scale")  # [K_pad / block, N]
        return [w, s], {"axis": 0, "block_size": qw.group_size}, k_pad
    if groups != 1 or k_pad != qw.in_features:
        raise ValidationFailed(f"'{name}': int8 weights for TensorRT are per output channel (one group per row)",
                               "report this as a bug")
    w = numpy_helper.from_array(np.ascontiguousarray(codes.T).astype(np.int8), f"{name}.int8")  # [K, N]
    s = numpy_helper.from_array(np.ascontiguousarray(scales[:, 0]), f"{name}.scale")  # [N]
    return [w, s], {"axis": 1}, k_pad


def int8_rows(name: str, w, axis: int) -> tuple[list, dict]:
    """Symmetric round-to-nearest INT8 of a float [R, C] table, one scale per slice along `axis` (0: per row,
    1: per column): (initializers codes + scales, DequantizeLinear attributes)."""
    import numpy as np
    from onnx import numpy_helper

    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1 - axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shaped = scale[:, None] if axis == 0 else scale[None, :]
    codes = np.clip(np.rint(w / shaped), -127, 127).astype(np.int8)
    return [numpy_helper.from_array(codes, f"{name}.int8"), numpy_helper.from_array(scale, f"{name}.scale")], {"axis": axis}


def quantize_embeddings_(model) -> dict:
    """INT8 the token embedding (per row: DequantizeLinear -> Gather, a constant weight TensorRT dequantizes) and
    lm_head (per output channel: DequantizeLinear -> MatMul) of a decoder graph in place; the float tables are
    dropped when nothing else reads them. Returns what was quantized and the tables' relative rms error."""
    import numpy as np
    from onnx import helper, numpy_helper

    from edgepack.compress.quant_onnx import matmul_weights

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    if len(gathers) != 1:
        raise ValidationFailed(f"found {len(gathers)} Gather nodes on a 2-D constant table, expected the one token "
                               "embedding", "compile with quantize_embeddings = false, and report the model")
    emb, table = gathers[0], inits[gathers[0].input[0]]
    vocab = table.dims[0]
    heads = [(n, b, w) for n, b, w in matmul_weights(graph) if w.shape[1] == vocab]
    # the dynamo export's lm_head: MatMul(h, Transpose(table [V, H])). Tied (the embedding's own table): the one INT8
    # table feeds both, through the Transpose; untied: ship the [H, V] INT8 and drop the Transpose.
    dead, tied = set(), None
    producers = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        t = producers.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) > 1 else None
        if (not heads and tied is None and t is not None and t.op_type == "Transpose" and t.input[0] in inits
                and [list(a.ints) for a in t.attribute if a.name == "perm"] in ([[1, 0]], [])
                and list(inits[t.input[0]].dims)[0] == vocab):
            if t.input[0] == table.name:
                tied = t
                continue
            heads.append((n, t.input[0], numpy_helper.to_array(inits[t.input[0]]).T))
            if sum(t.output[0] in m.input for m in graph.node) == 1:
                dead.add(id(t))
    done, errs, new_inits, before = [], {}, [], {}
    for what, node, _b, w, axis, slot in (
            [("embed_tokens", emb, table.name, numpy_helper.to_array(table), 0, 0)]
            + [("lm_head", n, b, w, 1, 1) for n, b, w in heads[:1]]):
        qinit, attrs = int8_rows(what, w, axis)
        deq = qinit[0].name[:-len(".int8")] + ".dq"
        before[id(node)] = helper.make_node("DequantizeLinear", [qinit[0].name, qinit[1].name], [deq],
                                            name=f"{what}.DequantizeLinear", **attrs)
        node.input[slot] = deq
        new_inits += qinit
        back = numpy_helper.to_array(qinit[0]).astype(np.float32) * (
            numpy_helper.to_array(qinit[1])[:, None] if axis == 0 else numpy_helper.to_array(qinit[1])[None, :])
        errs[what] = round(float(np.sqrt(((back - w) ** 2).mean() / max((w ** 2).mean(), 1e-30))), 6)
        done.append(f"{what} INT8 per {'row' if axis == 0 else 'output channel'}")
    if tied is not None:
        tied.input[0] = emb.input[0]
        done.append("lm_head INT8 per output channel (tied: the embedding's INT8 table, transposed)")
    # the DequantizeLinear nodes read initializers only: first in the graph, before every reader (topological order)
    nodes = list(before.values()) + [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(nodes)
    read = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in read] + new_inits
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return {"embeddings_quantized": done, "embeddings_rel_rms_error": errs}


def pack_qdq(onnx_path: Path, digests: dict, qweights: dict, embeddings: bool = False) -> dict:
    """Replace the B initializer of each quantized linear's MatMul with DequantizeLinear(int codes, scales); with
    `embeddings` also the token embedding and lm_head (quantize_embeddings_)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from edgepack.compress.quant_onnx import swap_matmuls
    from edgepack.deploy.onnx_export import save_onnx

    padded = []

    def make(node, name, qw, w):
        inits, attrs, k_pad = qdq_weight(name, qw)
        w_name, a = f"{name}.dq", node.input[0]
        nodes = [helper.make_node("DequantizeLinear", [inits[0].name, inits[1].name], [w_name],
                                  name=f"{name}.DequantizeLinear", **attrs)]
        if k_pad != qw.in_features:  # zero-pad the activation to the padded block width
            pads = numpy_helper.from_array(np.array([0, k_pad - qw.in_features], dtype=np.int64), f"{name}.pads")
            axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{name}.pad_axes")
            inits += [pads, axes]
            nodes.append(helper.make_node("Pad", [a, pads.name, "", axes.name], [f"{name}.padded"], name=f"{name}.Pad"))
            a = f"{name}.padded"
            padded.append(name)
        nodes.append(helper.make_node("MatMul", [a, w_name], list(node.output), name=node.name or f"{name}.MatMul"))
        return inits, nodes

    model = onnx.load(str(onnx_path))
    replaced = swap_matmuls(model, digests, qweights, "DequantizeLinear nodes", make)
    emb = quantize_embeddings_(model) if embeddings else {"embeddings_quantized": []}
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < QDQ_OPSET:
            op.version = QDQ_OPSET
    save_onnx(model, onnx_path)  # a 1.5B model's fp32 embeddings alone pass protobuf's 2 GiB: external data
    qw0 = next(iter(qweights.values()))
    kind = (f"INT4 symmetric, blocks of {qw0.group_size} along K" if qw0.bits == 4
            else "INT8 symmetric, per output channel")
    return {"layers_quantized": replaced, "padded_layers": len(padded), **emb,
            "scheme": f"TensorRT explicit quantization: DequantizeLinear ({kind}, no zero point) -> MatMul, "
                      f"opset {QDQ_OPSET}"}
