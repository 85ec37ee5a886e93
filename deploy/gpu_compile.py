"""compile for CUDA targets: which GPU runtime, which precision, and the artifact each one runs.

    runtime    --runtime if given; else for `engine_build = "device"` targets (Jetson) `tensorrt`: the artifact is
               the exported ONNX (fp16 where the target runs it) plus trt_build.json, and the engine is built on
               the device (`edgepack device prepare`); else `tensorrt` when the tensorrt module imports and this
               machine has a CUDA GPU of the target's SM (engines are tied to both), else `torch-cuda`.
    precision  torch-cuda: bf16 where the target runs it, else fp16; int8 / int4 / fp8 are low-bit weights on disk
               (format `torch-cuda`, deploy/cuda_weights.py: the measured codes, packed for stock torch's kernels:
               int4 tinygemm, int8 weight-only, fp8 W8A8 on sm_89+), checked here as far as a CPU can and loaded
               on the GPU without a 16-bit copy; their quality is measured here on the kernels' exact weights.
               tensorrt (strongly typed, the graph carries the precision): fp16 or fp32; where the engine is built
               on the device (Jetson) also int4 (the default) and int8, our codes as Q/DQ (compress/quant_qdq.py).
               Every choice is checked against the target's list before any weights load.

Nothing is timed unless a CUDA device of the target's SM is present: the manifest says so (`measured_on`).
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import asdict
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, WorkDir, check_output_dir, link_files, stage_record
from edgepack.errors import ConfigError, UnsupportedOnTarget
from edgepack.facts import read_model_config
from edgepack.targets.profile import local_cuda_sm

TORCH_CUDA_PRECISIONS = ("bf16", "fp16", "fp32", "int8", "int4", "fp8")
TRT_PRECISIONS = ("fp16", "fp32")  # float graphs (strongly typed: the graph carries the type; deploy/trt_spec.py)
# TensorRT built on the device (Jetson): also our int4 / int8 codes as Q/DQ (compress/quant_qdq.py), int4 first
TRT_QDQ_PRECISIONS = ("int4", "int8")
DEFAULT_MAX_CONTEXT = 4096  # tokens: the static cache is allocated in full, so do not default to 128k contexts


def tensorrt_importable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def choose_gpu_path(cfg, target, src_precision: str | None) -> dict | None:
    """{runtime, precision, device, note, engine_build} for a CUDA target; None when the runtime is not a GPU one."""
    note = ""
    if cfg.runtime is not None:
        runtime = cfg.runtime
        if not target.supports(runtime=runtime):
            raise UnsupportedOnTarget(f"target '{target.name}' does not run '{runtime}'",
                                      f"its runtimes: {', '.join(target.runtimes)}")
    elif target.engine_build == "device" and target.supports(runtime="tensorrt"):
        runtime = "tensorrt"
    elif target.supports(runtime="tensorrt") and tensorrt_importable() and local_cuda_sm() == target.sm:
        runtime = "tensorrt"
    elif target.supports(runtime="torch-cuda"):
        runtime = "torch-cuda"
        if target.supports(runtime="tensorrt"):
            why = ("tensorrt is not installed" if not tensorrt_importable()
                   else f"no sm_{target.sm} GPU here to build the engine on")
            note = f"torch-cuda instead of tensorrt: {why}"
    else:
        return None
    if runtime not in ("torch-cuda", "tensorrt"):
        return None
    if runtime == "torch-cuda" and src_precision is not None:
        raise ConfigError("torch-cuda runs Hugging Face checkpoints; the source is an ONNX artifact",
                          "compile the model directory, or pass --runtime tensorrt to build from the ONNX")
    from edgepack.compress.quant_qdq import qdq_target

    trt = (*TRT_QDQ_PRECISIONS, *TRT_PRECISIONS) if qdq_target(target) else TRT_PRECISIONS
    legal = [p for p in (TORCH_CUDA_PRECISIONS if runtime == "torch-cuda" else trt) if target.supports(precision=p)]
    if not legal:
        raise UnsupportedOnTarget(f"target '{target.name}' lists no precision the {runtime} compile makes",
                                  f"its precisions: {', '.join(target.precisions)}")
    if runtime == "tensorrt" and src_precision is not None and (
            src_precision in TRT_QDQ_PRECISIONS or cfg.precision in TRT_QDQ_PRECISIONS):
        if cfg.precision not in (None, src_precision):  # a Q/DQ graph from the quantize stage compiles as it is
            raise ConfigError(f"the source ONNX artifact is {src_precision}; compile cannot re-quantize it to "
                              f"{cfg.precision}", "compile the Hugging Face checkpoint instead")
        precision = src_precision
    elif runtime == "tensorrt" and src_precision is not None:
        precision = cfg.precision or ("fp16" if "fp16" in legal else legal[0])
    elif runtime == "tensorrt" and legal[0] in TRT_QDQ_PRECISIONS:
        precision = cfg.precision or legal[0]  # Jetson: int4 weights by default (W4A16)
    else:
        precision = cfg.precision or ("bf16" if "bf16" in legal and runtime == "torch-cuda" else
                                      "fp16" if "fp16" in legal else legal[0])
    if precision not in legal:
        raise UnsupportedOnTarget(f"{precision} is not legal for {runtime} on target '{target.name}'",
                                  f"legal precisions there: {', '.join(legal)}")
    return {"runtime": runtime, "precision": precision, "device": "cuda", "note": note,
            "engine_build": target.engine_build}


# quantize method of a torch-quant artifact -> the torch-cuda precision whose kernel runs it
QUANT_PRECISION = {"int8": "int8", "fp8": "fp8"}


def torch_quant_precision(src: Artifact, asked: str | None, target) -> str:
    """The precision a torch-quant source compiles to for a CUDA target: its own. Its stored (calibrated) codes go
    into the kernels' layout unchanged (deploy/cuda_weights.py). Checked before any weights load."""
    from edgepack.compress.quant_kernels import TINYGEMM_GROUPS
    from edgepack.compress.quant_torch import read_quant_meta

    if not target.has_cuda:
        raise ConfigError(f"a torch-quant artifact compiles for CUDA targets, not '{target.name}'",
                          "for a CPU target compile the Hugging Face checkpoint (int4 goes to ONNX MatMulNBits)")
    meta = read_quant_meta(src.path)
    method = meta["method"]
    precision = "int4" if method.startswith("int4") else QUANT_PRECISION.get(method)
    if precision is None:
        raise UnsupportedOnTarget(f"torch-cuda has no kernel for '{method}' weights",
                                  "run it with --runtime torch-quant (bitsandbytes), or quantize with int4-gptq / int8")
    if asked not in (None, precision):
        raise ConfigError(f"the source is already quantized with {method}; compile cannot make it {asked}",
                          "compile the Hugging Face checkpoint for another precision")
    if precision == "int4" and meta.get("group_size") not in TINYGEMM_GROUPS:
        raise UnsupportedOnTarget(f"the int4 GPU kernel (tinygemm) takes groups of "
                                  f"{', '.join(map(str, TINYGEMM_GROUPS))}; '{src.path.name}' has groups of "
                                  f"{meta.get('group_size')}", "quantize again with --group-size 32 (or 64 / 128 / 256)")
    return precision


