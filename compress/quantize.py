"""Stage `quantize`: INT8 / INT4 / NF4 / FP8 weights for the ONNX (onnxruntime) or torch path, with measured quality.

    quantize(src, QuantizeConfig(method="int4-gptq", group_size=32), target, out) -> Artifact

Order of work: method / format / target legality first (before any weight loads), then the fp32 model is loaded,
its perplexity measured on a held-out text, its weights quantized (quant_algos, or bitsandbytes / float8 for
nf4 / fp8), the artifact written, and the *written* artifact re-opened and measured through the same scorer
`edgepack eval` uses. The manifest records perplexity before and after (protocol edgepack-ppl-v1), the logits'
SQNR on the fixed probe, bytes, and what was deliberately left in fp32. `max_ppl_increase` fails the stage
(ValidationFailed) and nothing is written.

Calibration and evaluation text never overlap: when both are the same file (the default, the embedded TinyStories
sample), calibration reads its first `calib_fraction` (90 %) and evaluation the rest, split at a line boundary.

Embeddings and lm_head stay fp32 in both formats: in small models they are tied (one matrix serving both), are
the most quantization-sensitive matrices, and the embedding is a gather whose cost does not grow with decode
length; the choice is recorded in the manifest (`kept_fp32`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, check_output_dir, stage_record
from edgepack.compress.quant_methods import METHODS, quantize_weights_
from edgepack.compress.quant_qdq import qdq_target
from edgepack.errors import ArtifactError, ConfigError, UnsupportedOnTarget, ValidationFailed, did_you_mean

FORMATS = ("onnx", "torch")
# Which artifact path serves each runtime a target may prefer (TensorRT consumes ONNX).
RUNTIME_FORMAT = {"onnxruntime": "onnx", "tensorrt": "onnx", "torch-cuda": "torch", "torch-cpu": "torch"}
KEPT_FP32 = ("embed_tokens", "lm_head")


def unquantized_params(model, experts_quantized: bool = False) -> dict[str, int]:
    """Parameters the quantizers leave in floating point, by kind (the record says what was not quantized, and the
    sizes it reports count them): the embedding and lm_head (kept on purpose), MoE routers (kept on purpose),
    routed experts stored as 3-D tensors unless the torch path quantized them per expert, and norms / biases."""
    from edgepack.compress.quant_algos import expert_weights, is_router, quantizable_linears

    quantized = {f"{name}.weight" for name in quantizable_linears(model)}
    if experts_quantized:
        quantized |= set(expert_weights(model))
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name in quantized:
            continue
        module = name.rsplit(".", 1)[0]
        kind = ("embeddings / lm_head" if any(k in name for k in (*KEPT_FP32, "wte", "wpe")) else
                "routed experts" if ".experts." in name or p.dim() == 3 else "routers" if is_router(module) else
                "norms / biases" if p.dim() == 1 else "other")
        out[kind] = out.get(kind, 0) + p.numel()
    return out
AUTO = "auto"
# method = "auto", fastest decode first: 8-bit float where the GPU has fp8 tensor cores (weights prepared here in
# torch; no CUDA needed to write them), else calibrated int4 (GPTQ), else int8. One recipe can so serve every target.
AUTO_ORDER = ("fp8", "int4-gptq", "int8")
# TensorRT Q/DQ targets (Jetson) take no zero points: symmetric GPTQ measured +8.9 % perplexity on stories260K at
# group 32, GPTQ-KD +3.9 % (README "Jetson: INT4 / INT8 through TensorRT"), so auto distils there.
AUTO_ORDER_QDQ = ("int4-gptq-kd", "int8")


@dataclass(frozen=True)
class QuantizeConfig:
    # one of METHODS (compress/quant_methods.py), or "auto": the first of AUTO_ORDER the target runs (resolve_method)
    method: str = field(default="int4-gptq", metadata={"choices": (*METHODS, "auto")})
    # onnx | torch; None: the target's preferred runtime decides (torch without a target)
    format: str | None = field(default=None, metadata={"choices": ("onnx", "torch")})
    group_size: int = 32  # input channels per scale for int4 (power of two >= 16); int8 and fp8 are per channel
    symmetric: bool = False  # int4 only: symmetric grid (no zero points) instead of asymmetric min/max
    # TensorRT Q/DQ graphs (Jetson): also the token embedding (INT8 per row, DequantizeLinear -> Gather) and lm_head
    # (INT8 per output channel), by round-to-nearest; False keeps them fp16 (compress/quant_qdq.py)
    quantize_embeddings: bool = True
    accuracy_level: int = 4  # ONNX MatMulNBits compute: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (fast on CPU)
    calib: str = field(default="", metadata={"path": True})  # calibration text (UTF-8); "" = embedded TinyStories sample
    calib_fraction: float = 0.9  # when calibration and evaluation read one file: the leading share used to calibrate
    calib_samples: int = 64  # calibration sequences
    calib_seq_len: int = 256  # tokens per calibration sequence
    eval_text: str = field(default="", metadata={"path": True})  # evaluation text; "" = the calibration file's held-out tail
    eval_max_tokens: int | None = None  # score at most this many tokens (None = the whole evaluation text)
    max_ppl_increase: float | None = None  # percent; exceeding it fails the stage and writes nothing
    int8_onnx: str = "nbits"  # onnx int8: nbits (MatMulNBits 8-bit per channel) | dynamic (onnxruntime quantize_dynamic)
    exporter: str = "dynamo"  # onnx format: dynamo (torch.export, the supported path) | torchscript (faster)
    kd_steps: int = 300  # int4-gptq-kd: distillation steps (batches of 8 windows) after GPTQ (compress/quant_refine.py)
    kd_samples: int = 256  # int4-gptq-kd: calibration windows for distillation (GPTQ uses the first calib_samples)
    seed: int = 0  # int4-gptq-kd: batch order of the distillation
    threads: int | None = None  # torch CPU threads (None: torch's default; 1 avoids oversubscription on a busy CPU)
    task: str = field(default="", metadata={"path": True})  # task file (edgepack.tasks): task metrics before / after
    task_samples: int | None = 64  # held-out task items scored (None: all)
    max_task_drop: float | None = None  # points the task metric may fall; more fails the stage and writes nothing

    def validate(self) -> list[str]:
        errs = []
        if self.max_task_drop is not None and self.max_task_drop < 0:
            errs.append("max_task_drop must be >= 0 (points)")
        if self.task_samples is not None and self.task_samples < 1:
            errs.append("task_samples must be >= 1")
        if self.method not in METHODS and self.method != AUTO:
            errs.append(f"unknown method '{self.method}'{did_you_mean(self.method, METHODS)}; "
                        f"methods: {', '.join(METHODS)}")
        if self.method == "int4-hqq" and self.symmetric:
            errs.append("int4-hqq optimises an asymmetric (float) zero point: drop symmetric")
        if self.format not in (None, *FORMATS):
            errs.append(f"format must be one of {', '.join(FORMATS)}")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            errs.append(f"group_size must be a power of two >= 16 (MatMulNBits and torchao block sizes), got {self.group_size}")
        if self.accuracy_level not in range(5):
            errs.append("accuracy_level must be 0..4")
        if not 0.05 <= self.calib_fraction <= 0.95:
            errs.append("calib_fraction must be in [0.05, 0.95]")
        if self.calib_samples < 1 or self.calib_seq_len < 8:
            errs.append("calib_samples must be >= 1 and calib_seq_len >= 8")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            errs.append("max_ppl_increase must be >= 0 (percent)")
        if self.int8_onnx not in ("nbits", "dynamic"):
            errs.append("int8_onnx must be nbits or dynamic")
        if self.exporter not in ("dynamo", "torchscript"):
            errs.append("exporter must be dynamo or torchscript")
        if self.eval_max_tokens is not None and self.eval_max_tokens < 16:
            errs.append("eval_max_tokens must be >= 16")
        if self.threads is not None and self.threads < 1:
            errs.append("threads must be >= 1")
        if self.kd_steps < 0 or self.kd_samples < 2:
            errs.append("kd_steps must be >= 0 and kd_samples >= 2")
        return errs


def supported_methods(target, fmt: str | None = None) -> list[str]:
    return [m for m, spec in METHODS.items() if target.supports(precision=spec.precision)
            and (fmt is None or fmt in spec.formats)]


def resolve_format(cfg: QuantizeConfig, target) -> str:
    if cfg.format is not None:
        return cfg.format
    if target is None:
        return "torch"
    fmt = RUNTIME_FORMAT.get(target.preferred_runtime())
    spec = METHODS[cfg.method]
    return fmt if fmt in spec.formats else spec.formats[-1]


def resolve_method(cfg: QuantizeConfig, target) -> tuple[QuantizeConfig, str]:
    """(config with a concrete method, why). method = "auto" takes the first of AUTO_ORDER that the target runs and
    that has a path in the format the target's runtime reads (or cfg.format) with its dependencies installed here."""
    import importlib.util
    from dataclasses import replace

    if cfg.method != AUTO:
        return cfg, ""
    skipped = []
    # On CUDA targets the quantized weights run through the torch path (torch-cuda kernels): the ONNX MatMulNBits
    # operator is onnxruntime's ...
    # ... except where TensorRT builds on the device (Jetson): there the ONNX carries the codes as Q/DQ
    fmt0 = cfg.format or ("torch" if target is not None and target.has_cuda and not qdq_target(target) else None)
    order = AUTO_ORDER_QDQ if qdq_target(target) and fmt0 in (None, "onnx") else AUTO_ORDER
    for m in order:
        spec, c = METHODS[m], replace(cfg, method=m, format=fmt0)
        fmt = resolve_format(c, target)
        if target is not None and not target.supports(precision=spec.precision):
            skipped.append(f"{m}: {target.name} does not run {spec.precision}")
        elif fmt not in spec.formats:
            skipped.append(f"{m}: no {fmt} path")
        elif spec.requires and importlib.util.find_spec(spec.requires[0]) is None:
            skipped.append(f"{m}: {spec.requires[0]} is not installed")
        else:
            where = f"target {target.name}" if target is not None else "no target"
            return c, f"auto for {where}: {m} ({fmt})" + (f"; skipped {'; '.join(skipped)}" if skipped else "")
    raise UnsupportedOnTarget(f"method 'auto' found no quantization method for target "
                              f"'{getattr(target, 'name', None)}' ({'; '.join(skipped)})",
                              "name a method, or drop the quantize stage for this target")


