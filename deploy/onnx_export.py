"""Stage `export`: a causal-LM decoder as ONNX with its KV cache, validated against PyTorch before it is written.

Graph interface (the names onnxruntime-genai and Optimum use, so other tools can read the file):

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past + seq] int64, position_ids [batch, seq] int64,
             past_key_values.N.key / .value [batch, kv_heads, past, head_dim] float32
    outputs  logits [batch, seq, vocab] float32, present.N.key / .value [batch, kv_heads, past + seq, head_dim]

Prefill passes past tensors with past = 0. A small wrapper module rebuilds a transformers DynamicCache from the
flat list of past tensors and returns the flat list of present tensors, which is what `torch.onnx.export` needs:
optimum-onnx cannot be used with transformers 5.

Exporters: "dynamo" (`torch.onnx.export(dynamo=True)`, torch.export + onnxscript, the supported path) and
"torchscript" (the legacy tracer: about 10x faster to export, kept for quick iterations and tests; tracing bakes in
Python branches, which the built-in validation would catch). Either way the stage checks, before writing anything
final, the logits on a fixed probe (max-abs-diff <= atol) and greedy decoding through the KV cache (token agreement
with PyTorch); a failed check raises ValidationFailed and leaves no output.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, check_output_dir, stage_record
from edgepack.errors import ArtifactError, UnsupportedOnTarget, ValidationFailed, require

ONNX_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_THRESHOLD = 1_500_000_000  # bytes of weights above which they go to a side file (protobuf caps at 2 GiB)
EXPORTERS = ("dynamo", "torchscript")
# example shapes for tracing: all > 1 and distinct, so no dimension gets specialised to a constant
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 5


@dataclass(frozen=True)
class ExportConfig:
    exporter: str = field(default="dynamo", metadata={"choices": EXPORTERS})  # dynamo | torchscript
    opset: int = 18  # ONNX opset (torchscript path: at most 20)
    atol: float = 1e-4  # max |logit difference| against PyTorch on the fixed probe (float32 logits)
    greedy_tokens: int = 64  # greedy tokens decoded through the KV cache and compared with PyTorch; 0 = skip
    min_token_agreement: float = 1.0  # share of those greedy tokens that must match PyTorch's

    def validate(self) -> list[str]:
        errs = []
        if self.exporter not in EXPORTERS:
            errs.append(f"exporter must be one of {', '.join(EXPORTERS)}")
        if not 14 <= self.opset <= 23:
            errs.append("opset must be in 14..23")
        if self.atol <= 0:
            errs.append("atol must be > 0")
        if self.greedy_tokens < 0:
            errs.append("greedy_tokens must be >= 0")
        if not 0 <= self.min_token_agreement <= 1:
            errs.append("min_token_agreement must be in [0, 1]")
        return errs


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def kv_layout(model_config) -> dict:
    """The cache geometry a runtime needs to allocate past tensors, from a transformers config."""
    heads = model_config.num_attention_heads
    return {"num_layers": model_config.num_hidden_layers,
            "num_kv_heads": getattr(model_config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(model_config, "head_dim", None) or model_config.hidden_size // heads,
            "vocab_size": model_config.vocab_size,
            "max_positions": getattr(model_config, "max_position_embeddings", None)}


def decoder_wrapper(model):
    """nn.Module (input_ids, attention_mask, position_ids, *past) -> (logits, *present) around a HF causal LM."""
    import torch
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers

    class DecoderWithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # Full layers even where the config slides a window (Mistral v0.1, Gemma 2 / 3): a sliding layer would
            # trim the cache it returns to the window, so the graph's present tensors would stop growing past it
            # (a runtime that allocates past + seq then fails); the window itself is applied by the attention mask
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return DecoderWithCache().eval()


def moe_exportable_(model) -> bool:
    """Route an MoE's experts through transformers' `batched_mm` implementation (gather each token's expert weights,
    then batched matmuls): plain Gather / MatMul ops that both exporters trace, where the default grouped_mm kernel
    and the eager loop (`histc`) have no ONNX form. The same arithmetic; True when the model has experts."""
    if not any(type(m).__name__.endswith("Experts") for m in model.modules()):
        return False
    model.set_experts_implementation("batched_mm")
    return True


def _example_inputs(layout: dict):
    import torch

    b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
    ids = torch.randint(3, layout["vocab_size"], (b, s), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    past = [torch.zeros(b, layout["num_kv_heads"], p, layout["head_dim"]) for _ in range(2 * layout["num_layers"])]
    return (ids, mask, pos, *past)


def export_decoder(model, dst_dir: Path, cfg: ExportConfig) -> dict:
    """Write dst_dir/model.onnx (+ model.onnx.data for large models). Returns the `extra` a runtime needs."""
    import torch

    require("onnx", "onnx", "ONNX export")
    require("onnxscript", "onnx", "ONNX export (torch.onnx dynamo exporter)")
    layout = kv_layout(model.config)
    inputs, outputs = io_names(layout["num_layers"])
    moe_exportable_(model)
    wrapper = decoder_wrapper(model)
    example = _example_inputs(layout)
    path = Path(dst_dir) / ONNX_FILE
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    large = weight_bytes > EXTERNAL_DATA_THRESHOLD
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the validation below is what counts
        if cfg.exporter == "dynamo":
            d = torch.export.Dim
            batch, seq, past = d("batch"), d("seq"), d("past")
            shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: d("total")},
                      "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in inputs[3:])}
            torch.onnx.export(wrapper, example, str(path), input_names=inputs, output_names=outputs,
                              dynamic_shapes=shapes, dynamo=True, opset_version=cfg.opset, optimize=True,
                              external_data=large, verbose=False)
        else:
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                    "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"},
                    **{n: {0: "batch", 2: "past"} for n in inputs[3:]}, **{n: {0: "batch", 2: "total"} for n in outputs[1:]}}
            torch.onnx.export(wrapper, example, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, dynamo=False, opset_version=min(cfg.opset, 20))
    _consolidate_external_data(Path(dst_dir), large)
    return {"onnx_file": ONNX_FILE, "inputs": inputs, "outputs": outputs, **layout, "dtype": "float32",
            "kv_dtype": "float32", "exporter": cfg.exporter, "made_by": f"torch.onnx ({cfg.exporter})",
            "opset": cfg.opset if cfg.exporter == "dynamo" else min(cfg.opset, 20), "precision": "fp32"}


def strip_debug_info(model) -> int:
    """Drop what only debugging reads: every node's metadata_props (the dynamo exporter's per-node stack traces and
    module paths, 2/3 of stories260K's file) and doc_string. Returns the bytes removed."""
    before = model.ByteSize()
    for node in model.graph.node:
        del node.metadata_props[:]
        node.ClearField("doc_string")
    return before - model.ByteSize()


