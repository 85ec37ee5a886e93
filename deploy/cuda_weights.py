"""The low-bit weights of a torch-cuda artifact (format `torch-cuda`): what compile writes, how the GPU loads them,
and the exact CPU emulation its quality is measured with.

    model.safetensors   every tensor that is not a quantized linear, in bf16, plus per quantized linear NAME:
        int4:  NAME.qweight uint8 [N, groups * G / 2] (the measured codes, low nibble first), NAME.scales_and_zeros
               bf16 [groups, N, 2] (tinygemm's own parameters: what the kernel computes with, nothing re-derived)
        int8:  NAME.qweight int8 [N, K], NAME.scales fp32 [N]
        fp8:   NAME.fp8 float8_e4m3fn [N, K], NAME.scale fp32 [N]
    torch_cuda.json     runtime settings, and "layers": per quantized linear its kind and shape

Loading (build_model) makes the model skeleton on the `meta` device, builds each kernel module straight from its
stored tensors on the GPU (compress/quant_kernels.py) and assigns the rest: no floating-point copy of the model
exists at any point. `emulate=True` builds the same model on the CPU with the weights the kernels compute with
(int4: bf16((q - 8) * s + zf), bit for bit; int8: (q - 128) * s; fp8: e4m3 * s with per-token fp8 activations), so
the perplexity compile records is that of what runs.
"""

from __future__ import annotations

from pathlib import Path

from edgepack.errors import ArtifactError, UnsupportedOnTarget

RUNTIME_FILE = "torch_cuda.json"  # torch-cuda runtime settings, next to the weights (written by deploy/gpu_compile.py)
LOWBIT = ("int8", "int4", "fp8")
WEIGHTS_FILE = "model.safetensors"
TORCH_CUDA_FORMAT = "torch-cuda"
PAYLOAD = {"qweight", "scales_and_zeros", "scales", "fp8", "scale"}  # per-linear tensor suffixes
CHECK_COLUMNS = 64  # int4 layers: input columns whose dequantized weights the CPU kernel recomputes at compile


# ------------------------------------------------------------------------------------------------ from codes
def from_torch_quant(path: Path) -> tuple[dict, dict, dict, dict]:
    """(tensors, layers, rest, meta) of a torch-quant artifact in this format: the stored codes, unchanged."""
    import torch
    from safetensors.torch import load_file

    from edgepack.compress.quant_kernels import lowbit_from_stored
    from edgepack.compress.quant_torch import WEIGHTS_FILE as TQ_WEIGHTS
    from edgepack.compress.quant_torch import read_quant_meta, stored_payload_key

    meta = read_quant_meta(path)
    if any("expert_of" in rec for rec in meta["layers"].values()):
        from edgepack.errors import UnsupportedOnTarget

        raise UnsupportedOnTarget("compile: the GPU kernels take linears, and this torch-quant artifact holds an MoE's "
                                  "routed experts quantized per expert", "compile the Hugging Face checkpoint for the "
                                  "GPU (its runtime quantizes the linears itself)")
    st = load_file(str(Path(path) / TQ_WEIGHTS))
    tensors, layers = {}, {}
    for name, rec in meta["layers"].items():
        t, layers[name] = lowbit_from_stored(name, rec, st)
        tensors |= t
    rest = {k: v.to(torch.bfloat16) for k, v in st.items() if not stored_payload_key(k, meta["layers"])}
    return tensors, layers, rest, meta


