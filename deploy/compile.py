"""Stage `compile`: a runnable artifact for one target. The runtime and precision come from the target profile:

    runtime    cfg.runtime, else the target's first-preferred runtime: `onnxruntime` on CPUs (CUDA only where
               onnxruntime-gpu is installed). CUDA targets go to deploy/gpu_compile.py: `torch-cuda` (static KV
               cache + CUDA graph) on A100/H100 unless TensorRT and a GPU of the target's SM are here, and for
               `engine_build = "device"` targets (Jetson) the ONNX plus a TensorRT build spec, built on the device.
    precision  cfg.precision, else the fastest the target lists that this build can make: int4 (ONNX MatMulNBits,
               accuracy_level 4 = int8 activations, the fast CPU kernel) when the `quantize` stage and its ONNX
               path exist, else fp32 (and the manifest says why).

    builder    "edgepack" (torch.onnx export, then the quantize stage) or "genai" (onnxruntime-genai's model
               builder: fused GroupQueryAttention, int4 body / int8 lm_head; needs head_dim % 16 == 0).
               "auto" (default) takes genai for int4 on a CPU where it is installed and the model fits it (measured
               2.8-3.7x the decode speed of our exported int4 graph on a 25M Llama), else edgepack; the manifest
               records the choice and why (`builder`, `builder_reason`, `extra.made_by`).

The source may be a Hugging Face checkpoint (exported, or quantized straight to ONNX by the quantize stage) or an
'onnx' artifact (used as it is). The compiled artifact is an 'onnx' artifact whose `extra` records the runtime,
precision, device and target, so `open_runtime(art)` / `edgepack generate` / bench / serve open it as compiled.
The stage decodes `measure_tokens` tokens after compiling and records the speed (a smoke measurement; `bench`
is the careful one).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.archs import CONV1D, arch, check_arch
from edgepack.artifact import Artifact, ArtifactWriter, WorkDir, check_output_dir, link_files, stage_record
from edgepack.compress.quant_methods import METHODS
from edgepack.deploy.onnx_export import EXPORTERS
from edgepack.errors import (
    ORT_GPU_INSTALL,
    ConfigError,
    EdgepackError,
    MissingDependency,
    UnsupportedOnTarget,
    ValidationFailed,
)
from edgepack.facts import read_model_config

COMPILE_RUNTIMES = ("onnxruntime",)  # runtimes this stage can build for
QUANT_METHOD = {"int8": "int8"}  # precision -> quantize method; int4 uses cfg.int4_method
PRECISION_ORDER = ("int4", "int8", "fp32")  # fastest first, for the default choice
GPU_PRECISIONS = ("bf16", "fp16", "fp8")  # also accepted for CUDA targets (deploy/gpu_compile.py checks legality)
BUILDERS = ("auto", "edgepack", "genai")
INT4_METHODS = tuple(m for m, spec in METHODS.items() if spec.precision == "int4" and spec.handler is not None)


@dataclass(frozen=True)
class CompileConfig:
    # fp32 | int8 | int4 (CUDA targets also bf16 | fp16 | fp8); None = the fastest the target runs that this build makes
    precision: str | None = field(default=None, metadata={"choices": (*PRECISION_ORDER, *GPU_PRECISIONS)})
    runtime: str | None = None  # None = the target's preferred runtime
    # quantize method for int4 (compress/quant_methods.py): int4-rtn | int4-gptq | int4-hqq | int4-awq | int4-gptq-kd
    int4_method: str = field(default="int4-rtn", metadata={"choices": INT4_METHODS})
    group_size: int = 32  # int4: input channels per scale (MatMulNBits block size)
    accuracy_level: int = 4  # MatMulNBits compute type: 4 = int8 activations (fastest on CPU), 0 = unset
    exporter: str = field(default="dynamo", metadata={"choices": EXPORTERS})  # builder "edgepack": torch.onnx exporter
    builder: str = field(default="auto", metadata={"choices": BUILDERS})  # auto | edgepack (torch.onnx export + quantize stage) | genai (onnxruntime-genai builder)
    genai_options: tuple[str, ...] = ()  # genai int4: KEY=VALUE over deploy/genai_builder.py GENAI_INT4_DEFAULTS
    measure_tokens: int = 32  # greedy tokens decoded after compiling to record decode tokens/s; 0 = skip
    threads: int | None = None  # onnxruntime intra-op threads recorded for the runtime; None = the idle physical cores (choose_threads)
    max_context: int = 0  # GPU runtimes: static KV cache / engine profile length, tokens; 0 = model's, at most 4096
    max_batch: int = 1  # GPU runtimes: largest batch the static cache / TensorRT profiles allow
    # torch-cuda: torch.compile the decode step (cached under ~/.cache/edgepack); off until measured to pay for its
    # compile time on the GPU (scripts/gpu_decode.py; deploy/torch_cuda.py COMPILE_PAYS)
    torch_compile: bool = False

    def validate(self) -> list[str]:
        errs = []
        if self.precision not in (None, *PRECISION_ORDER, *GPU_PRECISIONS):
            errs.append(f"precision must be one of {', '.join(PRECISION_ORDER + GPU_PRECISIONS)}")
        if self.int4_method not in INT4_METHODS:
            errs.append(f"int4_method must be an int4 quantize method ({', '.join(INT4_METHODS)})")
        if self.measure_tokens < 0:
            errs.append("measure_tokens must be >= 0")
        if self.threads is not None and self.threads < 1:
            errs.append("threads must be >= 1")
        if self.max_context < 0 or self.max_batch < 1:
            errs.append("max_context must be >= 0 (0 = the model's) and max_batch >= 1")
        if self.builder not in BUILDERS:
            errs.append(f"builder must be one of {', '.join(BUILDERS)}")
        return errs


def onnx_quantize_available() -> bool:
    """True when the quantize stage is registered and its ONNX writer (compress/quant_onnx.py) is installed."""
    from edgepack.stages import REGISTRY

    return "quantize" in REGISTRY and importlib.util.find_spec("edgepack.compress.quant_onnx") is not None


def choose_path(cfg: CompileConfig, target, src_precision: str | None = None) -> dict:
    """{runtime, precision, device, note}: every decision compile makes, before any weights load."""
    if target is None:
        raise ConfigError("compile needs a target", "pass --target (e.g. cpu-x86-64, or 'local' for this machine)")
    if target.has_cuda and cfg.runtime != "onnxruntime":
        from edgepack.deploy.gpu_compile import choose_gpu_path

        gpu = choose_gpu_path(cfg, target, src_precision)
        if gpu is not None:
            return gpu
    runtime = cfg.runtime or target.runtimes[0]
    if not target.supports(runtime=runtime):
        raise UnsupportedOnTarget(f"target '{target.name}' does not run '{runtime}'",
                                  f"its runtimes: {', '.join(target.runtimes)}")
    if runtime not in COMPILE_RUNTIMES:
        alt = [r for r in target.runtimes if r in COMPILE_RUNTIMES]
        raise UnsupportedOnTarget(
            f"compile for runtime '{runtime}' (target '{target.name}' prefers it) is not in this edgepack yet: "
            "the GPU runtimes (TensorRT engines, torch-cuda static cache) are built by their own stage",
            f"compile with --runtime {alt[0]} for this target" if alt else "pick a CPU target such as cpu-x86-64")
    device = "cuda" if target.has_cuda else "cpu"
    if device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise MissingDependency("onnxruntime-gpu", "onnx", f"onnxruntime's CUDA execution provider, to run on "
                                    f"'{target.name}'; this onnxruntime only has {', '.join(ort.get_available_providers())}",
                                    install=ORT_GPU_INSTALL)
    note = ""
    if src_precision is not None:  # an ONNX artifact is compiled as it is
        precision = src_precision
        if cfg.precision not in (None, src_precision):
            raise ConfigError(f"the source ONNX artifact is already {src_precision}; compile cannot re-quantize it to "
                              f"{cfg.precision}", "compile the Hugging Face checkpoint instead")
    elif cfg.precision is not None:
        precision = cfg.precision
        if precision != "fp32" and cfg.builder != "genai" and not onnx_quantize_available():
            raise ConfigError(f"{precision} needs the quantize stage's ONNX path, which this installation lacks",
                              "compile with --precision fp32")
    elif cfg.builder == "genai":  # the builder quantizes by itself: int4 where the target runs it
        precision = "int4" if target.supports(precision="int4") else "fp32"
    else:
        can_quantize = onnx_quantize_available()
        wanted = [p for p in PRECISION_ORDER if target.supports(precision=p) and (p == "fp32" or can_quantize)]
        precision = wanted[0] if wanted else "fp32"
        if precision == "fp32" and not can_quantize and target.supports(precision="int4"):
            note = "int4 not applied: the quantize stage's ONNX path is not installed; wrote fp32"
    if not target.supports(precision=precision):
        raise UnsupportedOnTarget(f"target '{target.name}' cannot run {precision}",
                                  f"its precisions: {', '.join(target.precisions)}")
    return {"runtime": runtime, "precision": precision, "device": device, "note": note}


def _build_onnx(src: Artifact, cfg: CompileConfig, path: dict, target, work: Path) -> Artifact:
    """The ONNX artifact the compiled one is made from, written under `work`."""
    if path["precision"] == "fp32":
        from edgepack.deploy.onnx_export import ExportConfig, export_onnx

        return export_onnx(src, ExportConfig(exporter=cfg.exporter), target, work / "export", threads=cfg.threads)
    from edgepack.stages import get_stage

    spec = get_stage("quantize")
    method = cfg.int4_method if path["precision"] == "int4" else QUANT_METHOD[path["precision"]]
    from edgepack.config import build_config

    cls = spec.config_class()
    wanted = {"method": method, "format": "onnx", "group_size": cfg.group_size, "accuracy_level": cfg.accuracy_level,
              "exporter": cfg.exporter}
    fields = {f.name for f in dataclasses.fields(cls)}
    qcfg = build_config(cls, {k: v for k, v in wanted.items() if k in fields}, "compile -> quantize")
    return spec.function()(src, qcfg, target, work / "quantize")


def resolve_builder(cfg: CompileConfig, src: Artifact, path: dict) -> tuple[str, str]:
    """(builder, why) for `auto`: genai for CPU int4 where it can build the model, else edgepack."""
    if cfg.builder != "auto":
        return cfg.builder, "asked for"
    if src.format != "hf":
        return "edgepack", "the source is already an ONNX artifact"
    if path["precision"] != "int4" or path["device"] != "cpu":
        return "edgepack", f"{path['precision']} on {path['device']}: the exported graph (exact for fp32)"
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "edgepack", "onnxruntime-genai is not installed (pip install 'edgepack[genai]' for the faster int4 path)"
    from edgepack.deploy.genai_builder import GQA_HEAD_MULTIPLE, vocab_width_clash
    from edgepack.targets.fit import model_shape

    mc = read_model_config(src.path)
    head_dim = model_shape(mc).head_dim
    if head_dim % GQA_HEAD_MULTIPLE:
        return "edgepack", f"head_dim {head_dim} is not a multiple of {GQA_HEAD_MULTIPLE} (genai's CPU attention)"
    if vocab_width_clash(mc):  # genai's builder would take that Linear for lm_head
        return "edgepack", f"{', '.join(vocab_width_clash(mc))} == vocab_size: genai's builder would misread lm_head"
    return "genai", "int4 on a CPU: the onnxruntime-genai build decodes fastest"


def measure_decode(art_dir: Path, extra: dict, tokens: int, threads: int | None) -> dict:
    """Greedy decode speed of the compiled graph: median-free smoke figure (bench does warm-ups and repeats)."""
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.ort_runtime import OrtRuntime
    from edgepack.quality import probe_ids

    rt = OrtRuntime(art_dir, extra, threads=threads)
    prompt = probe_ids(extra["vocab_size"], length=16, seed=2)
    generate(rt, prompt, GenerationConfig(max_new_tokens=4))  # warm-up: first runs allocate and pick kernels
    res = generate(rt, prompt, GenerationConfig(max_new_tokens=tokens))
    return {"decode_tokens_per_s": round(res.decode_tokens_per_s, 1), "ttft_s": round(res.ttft_s, 5),
            "measured_tokens": int(res.tokens.shape[1]), "threads": rt.threads}


def compile_stage(src: Artifact, cfg: CompileConfig, target, out: Path, *, force: bool = False) -> Artifact:
    from edgepack.config import build_config

    cfg = build_config(CompileConfig, asdict(cfg), "compile")
    src_precision = src.extra.get("precision", "fp32") if src.format == "onnx" else None
    if src.format not in ("hf", "onnx", "torch-quant"):
        raise ConfigError(f"compile reads Hugging Face checkpoints, 'onnx' or 'torch-quant' artifacts, not "
                          f"'{src.format}'", "pass the model directory or an exported ONNX artifact")
    if src.format == "torch-quant":  # calibrated weights from `quantize --format torch`: the GPU runtimes run them
        from edgepack.deploy.gpu_compile import torch_quant_precision

        cfg = dataclasses.replace(cfg, precision=torch_quant_precision(src, cfg.precision, target))
    mc = read_model_config(src.path, missing_ok=True) if src.format == "hf" else None
    cfg, arch_note = _arch_precision(mc, cfg, target)
    path = choose_path(cfg, target, src_precision)
    path["note"] = "; ".join(n for n in (path["note"], arch_note) if n)
    if path["runtime"] != "torch-cuda":  # the ONNX paths (CPU, Jetson, TensorRT)
        check_arch("compile", mc)
    if path["runtime"] in ("torch-cuda", "tensorrt"):
        from edgepack.deploy.gpu_compile import compile_gpu

        return compile_gpu(src, cfg, path, target, out, force=force)
    builder, why = resolve_builder(cfg, src, path)
    genai = builder == "genai"
    if genai:
        from edgepack.deploy.genai_builder import check_genai

        if src.format != "hf":
            raise ConfigError("the onnxruntime-genai builder reads Hugging Face checkpoints",
                              "pass the model directory, or use builder = \"edgepack\"")
        if cfg.builder == "genai":  # asked for: refuse before any work; auto falls back on whatever fails
            check_genai(read_model_config(src.path), path["precision"])
    out = Path(out).absolute()
    check_output_dir(out, force, [src.path])
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with WorkDir(out) as work:
        metrics, base, built = {}, None, Path(work) / "genai"
        if genai:
            try:
                made = _build_genai_checked(src, cfg, path, built, metrics)
            except Exception as exc:  # noqa: BLE001 -- auto: any failure of the outside builder falls back, said so
                if cfg.builder != "auto":
                    raise
                reason = exc.problem if isinstance(exc, EdgepackError) else f"{type(exc).__name__}: {exc}"
                reason = " ".join(reason.split())[:300]
                builder, genai = "edgepack", False
                why = (f"the onnxruntime-genai builder failed on this {_arch(src)} model ({reason}); fell back to "
                       "our export + MatMulNBits")
                metrics = {"builder_fallback": why}
                print(f"compile: {why}", file=sys.stderr, flush=True)
        if not genai:
            base = src if src.format == "onnx" else _build_onnx(src, cfg, path, target, Path(work))
            metrics.update(check_parity(source_parity(base), path["precision"]))
        with ArtifactWriter(out, force=force, inputs=[src.path]) as w:
            if genai:
                for p in built.iterdir():
                    os.replace(p, w.path / p.name)
            else:
                link_files(base, w.path)
                made = base.extra
            extra = {**made, "runtime": path["runtime"], "precision": path["precision"], "device": path["device"],
                     "target": target.name, "threads": cfg.threads}
            metrics.update({"runtime": path["runtime"], "precision": path["precision"], "made_by": extra.get("made_by"),
                            "builder": builder, "builder_reason": why,
                            "bytes": sum(p.stat().st_size for p in w.path.glob("*.onnx*"))})
            if path["note"]:
                metrics["note"] = path["note"]
            if cfg.measure_tokens and path["device"] == "cpu":
                metrics.update(measure_decode(w.path, extra, cfg.measure_tokens, cfg.threads))
            rec = stage_record("compile", asdict(cfg), time.perf_counter() - t0, metrics, target=target.name,
                               parent=src.digest())
            return w.commit(format="onnx", record=rec, parent=base or src, base_model=src.base_model, extra=extra)


def _arch_precision(mc: dict | None, cfg: CompileConfig, target) -> tuple[CompileConfig, str]:
    """(cfg, note): on a CPU, the default precision for a checkpoint the quantizers cannot treat (GPT-2's Conv1D
    projections) is fp32, said so; asking for int8 / int4 there is refused up front."""
    if mc is None or target is None or target.has_cuda or arch(mc) not in CONV1D:
        return cfg, ""
    if cfg.precision is None and target.supports(precision="fp32"):
        return dataclasses.replace(cfg, precision="fp32"), (f"int4 not applied: the quantizers do not walk "
                                                             f"{arch(mc)}'s Conv1D projections; wrote fp32")
    if cfg.precision in ("int8", "int4"):
        check_arch("quantize", mc)
    return cfg, ""


def _arch(src: Artifact) -> str:

    return arch(read_model_config(src.path, missing_ok=True) or {})


def _build_genai_checked(src: Artifact, cfg: CompileConfig, path: dict, dst: Path, metrics: dict) -> dict:
    """The genai builder's graph in dst, its logits held to the PyTorch source (check_parity); returns `extra`."""
    from edgepack.deploy.genai_builder import build_genai, check_genai

    check_genai(read_model_config(src.path), path["precision"])
    made = build_genai(src.path, dst, path["precision"], accuracy_level=cfg.accuracy_level, block_size=cfg.group_size,
                       options=cfg.genai_options)
    metrics.update(check_parity(parity_vs_source(src, dst, made), path["precision"]))
    return made


