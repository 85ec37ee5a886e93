"""fp32 -> fp16 ONNX for TensorRT / GPU runtimes: torch.onnx cannot export fp16 on a CPU (no half kernels for
tracing), so the validated fp32 export is converted with onnxruntime's float16 converter. Inputs and outputs are
converted too (past / present KV and logits in fp16): a float32 KV interface would double the cache memory, which
on a shared-memory Jetson is the model's largest allocation after the weights. input_ids / attention_mask /
position_ids stay int64.

RMSNorm statistics and Softmax stay fp32 inside the fp16 graph (keep_fp32_). The converted graph is checked on the
fixed probe against the fp32 graph on onnxruntime (CPU): greedy tokens and the largest logit difference are
recorded, and a mismatch beyond fp16 rounding fails the compile. Q/DQ graphs (INT4 / INT8 for TensorRT) are checked
by check_shipped instead: logits and perplexity of the exact shipped file against the PyTorch model.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.errors import ValidationFailed, require

MIN_AGREEMENT = 0.9  # share of greedy tokens fp16 must reproduce (fp16 rounding may flip a near-tie late on)
CHECK_TOKENS = 16


def convert_fp16(src_dir: Path, dst_dir: Path, extra: dict, check: bool = True) -> dict:
    """Write dst_dir/<onnx_file> as fp16; returns the new extra with 'fp16_check' metrics (popped by the caller).
    `check` False: the caller validates the written graph itself (check_shipped)."""
    onnx = require("onnx", "onnx", "fp16 conversion")
    f16 = require("onnxruntime.transformers.float16", "onnx", "fp16 conversion (onnxruntime's float16 converter)")
    from edgepack.deploy.onnx_export import save_onnx, strip_debug_info

    name = extra.get("onnx_file", "model.onnx")
    model = onnx.load(str(Path(src_dir) / name), load_external_data=True)
    stripped = strip_debug_info(model)  # shipped fp16 and Q/DQ graphs alike: weights and structure only
    logits_positions_input_(model)
    model = f16.convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    keep = keep_fp32_(model.graph)
    save_onnx(model, Path(dst_dir) / name)
    new = {**extra, "dtype": "float16", "kv_dtype": "float16", "precision": extra.get("precision", "fp32"),
           "made_by": f"{extra.get('made_by', 'torch.onnx')} + onnxruntime float16 converter",
           "fp32_nodes": keep, "debug_info_bytes_stripped": stripped,
           "inputs": [*extra.get("inputs", []), LOGITS_POSITIONS]}
    if new["precision"] == "fp32":
        new["precision"] = "fp16"
    new["fp16_check"] = check_fp16(Path(src_dir), extra, Path(dst_dir), new) if check else {}
    return new


# int64 [n] graph input: the positions of this call's tokens that get logits (lm_head runs on those rows only).
# Generation passes [T - 1] (prefill allocates and computes [B, 1, V], not the whole prompt's [B, T, V]);
# perplexity passes 0..T-1 and gets every position from the same file.
LOGITS_POSITIONS = "logits_positions"


def logits_positions_input_(model) -> None:
    """Gather(hidden, logits_positions, axis=1) in front of lm_head (the MatMul that writes 'logits'), in place."""
    from onnx import TensorProto, helper

    graph = model.graph
    out = next((o for o in graph.output if o.name == "logits"), None)
    head = next((n for n in graph.node if "logits" in n.output), None)
    if out is None or head is None or head.op_type != "MatMul":
        raise ValidationFailed("the decoder graph has no lm_head MatMul writing 'logits'",
                               "export it with 'edgepack export onnx', and report the model")
    picked = f"{head.input[0]}.at_positions"
    gather = helper.make_node("Gather", [head.input[0], LOGITS_POSITIONS], [picked], name="logits_positions.Gather",
                              axis=1)
    head.input[0] = picked
    nodes = list(graph.node)
    nodes.insert(nodes.index(head), gather)  # topological order kept (TensorRT's parser reads nodes in order)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info(LOGITS_POSITIONS, TensorProto.INT64, ["logits_len"]))
    dims = out.type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].ClearField("dim_value")
        dims[1].dim_param = "logits_len"


# Op types kept in fp32 wherever they occur: softmax sums exp() over the whole context.
FP32_OPS = ("Softmax",)
_NORM_CHAIN = ("ReduceMean", "Add", "Sqrt", ("Reciprocal", "Div"), "Mul")  # after Pow(x, 2)


def rmsnorm_chains(graph) -> list[list]:
    """Every RMSNorm's statistics as node lists, x^2 -> mean -> + eps -> sqrt -> 1/sqrt -> x * that, matched by
    structure as both exporters write them (Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal | Div -> Mul)."""
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    chains = []
    for node in graph.node:
        if node.op_type != "Pow":
            continue
        chain, cur = [node], node
        for op in _NORM_CHAIN:
            nxt = [u for u in users.get(cur.output[0], []) if u.op_type in (op if isinstance(op, tuple) else (op,))]
            if len(nxt) != 1:
                break
            cur = nxt[0]
            chain.append(cur)
        else:
            if node.input[0] in cur.input:  # the last Mul scales the same x that was squared
                chains.append(chain)
    return chains


def keep_fp32_(graph) -> dict:
    """In a converted fp16 graph, run each RMSNorm's statistics and every Softmax in fp32: Cast(float) on the
    float tensors entering the island, Cast(float16) on those leaving it, placed next to it (the graph stays
    topologically sorted, as TensorRT's parser needs). transformers computes RMSNorm in fp32 because x^2
    overflows fp16 (max 65504) once an activation passes ~256; a strongly typed TensorRT network keeps these casts."""
    from onnx import TensorProto, helper

    islands = rmsnorm_chains(graph) + [[n] for n in graph.node if n.op_type in FP32_OPS]
    floats = (TensorProto.FLOAT16, TensorProto.FLOAT)
    const_types = {i.name: i.data_type for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            const_types[n.output[0]] = n.attribute[0].t.data_type
    ins = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    island_of = {id(n): k for k, isl in enumerate(islands) for n in isl}
    inside = [{o for n in isl for o in n.output} for isl in islands]
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    before, after, done = {}, {}, set()  # node id -> cast nodes to emit before / after it
    for k, isl in enumerate(islands):
        for node in isl:
            for i, name in enumerate(node.input):
                if not name or name in inside[k] or const_types.get(name, ins.get(name, TensorProto.FLOAT16)) not in floats:
                    continue
                cast = f"{name}.fp32.{k}"
                node.input[i] = cast
                if cast not in done:
                    before.setdefault(id(node), []).append(helper.make_node("Cast", [name], [cast], name=cast,
                                                                               to=TensorProto.FLOAT))
                    done.add(cast)
            for j, name in enumerate(node.output):
                leaves = name in outputs or any(island_of.get(id(u)) != k for u in users.get(name, []))
                if leaves:
                    node.output[j] = f"{name}.fp32"
                    after.setdefault(id(node), []).append(helper.make_node(
                        "Cast", [f"{name}.fp32"], [name], name=f"{name}.to_fp16", to=TensorProto.FLOAT16))
    now_fp32 = {o for isl in islands for n in isl for o in n.output}
    kept = [v for v in graph.value_info if v.name not in now_fp32]  # their fp16 declarations no longer hold
    del graph.value_info[:]
    graph.value_info.extend(kept)
    nodes = []
    for node in graph.node:
        nodes += before.get(id(node), []) + [node] + after.get(id(node), [])
    del graph.node[:]
    graph.node.extend(nodes)
    return {"rmsnorm": sum(1 for isl in islands if len(isl) > 1), "softmax": sum(1 for isl in islands if len(isl) == 1),
            "casts": len(done) + sum(len(v) for v in after.values())}


def check_fp16(ref_dir: Path, ref_extra: dict, dir16: Path, extra16: dict) -> dict:
    import numpy as np

    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.ort_runtime import OrtRuntime
    from edgepack.quality import probe_ids

    ref_rt, rt16 = OrtRuntime(ref_dir, ref_extra), OrtRuntime(dir16, extra16)
    probe = probe_ids(ref_extra["vocab_size"], length=8, seed=1)
    diff = float(np.abs(ref_rt.forward_logits(probe) - rt16.forward_logits(probe)).max())
    gen = GenerationConfig(max_new_tokens=CHECK_TOKENS)
    agree = float((generate(ref_rt, probe, gen).tokens == generate(rt16, probe, gen).tokens).mean())
    if not agree >= MIN_AGREEMENT:
        raise ValidationFailed(f"the fp16 ONNX agrees with fp32 on {agree:.0%} of greedy tokens "
                               f"(< {MIN_AGREEMENT:.0%}; max logit diff {diff:.3g})",
                               "compile with --precision fp32")
    return {"fp16_max_abs_logit_diff": round(diff, 5), "fp16_greedy_agreement": agree}


# The shipped graph (what the device builds its engine from), run here on onnxruntime against its reference.
CHECK_PPL_TOKENS = 4096  # held-out tokens scored (edgepack-ppl-v1) for the shipped graph and its reference
MIN_SHIPPED_SQNR_DB = {"fp16": 30.0, "int8": 25.0, "int4": 12.0}  # logits vs the reference on the fixed probe
MIN_SHIPPED_ARGMAX = 0.5  # teacher-forced next-token agreement on the probe (a miswired graph: ~1 / vocab)


def check_shipped(ship_dir: Path, extra: dict, ref_logits, ref_name: str, tok_dir: Path) -> dict:
    """Logit SQNR and argmax agreement (fixed probe, teacher-forced) and perplexity (edgepack-ppl-v1 on the held-out
    tail of the embedded TinyStories sample, CHECK_PPL_TOKENS tokens) of the exact file shipped, against
    `ref_logits` ([1, T] ids -> [1, T, V]): the PyTorch fp32 model, or the fp32 Q/DQ graph it was made from.
    Raises ValidationFailed below the floors: a wrongly built graph, not quantization noise."""
    from edgepack.deploy.ort_runtime import OrtRuntime
    from edgepack.hf import load_tokenizer
    from edgepack.quality import PplProtocol, logits_parity, perplexity, read_text, split_at_line, token_stream
    from edgepack.sources import embedded_path

    rt = OrtRuntime(Path(ship_dir), extra)
    parity = logits_parity(ref_logits, rt.forward_logits, extra["vocab_size"])
    precision = extra.get("precision", "fp16")
    floor = MIN_SHIPPED_SQNR_DB.get(precision, 12.0)
    if parity["sqnr_db"] < floor or parity["argmax_agreement"] < MIN_SHIPPED_ARGMAX:
        raise ValidationFailed(f"the shipped {precision} graph's logits are {parity['sqnr_db']} dB SQNR from {ref_name} "
                               f"with {parity['argmax_agreement']:.0%} argmax agreement (floors {floor} dB, "
                               f"{MIN_SHIPPED_ARGMAX:.0%}): the graph is wrong, not just quantized",
                               "compile with --precision fp16, and report the model")
    text, sha = read_text(embedded_path("tinystories-sample.txt"))
    proto = PplProtocol(max_tokens=CHECK_PPL_TOKENS).resolved(extra.get("max_positions"))
    ids = token_stream(load_tokenizer(tok_dir), split_at_line(text, 0.9)[1], proto)
    ref, got = perplexity(ref_logits, ids, proto), perplexity(rt.forward_logits, ids, proto)
    return {"shipped_vs": ref_name, "shipped_sqnr_db": parity["sqnr_db"],
            "shipped_argmax_agreement": parity["argmax_agreement"],
            "shipped_max_abs_logit_diff": round(parity["max_abs_diff"], 5),
            "ppl_reference": round(ref.perplexity, 5), "ppl_shipped": round(got.perplexity, 5),
            "ppl_increase_pct": round(100.0 * (got.perplexity / ref.perplexity - 1.0), 3),
            "ppl_protocol": {**got.protocol, "text": "embedded tinystories-sample.txt, held-out last 10%",
                             "text_sha256": sha}}