def from_model(model, precision: str, group_size: int = 32, names=None) -> tuple[dict, dict]:
    """(tensors, layers) quantizing a live model's decoder linears where it lives (round to nearest int4 in groups,
    int8 per channel, fp8 per row): what scripts/gpu_decode.py benchmarks without a CPU round trip."""
    import torch

    from edgepack.compress.quant_algos import quantizable_linears, rtn
    from edgepack.compress.quant_kernels import int4_tensors, int8_from_codes
    from edgepack.compress.quant_torch import fp8_quantize, pack_codes

    tensors, layers = {}, {}
    with torch.no_grad():
        for name, m in quantizable_linears(model).items():
            if names is not None and name not in names:
                continue
            n, k = m.weight.shape
            shape = {"in_features": k, "out_features": n}
            if precision == "int4":
                qw = rtn(m.weight, 4, group_size)
                tensors |= int4_tensors(name, pack_codes(qw.codes, 4), qw.scales, qw.zeros)
                layers[name] = {"kind": "int4", "group_size": group_size, **shape}
            elif precision == "int8":
                qw = rtn(m.weight, 8, k, symmetric=True)
                w8, s = int8_from_codes(qw.codes, qw.scales)
                tensors |= {f"{name}.qweight": w8, f"{name}.scales": s}
                layers[name] = {"kind": "int8", **shape}
            elif precision == "fp8":
                w8, s = fp8_quantize(m.weight)
                tensors |= {f"{name}.fp8": w8, f"{name}.scale": s}
                layers[name] = {"kind": "fp8", **shape}
            else:
                raise ValueError(f"no low-bit kernel for {precision}")
    return tensors, layers


def rest_of(model, layers: dict) -> dict:
    """The model's tensors that are not quantized linears' weights, bf16 (a tied lm_head is left out)."""
    import torch

    skip = {f"{n}.weight" for n in layers}
    out = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k not in skip}
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


def write_weights(dst: Path, rest: dict, tensors: dict) -> int:
    """model.safetensors with both; returns its size in bytes."""
    from safetensors.torch import save_file

    p = Path(dst) / WEIGHTS_FILE
    save_file({**{k: v.contiguous() for k, v in rest.items()}, **{k: v.contiguous() for k, v in tensors.items()}},
              str(p), metadata={"format": "pt", "edgepack": TORCH_CUDA_FORMAT})
    return p.stat().st_size


# ------------------------------------------------------------------------------------------------------ load
def swap_in_(model, tensors: dict, layers: dict, device) -> None:
    """Replace a live model's linears by the kernel modules of (tensors, layers), on `device`."""
    from edgepack.compress.quant_kernels import kernel_module, set_module

    for name, rec in layers.items():
        old = model.get_submodule(name)
        st = {**{k: v for k, v in tensors.items() if k.startswith(name + ".")},
              **({f"{name}.bias": old.bias.detach()} if getattr(old, "bias", None) is not None else {})}
        set_module(model, name, kernel_module(name, rec, st, device))


def build_model(path: Path, layers: dict, device: str = "cuda", emulate: bool = False):
    """The model of a torch-cuda artifact with low-bit weights, on `device`, eval mode, without a float copy."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgepack.compress.quant_kernels import kernel_module, set_module
    from edgepack.hf import quiet_transformers

    quiet_transformers()
    path = Path(path)
    dtype = torch.float32 if emulate else torch.bfloat16
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    st = load_file(str(path / WEIGHTS_FILE), device="cpu" if emulate else str(device))
    for name, rec in layers.items():
        set_module(model, name, kernel_module(name, rec, st, device, emulate))
    rest = {k: (v.float() if emulate else v) for k, v in st.items()
            if not any(k.startswith(n + ".") and k[len(n) + 1:] in PAYLOAD | {"bias"} for n in layers)}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)
               and not any(m.startswith(n + ".") for n in layers)]
    if missing or unexpected:
        raise ArtifactError(f"'{path}': weights do not match config.json (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]})", "re-run compile")
    if config.tie_word_embeddings:
        model.tie_weights()
    _materialize_buffers(model, device)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ArtifactError(f"'{path}': {left[0]} has no stored value", "re-run compile")
    model.eval()
    torch.set_grad_enabled(False)
    return model


def _materialize_buffers(model, device) -> None:
    """Non-persistent buffers (rotary inv_freq) are computed at construction: rebuild those modules on `device`."""
    import torch

    from edgepack.compress.quant_kernels import set_module

    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            try:
                with torch.device("cpu"):  # small: inv_freq [head_dim / 2]
                    new = type(mod)(getattr(mod, "config", None) or model.config).to(device)
            except TypeError as exc:
                raise ArtifactError(f"cannot rebuild {name} ({type(mod).__name__}) on {device}: {exc}",
                                    "this model family is not supported by the low-bit torch-cuda loader") from None
            set_module(model, name, new)


def read_settings(path: Path, extra: dict) -> dict:
    """torch_cuda.json of a compiled artifact over the manifest's extra (older artifacts: extra alone)."""
    from edgepack.artifact import load_json

    p = Path(path) / RUNTIME_FILE
    settings = load_json(p, "re-run compile") if p.is_file() else {}
    return {**{k: extra[k] for k in ("precision", "dtype", "max_context", "max_batch", "torch_compile") if k in extra},
            **settings}