def storage_dtype(precision: str, target) -> str:
    """torch dtype name of the 16-bit tensors: the precision itself for fp32 / fp16 / bf16; for the low-bit ones
    (embeddings, norms, lm_head beside the packed linears) bf16, what tinygemm's activations must be."""
    if precision in ("fp32", "fp16", "bf16"):
        return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
    return "bfloat16"


def resolve_context(cfg, model_cfg: dict) -> int:
    model_max = int(model_cfg.get("max_position_embeddings") or DEFAULT_MAX_CONTEXT)
    if cfg.max_context and cfg.max_context > model_max:
        raise ConfigError(f"max_context {cfg.max_context} exceeds the model's {model_max} positions",
                          f"pass --max-context {model_max} or less")
    return cfg.max_context or min(model_max, DEFAULT_MAX_CONTEXT)


def compile_gpu(src: Artifact, cfg, path: dict, target, out: Path, *, force: bool = False) -> Artifact:
    out = Path(out).absolute()
    check_output_dir(out, force, [src.path])
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if path["runtime"] == "torch-cuda":
        return _torch_cuda(src, cfg, path, target, out, force, t0)
    with WorkDir(out) as work:
        return _tensorrt(src, cfg, path, target, out, force, t0, Path(work))


def _record(src, cfg, path, target, metrics: dict, t0: float) -> dict:
    """The stage record; says whether anything was timed on a GPU of the target's SM (never on other machines)."""
    local = local_cuda_sm()
    if local is not None and local == target.sm:
        metrics["measured_on"] = f"this machine's sm_{local} GPU"
    else:
        metrics["measured_on"] = None
        metrics["speed_note"] = ("no speed measured: this machine has no CUDA device" if local is None
                                 else f"no speed measured: this GPU is sm_{local}, the target sm_{target.sm}")
    metrics.update({"runtime": path["runtime"], "precision": path["precision"], "target": target.name})
    if path["note"]:
        metrics["note"] = path["note"]
    return stage_record("compile", asdict(cfg), time.perf_counter() - t0, metrics, target=target.name,
                        parent=src.digest())


