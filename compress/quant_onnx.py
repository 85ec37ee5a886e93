"""The ONNX path: export the fp32 decoder (deploy.onnx_export, KV cache included), then quantize its MatMuls.

- int8 (default `int8_onnx = "nbits"`): symmetric per-output-channel int8 codes in an 8-bit MatMulNBits (one
  block per row). Measured on stories260K (held-out TinyStories, edgepack-ppl-v1): -0.01 % perplexity with
  accuracy_level 4, against +1.08 % for onnxruntime's `quantize_dynamic` (MatMulInteger with per-tensor dynamic
  activation scales), which misses the project's 0.5 % bar; `int8_onnx = "dynamic"` keeps that path available.
- int4-*: our codes (RTN / GPTQ / HQQ from quant_algos) packed into `com.microsoft.MatMulNBits` nodes: B uint8
  [N, blocks, block_size / 2] (low nibble first), scales [N * blocks], zero points uint4-packed (RTN / GPTQ
  asymmetric), float (HQQ) or absent (symmetric: zero 8). `accuracy_level` 4 lets the CPU kernel quantize
  activations to int8 per block, which is what makes INT4 fast on CPU. A short last block (K = 172 with block 32)
  is padded as MatMulNBits defines it.

Which MatMul is which linear: the exporter stores each weight as a [K, N] initializer (W transposed) under a
generated name, so MatMuls are matched to torch linears by the content of their weight, not by name.
lm_head (a MatMul on the tied embedding for stories260K) and the embedding Gather are left fp32 on purpose,
matching the torch path; see compress/quantize.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgepack.errors import ValidationFailed, require

MS_DOMAIN = "com.microsoft"


def weight_digest(arr) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float32).tobytes()).hexdigest()


def linear_digests(model) -> dict[str, str]:
    """{sha256 of W^T as float32 bytes: linear name} for every quantizable linear, as the exporter will store it."""
    from edgepack.compress.quant_algos import quantizable_linears

    return {weight_digest(m.weight.detach().float().T.numpy()): name for name, m in quantizable_linears(model).items()}


def matmul_weights(graph) -> list[tuple[object, str, object]]:
    """(node, weight initializer name, [K, N] numpy weight) for every MatMul whose B is a constant initializer."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            out.append((node, node.input[1], numpy_helper.to_array(inits[node.input[1]])))
    return out


def export_fp32(model, src_path: Path, dst: Path, exporter: str) -> dict:
    """Export the (still fp32) model into dst like the export stage does; returns the runtime `extra`."""
    from edgepack.deploy.onnx_export import ExportConfig, export_decoder
    from edgepack.hf import copy_tokenizer

    extra = export_decoder(model, dst, ExportConfig(exporter=exporter))
    copy_tokenizer(src_path, dst)
    (dst / "config.json").write_text(model.config.to_json_string())
    return extra


def write_onnx_quant(model, src, cfg, dst: Path, calib) -> dict:
    """Quantize, export and write dst/model.onnx. Returns the metrics to record plus 'format' and 'extra'.

    The weight-only paths quantize first (AWQ may rescale norms), export the model whose linears now hold the
    dequantized weights, and swap those MatMuls for MatMulNBits holding the codes. onnxruntime's dynamic int8
    quantizes from the fp32 export itself."""
    require("onnx", "onnx", "ONNX quantization")
    require("onnxruntime", "onnx", "ONNX quantization")
    if cfg.method == "int8" and cfg.int8_onnx == "dynamic":
        digests = linear_digests(model)
        extra = export_fp32(model, src.path, dst, cfg.exporter)
        details = int8_dynamic(dst / extra.get("onnx_file", "model.onnx"), digests)
    else:
        from edgepack.compress.quant_methods import quantize_weights_

        info: dict = {}
        qweights = int8_per_channel_(model) if cfg.method == "int8" else quantize_weights_(model, cfg, calib, info)
        digests = linear_digests(model)
        extra = export_fp32(model, src.path, dst, cfg.exporter)
        details = pack_matmul_nbits(dst / extra.get("onnx_file", "model.onnx"), digests, qweights, cfg.accuracy_level)
        details |= info
    return onnx_quant_result(cfg, extra, details, {"accuracy_level": cfg.accuracy_level, "scheme": "nbits"})


def onnx_quant_result(cfg, extra: dict, details: dict, more: dict) -> dict:
    """What write_onnx_quant (and quant_qdq.write_qdq_quant) return: metrics plus 'format' and 'extra'."""
    precision = "int8" if cfg.method == "int8" else "int4"
    quant = {"method": cfg.method, "group_size": cfg.group_size if precision == "int4" else 0,
             "symmetric": cfg.symmetric or precision == "int8", **more,
             "kept_fp32": ["embed_tokens (Gather)", "lm_head (MatMul)"]}
    return {"format": "onnx", "extra": {**extra, "precision": precision, "quantization": quant}, **details}