def read_layers(path: Path) -> dict:
    return read_settings(path, {}).get("layers") or {}


def open_torch_cuda_scorer(art):
    """SCORERS entry of the torch-cuda format: the emulated model (exactly the GPU's weights) on the CPU."""
    from edgepack.quality import hf_logits_fn

    model = build_model(art.path, read_layers(art.path), "cpu", emulate=True)
    return hf_logits_fn(model), art.path, model.config.max_position_embeddings


# ----------------------------------------------------------------------------------------- what compile checks
def check_kernels(tensors: dict, layers: dict, seed: int = 0) -> dict:
    """What can be checked without the GPU, per kernel kind, and what only the GPU can check.

    int4: every layer is repacked the way the GPU does it (padding, nibble order) and torch's CPU int4pack kernel
    recomputes CHECK_COLUMNS random input columns of its dequantized weight: they must equal the emulation bit for
    bit. fp8: the padded shapes and, where this torch has a CPU _scaled_mm, its output against the emulation."""
    import torch

    from edgepack.compress import quant_kernels as qk

    gen = torch.Generator().manual_seed(seed)
    padded, mismatched, checked = {}, [], {"int4": 0, "int8": 0, "fp8": 0}
    scaled_mm_err = None
    for name, rec in layers.items():
        n, k, kind = rec["out_features"], rec["in_features"], rec["kind"]
        if kind == "int4":
            shape = qk.int4_shape(n, k, rec["group_size"])
            if shape.padded:
                key = f"int4 [{n}, {k}] -> [{shape.n_pad}, {shape.k_pad}]"
                padded[key] = padded.get(key, 0) + 1
            lin = qk.Int4Linear(tensors[f"{name}.qweight"], tensors[f"{name}.scales_and_zeros"], rec["group_size"], k,
                                n, device="cpu")
            cols = torch.randperm(k, generator=gen)[:CHECK_COLUMNS]
            eye = torch.zeros(len(cols), k, dtype=torch.bfloat16)
            eye[torch.arange(len(cols)), cols] = 1
            got = lin(eye).t()
            want = qk.int4_dequantize(tensors[f"{name}.qweight"], tensors[f"{name}.scales_and_zeros"],
                                      rec["group_size"], k)[:, cols]
            if not torch.equal(got, want):
                mismatched.append(name)
        elif kind == "fp8":
            n_pad, k_pad = qk.fp8_shape(n, k)
            if (n_pad, k_pad) != (n, k):
                key = f"fp8 [{n}, {k}] -> [{n_pad}, {k_pad}]"
                padded[key] = padded.get(key, 0) + 1
            if scaled_mm_err is None:
                scaled_mm_err = _scaled_mm_vs_emulation(tensors[f"{name}.fp8"], tensors[f"{name}.scale"], gen)
        checked[kind] += 1
    if mismatched:
        raise ArtifactError(f"the int4 layout does not reproduce the measured weights for {mismatched[0]} "
                            f"({len(mismatched)} layers)", "report this as a bug")
    here, gpu = [], ["CUDA graph capture and torch.compile of the decode step", "decode speed and peak memory"]
    if checked["int4"]:
        here.append(f"int4: {checked['int4']} layers in tinygemm's layout (groups, N % 8, K % (16 x innerKTiles), "
                    f"padding); torch's CPU int4pack kernel recomputed up to {CHECK_COLUMNS} input columns per layer: "
                    "bit-identical to bf16((q - 8) * s + zf), the weights the quality was measured with")
        gpu.append("int4: the CUDA tinygemm kernel (aten._weight_int4pack_mm, sm_80+) and its bit-exact dequantization "
                   "of the nibble-swapped layout (tests/test_gpu_kernels.py, gpu marker)")
    if checked["int8"]:
        here.append(f"int8: {checked['int8']} layers, int8 codes and fp32 row scales exactly the measured ones")
        gpu.append("int8: the fused dequantize-GEMV inductor makes with coordinate-descent tuning (eager materializes "
                   "a bf16 weight per call)")
    if checked["fp8"]:
        here.append(f"fp8: {checked['fp8']} layers, K and N padded to multiples of {qk.FP8_MULTIPLE} where needed; "
                    + (f"CPU torch._scaled_mm vs the fp32 emulation: relative difference {scaled_mm_err:.1e}"
                       if scaled_mm_err is not None else "this torch has no CPU _scaled_mm (emulation only)"))
        gpu.append("fp8: torch._scaled_mm rowwise (fp32 scale_a [M,1], scale_b [1,N], bf16 out) on sm_89+ "
                   "(cuBLASLt or CUTLASS, by torch build)")
    return {"kernel_layers": checked, "padded_layers": padded, "checked_here": here, "gpu_only": gpu}


