"""onnxruntime-genai's model builder with its CPU k_quant run in row chunks on a thread pool. deploy/genai_builder.py
starts the builder through `python -c RUN_BUILDER BUILDER-ARGS...` (below) rather than `-m onnxruntime_genai...`.

Why: onnxruntime's `quant_tensor_k_quant_cpu` (onnxruntime/quantization/neural_compressor/weight_only.py, which
the builder's k_quant path calls once per MatMul) works on the whole weight at once, holding ~10 float32 / float64
temporaries of the weight's size through 20 scale-search steps. For a 151,936 x 896 lm_head that is ~7 GB of
temporaries and, measured on a Qwen2.5-0.5B-shaped model with 2 layers (this shared 2-core CPU), 168 s of the
builder's 218 s and a 7.0 GB peak. Every quantity in it is per group of 32 (row-wise reductions only), so running it
on chunks of CHUNK_GROUPS groups gives bit-identical codes, scales and zero points (checked by
tests/test_genai_builder.py) with temporaries of a few MB that stay in cache, and the chunks run on a thread pool
(numpy releases the GIL inside its array operations). Where onnxruntime's internals differ from what this expects,
the builder runs unpatched.
"""

from __future__ import annotations

import os
import runpy
import sys

CHUNK_GROUPS = 4096  # groups of 32 per chunk: 0.5 MB float32 temporaries


def chunked_k_quant(fn, workers: int | None = None):
    """A drop-in for quant_tensor_k_quant_cpu(data, num_bits, group_size) that runs `fn` chunk by chunk."""
    import numpy as np

    def one(chunk, num_bits, group_size):
        # the caller casts the codes to uint8 (weight_only.py rtn_quantize: q_weight.astype("uint8")); they are
        # integers in [0, 2^bits), so casting each chunk first is the same result without a float64 weight-sized copy
        q, scale, zero = fn(chunk, num_bits, group_size)
        return q.astype(np.uint8), scale, zero

    def run(data, num_bits=4, group_size=32):
        data = np.asarray(data)
        if data.ndim != 2 or data.shape[1] % group_size or data.size // group_size <= CHUNK_GROUPS:
            return fn(data, num_bits, group_size)
        # chunks of whole rows: rows of `data` (the transposed weight) are consecutive groups, so the chunks'
        # results in order are the whole tensor's, without copying it into one [groups, group_size] array first
        rows = max(1, CHUNK_GROUPS * group_size // data.shape[1])
        starts = range(0, data.shape[0], rows)
        n = max(1, min(workers or os.cpu_count() or 1, len(starts)))
        if n == 1:
            parts = [one(data[i:i + rows], num_bits, group_size) for i in starts]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(n) as ex:
                parts = list(ex.map(lambda i: one(data[i:i + rows], num_bits, group_size), starts))
        return tuple(np.concatenate(p) for p in zip(*parts))

    return run


def patch_k_quant() -> bool:
    """Swap onnxruntime's CPU k_quant for the chunked one; False (and nothing changed) where it is not found."""
    try:
        from onnxruntime.quantization.neural_compressor import weight_only as wo
    except ImportError:
        return False
    fn = getattr(wo, "quant_tensor_k_quant_cpu", None)
    if fn is None or getattr(fn, "__name__", "") == "run":
        return False
    wo.quant_tensor_k_quant_cpu = chunked_k_quant(fn)
    return True


def main() -> None:
    patched = patch_k_quant()
    print(f"edgepack: k_quant {'chunked' if patched else 'unpatched (onnxruntime internals changed)'}", flush=True)
    sys.argv = ["onnxruntime_genai.models.builder", *sys.argv[1:]]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)



# the subprocess' program: builder arguments follow it on the command line
RUN_BUILDER = "from edgepack.deploy.genai_run import main; main()"