def _torch_cuda(src, cfg, path, target, out, force, t0) -> Artifact:
    import torch

    from edgepack.deploy.cuda_weights import LOWBIT, RUNTIME_FILE, TORCH_CUDA_FORMAT, compile_lowbit
    from edgepack.hf import copy_tokenizer, load_model

    if src.format not in ("hf", "torch-quant"):
        raise ConfigError(f"torch-cuda compiles Hugging Face checkpoints or torch-quant artifacts, not "
                          f"'{src.format}'", "pass the model directory")
    mc = read_model_config(src.path)
    context = resolve_context(cfg, mc)
    precision = path["precision"]
    dtype = storage_dtype(precision, target)
    settings = {"precision": precision, "dtype": dtype, "max_context": context, "max_batch": cfg.max_batch,
                "torch_compile": cfg.torch_compile, "cuda_graph": True}
    with WorkDir(out) as work, \
            ArtifactWriter(out, force=force, inputs=[src.path]) as w:
        parent, fmt = src, "hf"
        if precision in LOWBIT:
            parent, more, metrics = compile_lowbit(src, cfg, precision, target, w.path, Path(work))
            settings.update(more)
            fmt = TORCH_CUDA_FORMAT
        else:
            model = load_model(src, device="cpu", dtype=getattr(torch, dtype))
            model.save_pretrained(w.path, safe_serialization=True)
            copy_tokenizer(src.path, w.path)
            metrics = {"bytes": sum(p.stat().st_size for p in w.path.glob("*.safetensors")),
                       "params": sum(p.numel() for p in model.parameters())}
            del model
        (w.path / RUNTIME_FILE).write_text(json.dumps(settings, indent=1) + "\n")
        extra = {"runtime": "torch-cuda", "device": "cuda", "target": target.name, "target_sm": target.sm,
                 **{k: v for k, v in settings.items() if k != "layers"}}
        if local_cuda_sm() == target.sm and cfg.measure_tokens:
            metrics.update(measure_torch_cuda(w.path, extra, cfg.measure_tokens))
        rec = _record(src, cfg, path, target, metrics, t0)
        return w.commit(format=fmt, record=rec, parent=parent, base_model=src.base_model, extra=extra)


def measure_torch_cuda(art_dir: Path, extra: dict, tokens: int) -> dict:
    """Smoke decode figure on the GPU (bench does the careful one)."""
    import torch

    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.torch_cuda import open_torch_cuda_dir
    from edgepack.quality import probe_ids

    rt = open_torch_cuda_dir(art_dir, extra)
    prompt = probe_ids(extra.get("vocab_size") or rt.model.config.vocab_size, length=16, seed=2)
    generate(rt, prompt, GenerationConfig(max_new_tokens=4), sync=torch.cuda.synchronize)
    res = generate(rt, prompt, GenerationConfig(max_new_tokens=tokens), sync=torch.cuda.synchronize)
    return {"decode_tokens_per_s": round(res.decode_tokens_per_s, 1), "ttft_s": round(res.ttft_s, 5),
            "measured_tokens": int(res.tokens.shape[1])}


def _tensorrt_source(src, cfg, path, target, work: Path):
    """The ONNX the TensorRT artifact is made from: the source ONNX as it is, our int4 / int8 codes as a Q/DQ graph
    (the quantize stage, compress/quant_qdq.py), or the fp32 export."""
    from edgepack.deploy.onnx_export import ExportConfig, export_onnx

    if src.format == "onnx":
        return src
    if path["precision"] in TRT_QDQ_PRECISIONS:
        from edgepack.config import build_config
        from edgepack.stages import get_stage

        spec = get_stage("quantize")
        method = cfg.int4_method if path["precision"] == "int4" else "int8"
        qcfg = build_config(spec.config_class(), {"method": method, "format": "onnx", "group_size": cfg.group_size,
                                                  "exporter": cfg.exporter}, "compile -> quantize")
        return spec.function()(src, qcfg, target, work / "quantize")
    return export_onnx(src, ExportConfig(exporter=cfg.exporter), None, work / "export", threads=cfg.threads)


