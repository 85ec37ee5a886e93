"""The torch path: a `torch-quant` artifact (packed low-bit weights in safetensors + quantization.json), loading it
back, and the kernels that run it.

Layout of a `torch-quant` artifact:
    config.json, generation_config.json, tokenizer files   (the model's own, as in an HF checkpoint)
    model.safetensors   every tensor that was not quantized (fp32), plus per quantized linear NAME:
        int8 / int4-*:  NAME.qweight uint8 (codes, 4-bit packed two per byte, low nibble first: MatMulNBits order),
                        NAME.scales float32 [out, groups], NAME.zeros uint8 (integer zero points) or float32 (HQQ)
        nf4:            NAME.nf4 uint8 (bitsandbytes packing), NAME.absmax float32 [blocks]
        fp8:            NAME.fp8 float8_e4m3fn [out, in], NAME.scale float32 [out] (per output channel)
    quantization.json   method, bits, group size, the layers and what was deliberately kept in fp32

Loading (`load_quantized`) dequantizes to fp32 on CPU: numerically what a weight-only kernel computes, so
perplexity measured this way is the quality of the stored weights. `apply_kernels` swaps in the low-bit kernels of
stock torch built from the stored codes themselves (compress/quant_kernels.py: int4 tinygemm, int8, fp8 W8A8 on
CUDA; int8 also on CPU) and bitsandbytes NF4. int4 and fp8 kernels are CUDA-only and say so instead of failing
deep inside a library. The compiled torch-cuda artifact (deploy/cuda_weights.py) carries these same codes.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgepack.artifact import load_json
from edgepack.errors import ArtifactError, UnsupportedOnTarget, require

TORCH_QUANT_FORMAT = "torch-quant"
QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
NF4_BLOCK = 64  # bitsandbytes' default NF4 block (weights per absmax)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


# ------------------------------------------------------------------------------------------- packing helpers
def pack_codes(codes, bits: int):
    """uint8 codes [out, k] -> packed uint8 [out, k * bits / 8]; 4-bit: element 2i in the low nibble."""
    if bits == 8:
        return codes.contiguous()
    if bits != 4:
        raise ValueError(f"cannot pack {bits}-bit codes")
    c = codes.to(dtype=codes.dtype).view(codes.shape[0], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def unpack_codes(packed, bits: int):
    import torch

    if bits == 8:
        return packed
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def nf4_quantize(weight):
    """(packed uint8, absmax float32) with bitsandbytes' NF4 quantizer (CPU or CUDA)."""
    bnb_f = require("bitsandbytes.functional", "tune", "NF4 quantization")
    packed, state = bnb_f.quantize_4bit(weight.detach().float().contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
    return packed, state.absmax.float()


def nf4_dequantize(packed, absmax, shape):
    import torch

    bnb_f = require("bitsandbytes.functional", "tune", "NF4 dequantization")
    state = bnb_f.QuantState(absmax=absmax, shape=torch.Size(shape), code=bnb_f.get_4bit_type("nf4", device=packed.device),
                             blocksize=NF4_BLOCK, quant_type="nf4", dtype=torch.float32)
    return bnb_f.dequantize_4bit(packed, state)


def fp8_quantize(weight):
    """Per-output-channel scaled float8_e4m3fn (the format of torchao's float8 weight-only and of H100 FP8 GEMMs)."""
    import torch

    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_dequantize(q, scale):
    return q.float() * scale[:, None]


# ------------------------------------------------------------------------------------------------------ save
def save_torch_quant(model, tensors: dict, layers: dict, meta: dict, dst: Path, tokenizer_from: Path) -> None:
    """Write a torch-quant artifact body into dst. tensors: the packed tensors by key (NAME.qweight, ...);
    layers: per quantized linear its kind / shape; meta: method-level facts for quantization.json."""
    import torch
    from safetensors.torch import save_file

    from edgepack.hf import copy_tokenizer

    quantized = {rec["expert_of"] if "expert_of" in rec else f"{name}.weight" for name, rec in layers.items()}
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if k not in quantized and v.is_floating_point()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding: safetensors refuses shared storage
    for k, v in tensors.items():
        state[k] = v.contiguous() if v.dtype != torch.float64 else v.float().contiguous()
    save_file(state, str(dst / WEIGHTS_FILE), metadata={"format": "pt", "edgepack": TORCH_QUANT_FORMAT})
    model.config.save_pretrained(dst)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dst)
    copy_tokenizer(tokenizer_from, dst)
    (dst / QUANT_FILE).write_text(json.dumps({**meta, "layers": layers}, indent=1) + "\n")


def int_layer_tensors(name: str, qw) -> tuple[dict, dict]:
    """Tensors and layer record for a QuantizedWeight (quant_algos)."""
    import torch

    integer_zero = bool(torch.equal(qw.zeros, torch.round(qw.zeros)))
    tensors = {f"{name}.qweight": pack_codes(qw.codes, qw.bits), f"{name}.scales": qw.scales.float(),
               f"{name}.zeros": qw.zeros.to(torch.uint8) if integer_zero else qw.zeros.float()}
    return tensors, {"kind": "int", "bits": qw.bits, "group_size": qw.group_size, "in_features": qw.in_features,
                     "out_features": int(qw.codes.shape[0])}


# ------------------------------------------------------------------------------------------------------ load
def read_quant_meta(path: Path) -> dict:
    p = Path(path) / QUANT_FILE
    if not p.is_file():
        raise ArtifactError(f"'{path}' has no {QUANT_FILE}", "re-run the quantize stage that made it")
    return load_json(p, "re-run the quantize stage that made it")