def source_parity(art: Artifact) -> dict:
    """The logit parity against PyTorch that the stage which wrote this ONNX artifact measured on the fixed probe
    (export: the fp32 graph; quantize: the quantized one), for the compile gate."""
    for rec in reversed(art.history):
        m = rec.get("metrics") or {}
        if isinstance(m.get("sqnr_db"), (int, float)):
            return {k: m[k] for k in ("sqnr_db", "max_abs_diff", "argmax_agreement") if k in m}
    raise ValidationFailed(f"'{art.path}' records no logit check against PyTorch, so compile cannot gate it",
                           "compile the Hugging Face checkpoint (compile exports and checks it)")


# Lowest logit SQNR (dB, fixed probe) a graph built outside our export may have against the PyTorch source. Far
# below what a correct build gives (fp32 ~130 dB; int4 25-45 dB on pretrained models, >= 10 dB even on random
# weights), far above what a wrongly wired graph gives (genai taking a vocab-wide decoder matrix for lm_head: 3 dB).
MIN_PARITY_SQNR_DB = {"fp32": 60.0, "fp16": 30.0, "int8": 10.0, "int4": 5.0}


def check_parity(parity: dict, precision: str) -> dict:
    floor = MIN_PARITY_SQNR_DB.get(precision, 5.0)
    if parity["sqnr_db"] < floor:
        raise ValidationFailed(f"the built {precision} graph's logits are {parity['sqnr_db']} dB SQNR from the "
                               f"PyTorch model (floor {floor} dB): the graph is wrong, not just quantized",
                               "compile with builder = \"edgepack\" (our validated export), and report the model")
    return {**parity, "min_sqnr_db": floor}


def parity_vs_source(src: Artifact, onnx_dir: Path, extra: dict) -> dict:
    """Logits of a graph built outside our export (the genai builder) against the PyTorch source on the probe."""
    from edgepack.deploy.ort_runtime import OrtRuntime
    from edgepack.hf import load_model
    from edgepack.quality import hf_logits_fn, logits_parity

    return logits_parity(hf_logits_fn(load_model(src, device="cpu")), OrtRuntime(onnx_dir, extra).forward_logits,
                         extra["vocab_size"])
