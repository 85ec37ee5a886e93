"""The TensorRT build spec (trt_build.json): everything an engine build needs besides the ONNX file, written at
compile time on the host and read by the builder wherever it runs (on the device for `engine_build = "device"`).
No tensorrt import here: the spec, its trtexec equivalent and the engine cache key are plain data.

Two optimization profiles, because prefill and decode want different kernels:

    prefill  seq 1..max_context, past 0 (the cache starts empty)          opt: a typical prompt
    decode   seq 1, past 0..max_context-1                                  opt: half the context

Batch runs 1..max_batch in both. The workspace (TensorRT's scratch memory pool, bytes) is sized from the target's
usable memory, because on Jetson the builder shares DRAM with the OS: a quarter of what is left after the engine,
capped at 4 GiB (more does not speed up the tactic search for decoder layers of this size). `build_memory_bytes`
is what the pre-build check asks MemAvailable for: workspace + 3 x the graph's bytes (targets/fit.py, which counts
the same for `edgepack fit --runtime tensorrt`).
The network is strongly typed: the ONNX graph's types decide every layer's precision (no precision flags).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

from edgepack.artifact import load_json
from edgepack.errors import ArtifactError, ConfigError

SPEC_FILE = "trt_build.json"
SPEC_SCHEMA = 2  # 2: strongly typed (no precision builder flags), build memory estimate
TIMING_CACHE = "timing.cache"
MIB = 1024**2
# Precisions of the ONNX graph a strongly typed network builds: the graph carries them (fp16 tensors, INT4 / INT8
# DequantizeLinear weights), so no builder flag names a precision. TensorRT 11 removed weak typing
# (BuilderFlag.FP16 / BF16 / INT8 / INT4 are gone); strongly typed networks build the same on 10.x and 11.x.
TRT_PRECISIONS = ("fp32", "fp16", "int8", "int4")
MIN_TRT_MAJOR = 10  # strongly typed networks and INT4 blocked DequantizeLinear: TensorRT 10 (JetPack 6.1+)


def onnx_digest(onnx_path: Path) -> str:
    """sha256 of the ONNX graph and its external data file (if any): what an engine is built from."""
    h = hashlib.sha256()
    for p in sorted(Path(onnx_path).parent.glob(Path(onnx_path).name + "*")):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _shape(batch: int, layout: dict, seq: int | None = None, past: int | None = None) -> list[int]:
    if past is None:
        return [batch, seq]
    return [batch, layout["num_kv_heads"], past, layout["head_dim"]]


def build_spec(extra: dict, target, precision: str, *, onnx_sha256: str, engine_bytes: int, max_context: int,
               max_batch: int = 1, opt_prompt: int = 128) -> dict:
    """The build spec for an exported decoder (`extra` from the export: inputs, num_layers, num_kv_heads, head_dim)."""
    if precision not in TRT_PRECISIONS:
        raise ConfigError(f"the TensorRT path builds strongly typed {', '.join(TRT_PRECISIONS)} graphs, not "
                          f"{precision}", "use --precision fp16 (or --runtime torch-cuda for bf16 / fp8)")
    if max_context < 2 or max_batch < 1:
        raise ConfigError("max_context must be >= 2 tokens and max_batch >= 1", "fix the compile settings")
    opt_prompt = min(opt_prompt, max_context)
    opt_past = max_context // 2
    inputs = extra["inputs"]
    prefill, decode = {}, {}
    for name in inputs:
        if name == "input_ids" or name == "position_ids":
            prefill[name] = {"min": [1, 1], "opt": [1, opt_prompt], "max": [max_batch, max_context]}
            decode[name] = {"min": [1, 1], "opt": [1, 1], "max": [max_batch, 1]}
        elif name == "attention_mask":  # past + seq positions
            prefill[name] = {"min": [1, 1], "opt": [1, opt_prompt], "max": [max_batch, max_context]}
            decode[name] = {"min": [1, 1], "opt": [1, opt_past + 1], "max": [max_batch, max_context]}
        elif name == "logits_positions":  # the positions that get logits: the last one, or all (perplexity)
            prefill[name] = {"min": [1], "opt": [1], "max": [max_context]}
            decode[name] = {"min": [1], "opt": [1], "max": [1]}
        elif name.startswith("past_key_values."):
            prefill[name] = {"min": _shape(1, extra, past=0), "opt": _shape(1, extra, past=0),
                             "max": _shape(max_batch, extra, past=0)}
            decode[name] = {"min": _shape(1, extra, past=0), "opt": _shape(1, extra, past=opt_past),
                            "max": _shape(max_batch, extra, past=max_context - 1)}
        else:
            raise ArtifactError(f"the ONNX model has an input '{name}' the TensorRT build spec does not know",
                                "export it with 'edgepack export onnx' (decoder with KV cache)")
    from edgepack.targets.fit import trt_build_bytes, trt_workspace_bytes

    workspace = trt_workspace_bytes(engine_bytes, target)
    return {"schema": SPEC_SCHEMA, "onnx": extra.get("onnx_file", "model.onnx"), "onnx_sha256": onnx_sha256,
            "precision": precision, "strongly_typed": True, "io_dtype": extra.get("dtype", "float32"),
            "workspace_bytes": int(workspace), "engine_estimate_bytes": int(engine_bytes),
            "build_memory_bytes": trt_build_bytes(engine_bytes, target),
            "timing_cache": TIMING_CACHE, "max_batch": max_batch, "max_context": max_context,
            "profiles": [{"name": "prefill", "shapes": prefill}, {"name": "decode", "shapes": decode}],
            "target": target.name, "sm": target.sm, "engine_build": target.engine_build}


def write_spec(spec: dict, directory: Path) -> Path:
    p = Path(directory) / SPEC_FILE
    p.write_text(json.dumps(spec, indent=1) + "\n")
    return p


def read_spec(directory: Path) -> dict:
    p = Path(directory) / SPEC_FILE
    if not p.is_file():
        raise ArtifactError(f"'{directory}' has no {SPEC_FILE} (the TensorRT build spec)",
                            "compile the model for a TensorRT target: edgepack compile MODEL --target jetson-...")
    spec = load_json(p, "re-run edgepack compile")
    if spec.get("schema") != SPEC_SCHEMA:
        raise ArtifactError(f"{p} has schema {spec.get('schema')}, this edgepack reads {SPEC_SCHEMA}",
                            "compile again with this edgepack version")
    return spec


def _dims(shapes: dict, which: str) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in shapes.items())


def trtexec_command(spec: dict, onnx_path: Path, engine_path: Path, timing_cache: Path | None = None) -> str:
    """The equivalent trtexec command line (one --minShapes/--optShapes/--maxShapes group per optimization
    profile, in order; trtexec makes one profile per group). For building by hand where the Python bindings are
    missing: JetPack ships trtexec in /usr/src/tensorrt/bin."""
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    for prof in spec["profiles"]:
        args += [f"--minShapes={_dims(prof['shapes'], 'min')}", f"--optShapes={_dims(prof['shapes'], 'opt')}",
                 f"--maxShapes={_dims(prof['shapes'], 'max')}"]
    args.append("--stronglyTyped")  # precision comes from the graph (TensorRT 10 and 11)
    args.append(f"--memPoolSize=workspace:{spec['workspace_bytes'] // MIB}M")
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(a) for a in args)


def engine_key(trt_version: str, sm: int, onnx_sha256: str, module: str) -> str:
    """Engines are only valid for the TensorRT version and GPU architecture that built them, and the graph; the
    device module (SM count and memory: Orin Nano 4GB vs 8GB, NX 8GB vs 16GB share sm_87) picks its tactics."""
    return f"trt{trt_version}-sm{sm}-{module}-{onnx_sha256[:16]}"