def check_legal(cfg: QuantizeConfig, target) -> str:
    """Every check that needs no weights: method, format, target capabilities, optional dependencies.
    Returns the artifact format to write."""
    import importlib.util

    errs = cfg.validate()
    if errs:
        raise ConfigError("quantize: " + "; ".join(errs), "see 'edgepack quantize --help'")
    cfg = resolve_method(cfg, target)[0]
    spec = METHODS[cfg.method]
    if target is not None and not target.supports(precision=spec.precision):
        ok = supported_methods(target)
        raise UnsupportedOnTarget(
            f"method '{cfg.method}' needs {spec.precision} weights, which target '{target.name}' cannot run",
            f"methods {target.name} supports: {', '.join(ok) or 'none'}")
    fmt = resolve_format(cfg, target)
    if fmt not in spec.formats:
        raise ConfigError(f"method '{cfg.method}' has no {fmt} path (it exists for: {', '.join(spec.formats)})",
                          f"use --format {spec.formats[0]}, or an {fmt} method: "
                          + ", ".join(m for m, s in METHODS.items() if fmt in s.formats))
    if target is not None:
        runtimes = [r for r, f in RUNTIME_FORMAT.items() if f == fmt]
        if not any(target.supports(runtime=r) for r in runtimes):
            raise UnsupportedOnTarget(f"target '{target.name}' runs none of {', '.join(runtimes)} (the {fmt} path)",
                                      f"its runtimes: {', '.join(target.runtimes)}")
    if fmt == "onnx" and qdq_target(target):
        from edgepack.compress.quant_qdq import qdq_config

        qdq_config(cfg, target)
    needs = [spec.requires] if spec.requires else []
    if fmt == "onnx":
        needs += [("onnx", "onnx"), ("onnxruntime", "onnx")]
    for module, extra in needs:
        if importlib.util.find_spec(module) is None:
            from edgepack.errors import MissingDependency

            raise MissingDependency(module, extra, f"needed by quantize --method {cfg.method} --format {fmt}")
    return fmt