def _tensorrt(src, cfg, path, target, out, force, t0, work: Path) -> Artifact:
    from edgepack.deploy import trt_spec
    from edgepack.hf import copy_tokenizer

    base = _tensorrt_source(src, cfg, path, target, work)
    made = dict(base.extra)
    scheme = (made.get("quantization") or {}).get("scheme")
    if made.get("precision", "fp32") not in ("fp32", "fp16") and scheme != "qdq":
        raise ConfigError(f"the ONNX source is {made.get('precision')} in onnxruntime's MatMulNBits operators, "
                          "which TensorRT does not build", "quantize for the Jetson target (Q/DQ graph), or "
                          "compile the Hugging Face checkpoint instead")
    with ArtifactWriter(out, force=force, inputs=[src.path]) as w:
        metrics = {}
        qdq = path["precision"] in TRT_QDQ_PRECISIONS
        if (path["precision"] == "fp16" or qdq) and made.get("dtype", "float32") == "float32":
            from edgepack.deploy.onnx_fp16 import convert_fp16

            made = convert_fp16(base.path, w.path, made, check=not qdq)
            metrics.update(made.pop("fp16_check"))
            copy_tokenizer(base.path, w.path)
            if (base.path / "config.json").is_file():
                (w.path / "config.json").write_bytes((base.path / "config.json").read_bytes())
            if qdq:  # the exact file shipped, on onnxruntime, against the PyTorch model (or the fp32 Q/DQ graph)
                metrics.update(_check_qdq(src, base, w.path, made))
        else:
            link_files(base, w.path)
        onnx_path = w.path / made.get("onnx_file", "model.onnx")
        digest = trt_spec.onnx_digest(onnx_path)
        engine_bytes = sum(p.stat().st_size for p in w.path.glob(onnx_path.name + "*"))
        context = resolve_context(cfg, {"max_position_embeddings": made.get("max_positions")})
        spec = trt_spec.build_spec(made, target, path["precision"], onnx_sha256=digest, engine_bytes=engine_bytes,
                                   max_context=context, max_batch=cfg.max_batch)
        trt_spec.write_spec(spec, w.path)
        extra = {**made, "runtime": "tensorrt", "precision": path["precision"], "device": "cuda",
                 "target": target.name, "target_sm": target.sm, "engine_build": target.engine_build,
                 "build_spec": trt_spec.SPEC_FILE, "max_context": context, "max_batch": cfg.max_batch}
        metrics.update({"bytes": engine_bytes, "onnx_sha256": digest, "workspace_bytes": spec["workspace_bytes"]})
        here = target.engine_build == "host" or bool(target.measured)  # measured: the target is this machine
        if here and tensorrt_importable() and local_cuda_sm() == target.sm:
            from edgepack.deploy.tensorrt_build import build_engine

            info = build_engine(w.path, spec, w.path / "engines")
            extra.update({"engine_sm": info["sm"], "engine_trt_version": info["trt_version"],
                          "engine_dir": "engines"})
            metrics.update({k: info[k] for k in ("build_seconds", "engine_bytes", "peak_host_mem_used_bytes")})
        else:
            metrics["engine"] = ("built on the device by 'edgepack device prepare'" if target.engine_build == "device"
                                 else "not built here (no tensorrt / no GPU of the target's SM): run 'edgepack "
                                      "device prepare' on the GPU machine, or the trtexec line it prints")
        rec = _record(src, cfg, path, target, metrics, t0)
        return w.commit(format="onnx", record=rec, parent=base, base_model=src.base_model, extra=extra)


def _check_qdq(src, base, ship_dir: Path, extra: dict) -> dict:
    from edgepack.deploy.onnx_fp16 import check_shipped

    if src.format == "hf":
        from edgepack.hf import load_model
        from edgepack.quality import hf_logits_fn

        return check_shipped(ship_dir, extra, hf_logits_fn(load_model(src, device="cpu")), "the PyTorch fp32 model",
                             ship_dir)
    from edgepack.deploy.ort_runtime import OrtRuntime

    return check_shipped(ship_dir, extra, OrtRuntime(base.path, base.extra).forward_logits,
                         "the fp32 Q/DQ graph it was made from", ship_dir)

