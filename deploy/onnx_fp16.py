"""fp32 -> fp16 ONNX for TensorRT / GPU runtimes: torch.onnx cannot export fp16 on a CPU (no half kernels for
tracing), so the validated fp32 export is converted with onnxruntime's float16 converter. Inputs and outputs are
converted too (past / present KV and logits in fp16): a float32 KV interface would double the cache memory, which
on a shared-memory Jetson is the model's largest allocation after the weights. input_ids / attention_mask /
position_ids stay int64.

The converted graph is checked on the fixed probe against the fp32 graph on onnxruntime (CPU): greedy tokens and
the largest logit difference are recorded, and a mismatch beyond fp16 rounding fails the compile.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.errors import ValidationFailed, require

MIN_AGREEMENT = 0.9  # share of greedy tokens fp16 must reproduce (fp16 rounding may flip a near-tie late on)
CHECK_TOKENS = 16


def convert_fp16(src_dir: Path, dst_dir: Path, extra: dict) -> dict:
    """Write dst_dir/<onnx_file> as fp16; returns the new extra with 'fp16_check' metrics (popped by the caller)."""
    onnx = require("onnx", "onnx", "fp16 conversion")
    f16 = require("onnxruntime.transformers.float16", "onnx", "fp16 conversion (onnxruntime's float16 converter)")
    from edgepack.deploy.onnx_export import EXTERNAL_DATA_FILE, EXTERNAL_DATA_THRESHOLD

    name = extra.get("onnx_file", "model.onnx")
    model = onnx.load(str(Path(src_dir) / name), load_external_data=True)
    model = f16.convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    large = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    kw = ({"save_as_external_data": True, "all_tensors_to_one_file": True, "location": EXTERNAL_DATA_FILE,
           "size_threshold": 1024} if large else {})
    onnx.save_model(model, str(Path(dst_dir) / name), **kw)
    new = {**extra, "dtype": "float16", "kv_dtype": "float16", "precision": "fp16",
           "made_by": f"{extra.get('made_by', 'torch.onnx')} + onnxruntime float16 converter"}
    new["fp16_check"] = check_fp16(Path(src_dir), extra, Path(dst_dir), new)
    return new


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
                               "compile with --precision fp32 (the engine can still use FP16 kernels via bf16)")
    return {"fp16_max_abs_logit_diff": round(diff, 5), "fp16_greedy_agreement": agree}