def split_texts(cfg: QuantizeConfig) -> tuple[str, str, dict]:
    """(calibration text, evaluation text, provenance) with no overlap between the two."""
    from edgepack.quality import read_text, split_at_line
    from edgepack.sources import embedded_path

    calib_path = Path(cfg.calib) if cfg.calib else embedded_path("tinystories-sample.txt")
    eval_path = Path(cfg.eval_text) if cfg.eval_text else calib_path
    calib_text, calib_sha = read_text(calib_path)
    if eval_path.resolve() != calib_path.resolve():
        eval_text, eval_sha = read_text(eval_path)
        return calib_text, eval_text, {"calib": calib_path.name, "calib_sha256": calib_sha, "eval": eval_path.name,
                                       "eval_sha256": eval_sha, "split": "separate files"}
    calib_part, eval_part, cut = split_at_line(calib_text, cfg.calib_fraction)
    return calib_part, eval_part, {
        "calib": calib_path.name, "eval": eval_path.name, "text_sha256": calib_sha,
        "split": f"calibration = first {cfg.calib_fraction:.0%} (chars 0..{cut}), evaluation = the rest"}


def quantize(src: Artifact, cfg: QuantizeConfig, target, out: Path, *, force: bool = False) -> Artifact:
    fmt = check_legal(cfg, target)
    cfg, choice = resolve_method(cfg, target)
    qdq = fmt == "onnx" and qdq_target(target)
    if qdq:  # TensorRT's explicit quantization: symmetric codes in DequantizeLinear (compress/quant_qdq.py)
        from edgepack.compress.quant_qdq import qdq_config

        cfg = qdq_config(cfg, target)
    check_output_dir(Path(out), force, [src.path])
    if src.format != "hf":
        raise ArtifactError(f"quantize reads Hugging Face checkpoints; '{src.path}' is a '{src.format}' artifact",
                            "quantize the model before export (the onnx format exports it for you)")
    from edgepack.archs import check_arch
    from edgepack.facts import read_model_config

    check_arch("quantize", read_model_config(src.path, missing_ok=True), method=cfg.method, fmt=fmt)
    import numpy as np

    from edgepack.hf import load_model, load_tokenizer
    from edgepack.quality import PplProtocol, hf_logits_fn, logits_parity, perplexity, probe_ids, token_stream

    t0 = time.perf_counter()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    calib_text, eval_text, texts = split_texts(cfg)
    model = load_model(src, device="cpu", dtype=_float32())
    tok = load_tokenizer(src.path)
    proto = PplProtocol(max_tokens=cfg.eval_max_tokens).resolved(model.config.max_position_embeddings)
    eval_ids = token_stream(tok, eval_text, proto)
    before = perplexity(hf_logits_fn(model), eval_ids, proto)
    ref_logits = hf_logits_fn(model)(probe_ids(model.config.vocab_size))
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    total_params = sum(p.numel() for p in model.parameters())
    n_calib = 0
    with ArtifactWriter(out, force=force, inputs=[src.path]) as w:
        if fmt == "onnx":
            from edgepack.compress.quant_onnx import write_onnx_quant

            calib = _calib_ids(cfg, tok, calib_text, model) if METHODS[cfg.method].calibrated else None
            n_calib = int(calib.numel()) if calib is not None else 0
            if qdq:
                from edgepack.compress.quant_qdq import write_qdq_quant

                details = write_qdq_quant(model, src, cfg, w.path, calib)
            else:
                details = write_onnx_quant(model, src, cfg, w.path, calib)
            out_format, extra = details.pop("format"), details.pop("extra")
        else:
            details = _write_torch(model, src, cfg, tok, calib_text, w.path)
            n_calib = details.pop("calib_tokens")
            out_format, extra = "torch-quant", {}
        left_fp = unquantized_params(model, details.get("experts_quantized", 0))
        del model
        from edgepack.quality import open_scorer

        scorer = open_scorer(Artifact(w.path, {"format": out_format, "extra": extra}, False))
        after = perplexity(scorer[0], eval_ids, proto)
        parity = logits_parity(lambda ids: ref_logits, scorer[0], len(ref_logits[0, 0]))
        increase = 100.0 * (after.perplexity / before.perplexity - 1.0)
        weight_bytes = sum(p.stat().st_size for p in w.path.iterdir() if p.suffix in (".safetensors", ".onnx", ".data"))
        metrics = {"ppl_before": round(before.perplexity, 5), "ppl_after": round(after.perplexity, 5),
                   "ppl_increase_pct": round(increase, 3), **parity, "bytes": weight_bytes,
                   "size_ratio_vs_fp32": round(weight_bytes / fp32_bytes, 4), "eval_tokens": after.tokens,
                   "calib_tokens": n_calib, "protocol": {**before.protocol, **texts},
                   "method": cfg.method, "format": out_format, "kept_fp32": list(KEPT_FP32), **details,
                   "unquantized_params": left_fp,
                   "unquantized_share": round(sum(left_fp.values()) / total_params, 4)}
        if left_fp.get("routed experts"):
            metrics["note"] = (f"{left_fp['routed experts']:,} routed-expert parameters (3-D tensors) left in floating "
                               f"point: {metrics['unquantized_share']:.0%} of the model is not quantized")
        if choice:
            metrics["method_choice"] = choice
        if not np.isfinite(after.perplexity):
            raise ValidationFailed(f"{cfg.method} produced non-finite perplexity", "report this as a bug")
        if cfg.max_ppl_increase is not None and increase > cfg.max_ppl_increase:
            raise ValidationFailed(
                f"{cfg.method} raised perplexity by {increase:.2f}% ({before.perplexity:.4f} -> {after.perplexity:.4f}), "
                f"above the limit of {cfg.max_ppl_increase:g}%; nothing was written",
                "use a calibrated method (int4-gptq), a smaller --group-size, or int8; or raise --max-ppl-increase")
        if cfg.task:
            from edgepack.tasks import stage_task_metrics

            del scorer  # the task metrics open the written artifact through its runtime
            metrics["task"] = stage_task_metrics(src, Artifact(w.path, {"format": out_format, "extra": extra}, False),
                                                 cfg.task, cfg.task_samples, cfg.max_task_drop)
        rec = stage_record("quantize", asdict(cfg), time.perf_counter() - t0, metrics,
                           target=target.name if target is not None else None, parent=src.digest())
        return w.commit(format=out_format, record=rec, parent=src, base_model=src.base_model, extra=extra)