def _scaled_mm_vs_emulation(w8, scale, gen) -> float | None:
    import torch

    from edgepack.compress.quant_kernels import Fp8Linear, quantize_activation_fp8

    lin = Fp8Linear(w8, scale, device="cpu")
    x = torch.randn(4, lin.k_pad, generator=gen)
    x8, xs = quantize_activation_fp8(x)
    try:
        y = torch._scaled_mm(x8, lin.weight_fp8.t(), scale_a=xs, scale_b=lin.scale_w, out_dtype=torch.bfloat16,
                             use_fast_accum=True).float()
    except (RuntimeError, NotImplementedError):
        return None
    ref = (x8.float() * xs) @ (lin.weight_fp8.float() * lin.scale_w.t()).t()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# -------------------------------------------------------------------------------------- the compile stage's part
def compile_lowbit(src, cfg, precision: str, target, dst: Path, work: Path) -> tuple:
    """Write the low-bit body of a torch-cuda artifact into dst: (parent artifact, settings, metrics).

    The codes come from a torch-quant source as they are, or from the quantize stage run here (method
    cfg.int4_method for int4, group cfg.group_size; int8 / fp8 per row) on a Hugging Face source. Then every check
    that needs no GPU (check_kernels), the weights written, and the quality measured on the CPU with exactly the
    weights the kernels compute with, on the parent's own held-out text and protocol."""
    from edgepack.artifact import open_artifact
    from edgepack.compress.quant_kernels import TINYGEMM_GROUPS
    from edgepack.hf import copy_tokenizer

    if src.format == "torch-quant":
        qsrc = src
    else:
        if precision == "int4" and cfg.group_size not in TINYGEMM_GROUPS:
            raise UnsupportedOnTarget(f"the int4 GPU kernel (tinygemm) takes groups of "
                                      f"{', '.join(map(str, TINYGEMM_GROUPS))}, not --group-size {cfg.group_size}",
                                      "pass --group-size 32 (or 64 / 128 / 256)")
        qsrc = _quantize_here(src, cfg, precision, target, work)
    tensors, layers, rest, meta = from_torch_quant(qsrc.path)
    checks = check_kernels(tensors, layers)
    weight_bytes = write_weights(dst, rest, tensors)
    for name in ("config.json", "generation_config.json"):
        if (qsrc.path / name).is_file():
            (dst / name).write_bytes((qsrc.path / name).read_bytes())
    copy_tokenizer(qsrc.path, dst)
    group = meta.get("group_size") if precision == "int4" else None
    settings = {"layers": layers, "int4_group_size": group, "quantized_from": f"{meta['method']} codes"
                + (f" from {src.path.name}" if src.format == "torch-quant" else " (quantize stage, run by compile)")}
    metrics = {"bytes": weight_bytes, **checks, **measure_quality(qsrc, dst, layers),
               **fit_prediction(dst, target, precision, group), **({"group_size": group} if group else {})}
    return (qsrc if qsrc is src else open_artifact(qsrc.path)), settings, metrics


