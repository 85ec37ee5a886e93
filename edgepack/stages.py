"""The closed registry of stages. A stage is a frozen config dataclass plus one function

    run(src: Artifact, cfg: Config, target: Target | None, out: Path) -> Artifact

that never changes `src` and writes a complete new artifact at `out` (through ArtifactWriter). Entries name their
module and attribute as strings so that nothing heavy is imported until a stage actually runs; no user file can add
an entry (no dotted paths from recipes, no plugin discovery).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from edgepack.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config: str  # "module:ConfigClass"
    run: str  # "module:function"
    per_target: bool  # True: output depends on the target, so the plan fans out per target from here on
    summary: str
    version: int = 1  # bump when the stage's output changes for the same inputs (invalidates cached outputs)

    def config_class(self):
        mod, name = self.config.split(":")
        return getattr(importlib.import_module(mod), name)

    def function(self):
        mod, name = self.run.split(":")
        return getattr(importlib.import_module(mod), name)


REGISTRY: dict[str, StageSpec] = {
    "convert": StageSpec("convert", "edgepack.convert:ConvertConfig", "edgepack.convert:convert", False,
                         "import a checkpoint as an artifact, optionally casting to float16/bfloat16"),
    "eval": StageSpec("eval", "edgepack.compress.eval_stage:EvalConfig", "edgepack.compress.eval_stage:eval_stage",
                      False, "measure perplexity on a text (edgepack-ppl-v1) and record it"),
    "export": StageSpec("export", "edgepack.deploy.onnx_export:ExportConfig", "edgepack.deploy.onnx_export:export_onnx",
                        False, "ONNX decoder with KV cache; logits max-abs-diff and greedy-token agreement vs PyTorch"),
    "gguf": StageSpec("gguf", "edgepack.deploy.gguf_export:GgufConfig", "edgepack.deploy.gguf_export:export_gguf",
                      False, "GGUF for llama.cpp holding the measured codes (Q4_0 / Q4_1 / Q8_0), read back and compared"),
    "compile": StageSpec("compile", "edgepack.deploy.compile:CompileConfig", "edgepack.deploy.compile:compile_stage",
                         True, "runnable artifact for the target: runtime + precision from its profile (CPU: onnxruntime)"),
    "quantize": StageSpec("quantize", "edgepack.compress.quantize:QuantizeConfig", "edgepack.compress.quantize:quantize",
                          True, "int8 / int4 (rtn, gptq, hqq) / nf4 / fp8 weights, onnx or torch; ppl before/after, SQNR"),
    "bench": StageSpec("bench", "edgepack.bench.run:BenchConfig", "edgepack.bench.stage:bench_stage", True,
                       "measure tokens/s, latency, peak memory and bandwidth use where this machine is the target; "
                       "else record the roofline prediction (measured: false)", version=3),  # 3: measured in a fresh process
    "prune": StageSpec("prune", "edgepack.compress.prune:PruneConfig", "edgepack.compress.prune:prune", False,
                       "prune weights (magnitude/wanda/sparsegpt/2:4) or layers/channels (depth/width); ppl before/after"),
    "distill": StageSpec("distill", "edgepack.compress.distill:DistillConfig", "edgepack.compress.distill:distill",
                         False, "distill the teacher (default: the base model) into this student; teacher/student ppl"),
    "tune": StageSpec("tune", "edgepack.tune.qlora:TuneConfig", "edgepack.tune.qlora:tune", False,
                      "QLoRA / LoRA fine-tune on a data file; merged full-precision model, val ppl before/after"),
    "bundle": StageSpec("bundle", "edgepack.deploy.bundle:BundleConfig", "edgepack.deploy.bundle_stage:bundle_stage",
                        True, "the device bundle for the target (under bundle/), checked first; fit verdict recorded"),
}


def get_stage(kind: str) -> StageSpec:
    if kind not in REGISTRY:
        raise ConfigError(f"unknown stage kind '{kind}'{did_you_mean(kind, REGISTRY)}",
                          f"available stages: {', '.join(REGISTRY)}")
    return REGISTRY[kind]