def dequantized_weight(name: str, rec: dict, st: dict):
    """fp32 [out, in] weight of one quantized linear from its stored tensors."""
    from edgepack.compress.quant_algos import QuantizedWeight

    if rec["kind"] == "int":
        codes = unpack_codes(st[f"{name}.qweight"], rec["bits"])
        return QuantizedWeight(codes, st[f"{name}.scales"].float(), st[f"{name}.zeros"].float(), rec["in_features"],
                               rec["group_size"], rec["bits"]).dequantize()
    if rec["kind"] == "nf4":
        return nf4_dequantize(st[f"{name}.nf4"], st[f"{name}.absmax"], (rec["out_features"], rec["in_features"]))
    if rec["kind"] == "fp8":
        return fp8_dequantize(st[f"{name}.fp8"], st[f"{name}.scale"])
    raise ArtifactError(f"unknown quantized layer kind '{rec['kind']}' for {name}", "re-run the quantize stage")


def load_quantized(path: Path, device: str = "cpu", kernels: bool = False):
    """(model, meta): the quantized model with dequantized fp32 weights (CPU emulation of weight-only kernels);
    with kernels=True the fast kernels for `device` are swapped in (see apply_kernels)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = read_quant_meta(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    st = load_file(str(path / WEIGHTS_FILE))
    state = {k: v for k, v in st.items() if not stored_payload_key(k, meta["layers"])}
    experts: dict[str, dict] = {}
    for name, rec in meta["layers"].items():
        if "expert_of" in rec:  # one expert of a 3-D routed-experts parameter
            experts.setdefault(rec["expert_of"], {})[int(rec["expert"])] = dequantized_weight(name, rec, st)
        else:
            state[f"{name}.weight"] = dequantized_weight(name, rec, st)
    for name, slices in experts.items():
        state[name] = torch.stack([slices[e] for e in range(len(slices))])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ArtifactError(f"'{path}': weights do not match config.json (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]})", "re-run the quantize stage that made it")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(device).eval()
    torch.set_grad_enabled(False)
    if kernels:
        apply_kernels(model, meta, device, st)
    return model, meta


_PAYLOAD = {"qweight", "scales", "zeros", "nf4", "absmax", "fp8", "scale"}


def stored_payload_key(key: str, layers) -> bool:
    """True for a tensor of a quantized linear's stored payload (NAME.qweight, NAME.scales, ...)."""
    name, _, suffix = key.rpartition(".")
    return suffix in _PAYLOAD and name in layers


def apply_kernels(model, meta: dict, device: str, st: dict) -> str:
    """Swap the dequantized linears for a real low-bit kernel on `device`, built from the stored tensors `st` (the
    very codes that were measured; nothing is re-quantized); returns the kernel's name."""
    method = meta["method"]
    names = set(meta["layers"])
    on_cuda = str(device).startswith("cuda")
    if method in ("fp8",) or method.startswith("int4"):
        if not on_cuda:
            raise UnsupportedOnTarget(
                f"the {method} kernel ({'fp8 torch._scaled_mm' if method == 'fp8' else 'int4 tinygemm'}) runs only on "
                "a CUDA GPU" + (" with FP8 tensor cores (sm_89+)" if method == "fp8" else ""),
                "on CPU load without kernels (dequantized fp32 weights: same quality, no speed-up), or use "
                "--format onnx for a fast CPU INT4 path (MatMulNBits)")
    if method == "fp8":
        import torch

        if torch.cuda.get_device_capability(device) < (8, 9):
            raise UnsupportedOnTarget(f"FP8 kernels need compute capability 8.9+ (Ada, Hopper); this GPU is "
                                      f"sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}",
                                      "quantize with int8 or int4-gptq for this GPU")
    if method == "nf4":
        return _nf4_kernels(model, names, device)
    from edgepack.compress.quant_kernels import KERNEL_NAMES, kernel_module, lowbit_from_stored, set_module

    kind = None
    for name, rec in meta["layers"].items():
        if "expert_of" in rec:  # routed experts keep their dequantized weights (no batched low-bit kernel here)
            continue
        tensors, layer = lowbit_from_stored(name, rec, st)
        old = model.get_submodule(name)
        if getattr(old, "bias", None) is not None:
            tensors[f"{name}.bias"] = old.bias.detach()
        set_module(model, name, kernel_module(name, layer, tensors, device))
        kind = layer["kind"]
    return KERNEL_NAMES.get(kind, method)


def _nf4_kernels(model, names: set, device: str) -> str:
    import torch

    bnb = require("bitsandbytes", "tune", "NF4 kernels")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=torch.float32, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(old.weight.data.float(), requires_grad=False, quant_type="nf4",
                                       blocksize=NF4_BLOCK)
        if old.bias is not None:
            new.bias = old.bias
        setattr(parent, child, new.to(device))
    return "bitsandbytes nf4"


# ------------------------------------------------------------------------------------------- scorer / runtime
def open_torch_quant_scorer(art):
    """SCORERS entry: (logits_fn, tokenizer dir, max positions) for a torch-quant artifact."""
    from edgepack.quality import hf_logits_fn

    model, _ = load_quantized(art.path, "cpu")
    return hf_logits_fn(model), art.path, model.config.max_position_embeddings


def open_torch_quant_runtime(art, threads: int | None = None, device: str = "cpu", kernels: bool | None = None, **_):
    """RUNTIMES entry: a TorchRuntime over the quantized model. kernels=None uses the fast kernel where one exists
    for this device (stock torch int8 kernels on CPU; every method on CUDA: compress/quant_kernels.py) and the
    dequantized weights otherwise."""
    from edgepack.deploy.torch_runtime import TorchRuntime

    meta = read_quant_meta(art.path)
    if kernels is None:
        kernels = str(device).startswith("cuda") or meta["method"] == "int8"
    model, _ = load_quantized(art.path, device, kernels=kernels)
    return TorchRuntime(model, threads)