def save_onnx(model, path: Path) -> None:
    """Save a ModelProto as one file, or with its weights in one EXTERNAL_DATA_FILE beside it when they pass
    EXTERNAL_DATA_THRESHOLD (protobuf caps a file at 2 GiB)."""
    import onnx

    large = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    kw = ({"save_as_external_data": True, "all_tensors_to_one_file": True, "location": EXTERNAL_DATA_FILE,
           "size_threshold": 1024} if large else {})
    onnx.save_model(model, str(path), **kw)


def _consolidate_external_data(d: Path, large: bool) -> None:
    """One model.onnx (+ one model.onnx.data when large), whatever side files the exporter chose to write."""
    import onnx

    path = d / ONNX_FILE
    side = [p for p in d.iterdir() if p.name != ONNX_FILE]
    if not large and not side:
        return
    model = onnx.load(str(path), load_external_data=True)
    for p in side:
        p.unlink()
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def validate_export(model, art_dir: Path, extra: dict, cfg: ExportConfig, threads: int | None = None) -> dict:
    """Logits parity on the fixed probe and greedy agreement through the cache; raises ValidationFailed."""
    import numpy as np

    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.ort_runtime import OrtRuntime
    from edgepack.deploy.torch_runtime import TorchRuntime
    from edgepack.quality import hf_logits_fn, logits_parity, probe_ids

    rt = OrtRuntime(Path(art_dir), extra, threads=threads)
    metrics = logits_parity(hf_logits_fn(model), rt.forward_logits, extra["vocab_size"])
    metrics["atol"] = cfg.atol
    if cfg.greedy_tokens:
        prompt = probe_ids(extra["vocab_size"], length=8, seed=1)
        gen = GenerationConfig(max_new_tokens=cfg.greedy_tokens)
        ref = generate(TorchRuntime(model), prompt, gen).tokens
        got = generate(rt, prompt, gen).tokens
        metrics["greedy_tokens"] = int(ref.shape[1])
        metrics["greedy_agreement"] = float((ref == got).mean())
        diverged = np.nonzero(ref[0] != got[0])[0]
        metrics["greedy_first_divergence"] = int(diverged[0]) if len(diverged) else None
    problems = []
    if not metrics["max_abs_diff"] <= cfg.atol:  # `not <=` also catches NaN
        problems.append(f"logits differ from PyTorch by {metrics['max_abs_diff']:.3g} > atol {cfg.atol:g}")
    if cfg.greedy_tokens and metrics["greedy_agreement"] < cfg.min_token_agreement:
        problems.append(f"greedy tokens agree with PyTorch on {metrics['greedy_agreement']:.1%} < "
                        f"{cfg.min_token_agreement:.0%} (first divergence at token {metrics['greedy_first_divergence']})")
    if problems:
        raise ValidationFailed("ONNX export failed validation: " + "; ".join(problems),
                               "try the other exporter (exporter = \"torchscript\" / \"dynamo\"), or loosen atol / "
                               "min_token_agreement if the model is known to be numerically touchy")
    return metrics