def _quantize_experts_(model, cfg: QuantizeConfig, bits: int, tensors: dict, layers: dict) -> dict:
    """An MoE's routed experts (3-D parameters the linear walkers do not reach): each expert's matrix quantized on its
    own with the data-free form of cfg.method (hqq for int4-hqq, else round to nearest; GPTQ / AWQ calibration per
    expert, on the tokens routed to it, is not implemented) and stored as layers NAME.E (expert_of / expert)."""
    from edgepack.compress import quant_torch as qt
    from edgepack.compress.quant_algos import experts_weight_only_

    algo = "hqq" if cfg.method == "int4-hqq" else "rtn"
    codes = experts_weight_only_(model, algo, bits, 0 if bits == 8 else cfg.group_size, cfg.symmetric or bits == 8)
    if not codes:
        return {}
    for name, qw in codes.items():
        t, rec = qt.int_layer_tensors(name, qw)
        parent, _, e = name.rpartition(".")
        tensors |= t
        layers[name] = {**rec, "expert_of": parent, "expert": int(e)}
    return {"experts_quantized": len(codes), "experts_method": f"{algo}, per expert (data-free)"}


def _float32():
    import torch

    return torch.float32


def _calib_ids(cfg: QuantizeConfig, tok, calib_text: str, model):
    from edgepack.compress.quant_algos import calibration_ids

    seq_len = min(cfg.calib_seq_len, model.config.max_position_embeddings)
    n = max(cfg.calib_samples, cfg.kd_samples) if cfg.method == "int4-gptq-kd" else cfg.calib_samples
    return calibration_ids(tok, calib_text, n, seq_len, tok.bos_token_id)