def _quantize_here(src, cfg, precision: str, target, work: Path):
    import dataclasses

    from edgepack.config import build_config
    from edgepack.stages import get_stage

    spec = get_stage("quantize")
    cls = spec.config_class()
    method = cfg.int4_method if precision == "int4" else precision
    wanted = {"method": method, "format": "torch", "group_size": cfg.group_size}
    fields = {f.name for f in dataclasses.fields(cls)}
    qcfg = build_config(cls, {k: v for k, v in wanted.items() if k in fields}, "compile -> quantize")
    return spec.function()(src, qcfg, target, Path(work) / "quantize")


def _parent_quantize_record(art) -> dict:
    return next((r for r in reversed(art.history) if r.get("stage") == "quantize"), {})


def measure_quality(qsrc, dst: Path, layers: dict) -> dict:
    """Perplexity (edgepack-ppl-v1) of the emulated GPU weights on the held-out text the quantize stage used, and
    the logits' parity with the quantize stage's own (fp32-dequantized) weights on the fixed probe."""
    import dataclasses

    from edgepack.compress.quant_torch import load_quantized
    from edgepack.compress.quantize import QuantizeConfig, split_texts
    from edgepack.config import build_config
    from edgepack.errors import EdgepackError
    from edgepack.hf import load_tokenizer
    from edgepack.quality import PplProtocol, hf_logits_fn, logits_parity, perplexity, token_stream

    rec = _parent_quantize_record(qsrc)
    fields = {f.name for f in dataclasses.fields(QuantizeConfig)}
    raw = {k: v for k, v in (rec.get("config") or {}).items() if k in fields}
    note = "held-out text and protocol of the quantize stage that made the codes"
    try:
        qcfg = build_config(QuantizeConfig, raw, "the parent's quantize settings")
        _, eval_text, texts = split_texts(qcfg)
    except EdgepackError as exc:
        qcfg = QuantizeConfig()
        _, eval_text, texts = split_texts(qcfg)
        note = f"the parent's evaluation text is not readable here ({exc.problem}): the embedded sample's tail"
    model = build_model(dst, layers, "cpu", emulate=True)
    proto = PplProtocol(max_tokens=qcfg.eval_max_tokens).resolved(model.config.max_position_embeddings)
    ids = token_stream(load_tokenizer(qsrc.path), eval_text, proto)
    got = perplexity(hf_logits_fn(model), ids, proto)
    ref, _ = load_quantized(qsrc.path, "cpu")
    parity = logits_parity(hf_logits_fn(ref), hf_logits_fn(model), model.config.vocab_size)
    m = rec.get("metrics") or {}
    out = {"ppl_after": round(got.perplexity, 5), "eval_tokens": got.tokens, "quality_note": note,
           "quality_emulation": "CPU, fp32 activations, the exact weights the GPU kernels hold (int4 tinygemm "
                                "bf16((q-8)s+zf); int8 (q-128)s; fp8 e4m3 x row scale with per-token fp8 "
                                "activations); 16-bit embeddings and norms as stored",
           "protocol": {**got.protocol, **texts}, "parity_vs_quantized": parity}
    if m.get("ppl_after") is not None:
        out["ppl_quantized"] = m["ppl_after"]
        out["ppl_delta_vs_quantized_pct"] = round(100.0 * (got.perplexity / m["ppl_after"] - 1.0), 4)
    if m.get("ppl_before") is not None:
        out["ppl_before"] = m["ppl_before"]
        out["ppl_increase_pct"] = round(100.0 * (got.perplexity / m["ppl_before"] - 1.0), 3)
    return out


def fit_prediction(dst: Path, target, precision: str, group: int | None) -> dict:
    """targets.fit's weight bytes for this model, precision and group on torch-cuda, against the written file."""
    from edgepack.facts import read_model_config
    from edgepack.targets.fit import fit

    r = fit(read_model_config(dst), target, precision=precision, context=1, check_support=False,
            runtime="torch-cuda", **({"group_size": group} if group else {}))
    size = (Path(dst) / WEIGHTS_FILE).stat().st_size
    return {"fit_weights_bytes": r.weights_bytes, "bytes_vs_fit": round(size / r.weights_bytes, 4)}
