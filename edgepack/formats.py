"""The one table of artifact formats and the one table of runtimes. Pure data: no imports beyond the standard
library, so the CLI, target profiles, bench, bundle and serve all read the same facts without loading anything.

A format says which runtime runs it by default, which scorer computes its perplexity, what its weight files are
called, and which pyproject extra it needs. A runtime says which factory opens it (deploy.runtime.open_runtime reads
that), which target-profile runtimes can host it (a target TOML lists only the `profile` ones), which extras a
device must install for it, and which modules must import there. Adding a format or a runtime is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    runtime: str | None  # the runtime that runs it by default; None: it must be compiled first
    scorer: str | None  # "module:function(artifact) -> (logits_fn, tokenizer_dir, max_positions)" for perplexity
    weight_suffixes: tuple[str, ...]  # file name endings that hold weights (bytes on disk, bandwidth estimates)
    extra: str = ""  # pyproject extra that reading it needs ("" = core dependencies)


FORMATS: dict[str, Format] = {
    "hf": Format("torch-cpu", "edgepack.quality:open_hf_scorer", (".safetensors", ".bin", ".pt")),
    "onnx": Format("onnxruntime", "edgepack.deploy.ort_runtime:open_onnx_scorer",
                   (".onnx", ".onnx.data", ".onnx_data", ".data"), "onnx"),
    "torch-quant": Format("torch-quant", "edgepack.compress.quant_torch:open_torch_quant_scorer", (".safetensors",)),
    # compiled for torch-cuda with low-bit weights (deploy/cuda_weights.py); its scorer emulates the GPU's weights
    "torch-cuda": Format("torch-cuda", "edgepack.deploy.cuda_weights:open_torch_cuda_scorer", (".safetensors",)),
    "lora-adapter": Format(None, None, (".safetensors",), "tune"),
    # written by deploy/gguf_export.py (our measured codes in Q4_0 / Q4_1 / Q8_0 blocks), run by llama.cpp
    "gguf": Format("llama.cpp", "edgepack.deploy.llamacpp_runtime:open_gguf_scorer", (".gguf",), "llamacpp"),
}
# every weight file name ending any format uses, plus compiled engines and GGUF files
WEIGHT_SUFFIXES: tuple[str, ...] = tuple(dict.fromkeys(
    s for f in FORMATS.values() for s in f.weight_suffixes)) + (".gguf", ".engine", ".plan")


@dataclass(frozen=True)
class RuntimeInfo:
    factory: str  # "module:function(artifact, **options) -> deploy.runtime.Runtime"
    hosts: tuple[str, ...]  # target-profile runtimes (profile=True rows) any one of which can run it
    extras: tuple[str, ...]  # pyproject extras a device installs for it (requirements.txt of a bundle)
    modules: tuple[tuple[str, str], ...] = ()  # (module, extra) that must import on the device
    profile: bool = False  # a name target TOMLs may list in `runtimes`


RUNTIMES: dict[str, RuntimeInfo] = {
    "onnxruntime": RuntimeInfo("edgepack.deploy.ort_runtime:open_ort_runtime", ("onnxruntime",), ("onnx", "serve"),
                               (("onnxruntime", "onnx"),), profile=True),
    "torch-cpu": RuntimeInfo("edgepack.deploy.torch_runtime:open_torch_runtime", ("torch-cpu",), ("serve",),
                             (("torch", ""),), profile=True),
    "torch-cuda": RuntimeInfo("edgepack.deploy.torch_cuda:open_torch_cuda_runtime", ("torch-cuda",), ("serve",),
                              (("torch", ""),), profile=True),
    "tensorrt": RuntimeInfo("edgepack.deploy.tensorrt_runtime:open_tensorrt_runtime", ("tensorrt",),
                            ("onnx", "tensorrt", "serve"), profile=True),
    # llama-cpp-python (CPU build here; llama.cpp's CUDA build also runs on Jetson Orin): GGUF artifacts
    "llama.cpp": RuntimeInfo("edgepack.deploy.llamacpp_runtime:open_llamacpp_runtime", ("llama.cpp",),
                             ("llamacpp", "serve"), (("llama_cpp", "llamacpp"),), profile=True),
    "hf": RuntimeInfo("edgepack.deploy.torch_runtime:open_hf_baseline", ("torch-cpu", "torch-cuda"), ("serve",),
                      (("torch", ""),)),
    "torch-quant": RuntimeInfo("edgepack.compress.quant_torch:open_torch_quant_runtime", ("torch-cpu", "torch-cuda"),
                               ("serve",), (("torch", ""),)),
}
# the names a target profile may list, preferred order as written there
PROFILE_RUNTIMES: tuple[str, ...] = tuple(n for n, r in RUNTIMES.items() if r.profile)

# weight precisions, the names target profiles list and stages record
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8", "int8", "int4", "nf4")
# dtype in a checkpoint's config.json -> the precision name targets use
DTYPE_PRECISION: dict[str, str] = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def default_runtime(fmt: str) -> str | None:
    f = FORMATS.get(fmt)
    return f.runtime if f else None