def _write_torch(model, src: Artifact, cfg: QuantizeConfig, tok, calib_text: str, dst: Path) -> dict:
    import torch

    from edgepack.compress import quant_torch as qt
    from edgepack.compress.quant_algos import quantizable_linears

    tensors, layers, calib_tokens, info = {}, {}, 0, {}
    if cfg.method in ("nf4", "fp8"):
        with torch.no_grad():
            for name, m in quantizable_linears(model).items():
                n_out, n_in = m.weight.shape
                if cfg.method == "nf4":
                    packed, absmax = qt.nf4_quantize(m.weight)
                    tensors |= {f"{name}.nf4": packed, f"{name}.absmax": absmax}
                    m.weight.copy_(qt.nf4_dequantize(packed, absmax, (n_out, n_in)))
                else:
                    q, scale = qt.fp8_quantize(m.weight)
                    tensors |= {f"{name}.fp8": q, f"{name}.scale": scale}
                    m.weight.copy_(qt.fp8_dequantize(q, scale))
                layers[name] = {"kind": cfg.method, "in_features": n_in, "out_features": n_out}
        scheme = ({"bits": 4, "group_size": qt.NF4_BLOCK, "scheme": "bitsandbytes NF4, absmax per 64 weights"}
                  if cfg.method == "nf4" else {"bits": 8, "scheme": "float8_e4m3fn, fp32 scale per output channel"})
    else:
        calib = _calib_ids(cfg, tok, calib_text, model) if METHODS[cfg.method].calibrated else None
        calib_tokens = int(calib.numel()) if calib is not None else 0
        for name, qw in quantize_weights_(model, cfg, calib, info).items():
            t, rec = qt.int_layer_tensors(name, qw)
            tensors |= t
            layers[name] = rec
        bits = 8 if cfg.method == "int8" else 4
        info.update(_quantize_experts_(model, cfg, bits, tensors, layers))
        scheme = {"bits": bits, "group_size": cfg.group_size if bits == 4 else 0,
                  "symmetric": cfg.symmetric or bits == 8,
                  "scheme": "per output channel, symmetric" if bits == 8 else
                  f"groups of {cfg.group_size} input channels, {'symmetric' if cfg.symmetric else 'asymmetric'}"}
    meta = {"method": cfg.method, **scheme, "kept_fp32": list(KEPT_FP32)}
    qt.save_torch_quant(model, tensors, layers, meta, dst, src.path)
    return {"layers_quantized": sum("expert_of" not in r for r in layers.values()), "calib_tokens": calib_tokens, "scheme": scheme["scheme"], **info}