def int8_per_channel_(model) -> dict:
    """Symmetric int8 codes per output channel, laid out as one MatMulNBits block per row: the block size is the
    input width rounded up to a power of two (MatMulNBits' rule), the padding holds the zero point."""
    import torch

    from edgepack.compress.quant_algos import quantizable_linears, rtn

    out = {}
    with torch.no_grad():
        for name, m in quantizable_linears(model).items():
            block = max(16, 1 << (m.in_features - 1).bit_length())
            out[name] = rtn(m.weight, 8, block, symmetric=True)
            m.weight.copy_(out[name].dequantize())
    return out


def _unmatched(pairs, digests) -> list[str]:
    return [node.name for node, _, w in pairs if weight_digest(w) not in digests]


def int8_dynamic(onnx_path: Path, digests: dict) -> dict:
    """onnxruntime quantize_dynamic on the decoder's linears only (lm_head and attention matmuls stay fp32)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(onnx_path)).graph
    pairs = matmul_weights(graph)
    matched = [node.name for node, _, w in pairs if weight_digest(w) in digests]
    if len(matched) != len(digests):
        raise ValidationFailed(f"found {len(matched)} of the model's {len(digests)} linear layers in the ONNX graph",
                               "the exporter changed the weight layout; report this as a bug")
    tmp = onnx_path.with_suffix(".fp32.onnx")
    onnx_path.rename(tmp)
    quantize_dynamic(str(tmp), str(onnx_path), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=_unmatched(pairs, digests),
                     extra_options={"MatMulConstBOnly": True})
    tmp.unlink()
    return {"layers_quantized": len(matched), "scheme": "onnxruntime quantize_dynamic: int8 weights per channel, "
            "int8 activations per tensor at run time (MatMulInteger)"}


def swap_matmuls(model, digests: dict, qweights: dict, what: str, make) -> int:
    """Replace each quantized linear's MatMul (found by the content of its weight) with the nodes that
    `make(node, name, qw, w)` returns as (initializers, nodes); drop the float weights no longer read and the
    dynamo exporter's per-node debug metadata (strip_debug_info). Returns the count."""
    from edgepack.deploy.onnx_export import strip_debug_info

    graph = model.graph
    pairs = matmul_weights(graph)
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    replaced, dead = 0, set()
    new_nodes = []
    for node in graph.node:
        hit = next(((b, w) for n, b, w in pairs if n is node), None)
        name = digests.get(weight_digest(hit[1])) if hit is not None else None
        if name is None:
            new_nodes.append(node)
            continue
        inits, nodes = make(node, name, qweights[name], hit[1])
        graph.initializer.extend(inits)
        new_nodes += nodes
        if consumers.get(hit[0], 0) == 1:
            dead.add(hit[0])
        replaced += 1
    if replaced != len(qweights):
        raise ValidationFailed(f"put {replaced} of {len(qweights)} quantized layers into {what}",
                               "the exporter changed the weight layout; report this as a bug")
    del graph.node[:]
    graph.node.extend(new_nodes)
    keep = [i for i in graph.initializer if i.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    strip_debug_info(model)
    return replaced


def pack_matmul_nbits(onnx_path: Path, digests: dict, qweights: dict, accuracy_level: int) -> dict:
    """Replace each quantized linear's MatMul with a MatMulNBits holding exactly our codes, scales and zeros."""
    import onnx
    from onnx import helper, numpy_helper

    from edgepack.compress.quant_torch import pack_codes

    def make(node, name, qw, w):
        k, n = w.shape
        blocks, bits = qw.scales.shape[1], qw.bits
        b_arr = pack_codes(qw.codes, bits).numpy().reshape(n, blocks, qw.group_size * bits // 8)
        base = f"{name}.q{bits}"
        inits = [numpy_helper.from_array(b_arr, base + ".B"),
                 numpy_helper.from_array(qw.scales.numpy().astype("float32").reshape(-1), base + ".scales")]
        inputs = [node.input[0], base + ".B", base + ".scales"]
        zeros = qw.zeros
        if not bool((zeros == 2 ** (bits - 1)).all()):  # symmetric grids use MatMulNBits' default zero, 2^(bits-1)
            import torch

            if bool(torch.equal(zeros, torch.round(zeros))):
                z = zeros.to(torch.uint8)
                if bits == 4:  # two zero points per byte along the blocks of a row, low nibble first
                    if blocks % 2:
                        z = torch.cat([z, torch.zeros(n, 1, dtype=torch.uint8)], 1)
                    z = z[:, 0::2] | (z[:, 1::2] << 4)
                zp = z.numpy().reshape(-1)
            else:  # HQQ: float zero points, dequantized as (code - zero) * scale
                zp = zeros.numpy().astype("float32").reshape(-1)
            inits.append(numpy_helper.from_array(zp, base + ".zero_points"))
            inputs.append(base + ".zero_points")
        return inits, [helper.make_node("MatMulNBits", inputs, list(node.output), name=(node.name or base) + f"_Q{bits}",
                                        domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=qw.group_size,
                                        accuracy_level=accuracy_level)]

    model = onnx.load(str(onnx_path))
    replaced = swap_matmuls(model, digests, qweights, "MatMulNBits", make)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(model, str(onnx_path))
    qw0 = next(iter(qweights.values()))
    return {"layers_quantized": replaced, "scheme": f"MatMulNBits {qw0.bits}-bit, block {qw0.group_size}, "
            f"accuracy_level {accuracy_level}"}