def check_target(target) -> None:
    if target is not None and not target.supports(runtime="onnxruntime"):
        raise UnsupportedOnTarget(f"target '{target.name}' does not run onnxruntime, so an ONNX export is of no use there",
                                  f"its runtimes: {', '.join(target.runtimes)}")
    if target is not None and not target.supports(precision="fp32"):
        raise UnsupportedOnTarget(f"target '{target.name}' cannot run fp32, the precision the export writes",
                                  "quantize after export, or pick a target that lists fp32")


def export_onnx(src: Artifact, cfg: ExportConfig, target, out: Path, *, force: bool = False,
                threads: int | None = None) -> Artifact:
    """Export an 'hf' artifact to an 'onnx' artifact at `out`, validated against PyTorch (see module doc)."""
    from edgepack.config import build_config

    cfg = build_config(ExportConfig, asdict(cfg), "export")  # re-validates a config built in code
    check_target(target)
    check_output_dir(Path(out), force, [src.path])
    if src.format != "hf":
        raise ArtifactError(f"export reads Hugging Face checkpoints; '{src.path}' is a '{src.format}' artifact",
                            "export the model directory this artifact was made from")
    require("onnxruntime", "onnx", "validating the export")
    from edgepack.archs import check_arch
    from edgepack.facts import read_model_config
    from edgepack.hf import copy_tokenizer, load_model

    check_arch("export", read_model_config(src.path, missing_ok=True))

    t0 = time.perf_counter()
    model = load_model(src, device="cpu")  # float32: the reference the export is held to
    with ArtifactWriter(out, force=force, inputs=[src.path]) as w:
        extra = export_decoder(model, w.path, cfg)
        copy_tokenizer(src.path, w.path)
        (w.path / "config.json").write_text(model.config.to_json_string())  # for fit, bench and bundle
        metrics = validate_export(model, w.path, extra, cfg, threads=threads)
        metrics["bytes"] = sum(p.stat().st_size for p in w.path.glob(ONNX_FILE + "*"))
        metrics["params"] = sum(p.numel() for p in model.parameters())
        rec = stage_record("export", asdict(cfg), time.perf_counter() - t0, metrics,
                           target=target.name if target is not None else None, parent=src.digest())
        return w.commit(format="onnx", record=rec, parent=src, base_model=src.base_model, extra=extra)
