"""The low-bit linears the GPU runs, from stock torch's own kernels (no torchao, no bitsandbytes), their shape rules,
and the exact CPU emulation of what each one computes, so the quality measured on a CPU is the quality that runs.

    int4  W4A16 tinygemm, torch.ops.aten._weight_int4pack_mm (CUDA; _for_cpu on CPU). Per weight it computes
          w = bf16((q - 8) * s + zf), one fused multiply-add rounded once, with q the 4-bit code, s the group's bf16
          scale and zf a bf16 "zero in the float domain". Our asymmetric codes (w = (q - z) * s, integer z) go in
          unchanged: s = bf16(s), zf = bf16((8 - z) * s) (tinygemm_params). Exact by construction: (q - 8) * s_bf
          has at most 12 significant bits and zf 8, so their sum is exact in fp32 (zf smaller than s * 2^-9, which
          only a float HQQ zero near 8 gives, is flushed to 0 to keep it so) and the fp32 emulation
          (int4_dequantize) rounds once, like the kernel; tests/test_gpu_runtimes.py checks it bit for bit against
          the CPU op, and the `gpu` test against the CUDA op.
          Rules: group 32 / 64 / 128 / 256; K a multiple of the group and of 16 * innerKTiles (2, 4 or 8); N a
          multiple of 8 (16 for the CPU op). A layer that breaks them is padded (int4_shape): zero activations in
          the padded K columns, sliced-off rows beyond N, so padding changes no output bit.
          Layout: uint8 [N, K/2] with element 2i in the HIGH nibble (our stored codes are low-nibble first, the
          MatMulNBits order: swapped at load), converted on the device by _convert_weight_to_int4pack; scales and
          zeros bf16 [K/G, N, 2].
    int8  W8A16: y = F.linear(x, w8.to(x.dtype)) * s with int8 codes and the fp32 scale per output row, so the
          weights are exactly the measured (q - 128) * s. Fast on CUDA only when torch.compile fuses the cast into
          the GEMV (inductor's coordinate-descent tuning turns an M=1 matmul into a Triton reduction: gpt-fast's
          recipe); aten._weight_int8pack_mm's CUDA kernel is a naive loop, so it serves the CPU only.
    fp8   W8A8 on FP8 tensor cores (sm_89+): torch._scaled_mm(x8, w8.t(), scale_a [M,1], scale_b [1,N], bf16 out,
          fast accumulation), weights float8_e4m3fn with an fp32 scale per output row (amax / 448), activations
          quantized per token at run time (amax / 448): torchao's PerRow recipe. Rules: K and N multiples of 16
          (padded like int4). On CPU the same quantization is emulated in fp32 (Fp8Linear.forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgepack.errors import UnsupportedOnTarget

TINYGEMM_GROUPS = (32, 64, 128, 256)
TINYGEMM_N_MULTIPLE = 8  # CUDA: every N tile is 8 wide
CPU_INT4_N_MULTIPLE = 16  # aten._convert_weight_to_int4pack_for_cpu
TINYGEMM_K_MULTIPLE = 32  # 16 * the smallest innerKTiles (2)
FP8_MULTIPLE = 16  # torch._scaled_mm: K % 16 == 0 and N % 16 == 0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
ZF_FLUSH = 2.0**-9  # |zf| < s * ZF_FLUSH -> 0: keeps (q - 8) * s + zf exact in fp32 (see the module docstring)
KERNEL_NAMES = {"int4": "tinygemm int4 (aten._weight_int4pack_mm)", "int8": "int8 weight-only (F.linear x scale)",
                "fp8": "fp8 W8A8 (torch._scaled_mm, per-row scales)"}
ZERO_RANGE = (-8.0, 24.0)  # |8 - z| <= 16: the exactness argument's bound on (float) zero points


def round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


# ------------------------------------------------------------------------------------------------------ int4
@dataclass(frozen=True)
class Int4Shape:
    """One linear in tinygemm's layout: real and padded widths, and the inner K tiles the CUDA pack uses."""
    n: int
    k: int
    group: int
    n_pad: int
    k_pad: int
    inner_k_tiles: int

    @property
    def padded(self) -> bool:
        return (self.n_pad, self.k_pad) != (self.n, self.k)


def int4_shape(n: int, k: int, group: int, n_multiple: int = TINYGEMM_N_MULTIPLE) -> Int4Shape:
    """tinygemm's shape rules for an [n, k] weight in groups of `group` input columns (raises when no padding helps)."""
    if group not in TINYGEMM_GROUPS:
        raise UnsupportedOnTarget(f"the int4 GPU kernel (tinygemm) takes groups of {', '.join(map(str, TINYGEMM_GROUPS))} "
                                  f"input channels, not {group}", "quantize with --group-size 32 (or 64 / 128 / 256)")
    k_pad = round_up(k, max(group, TINYGEMM_K_MULTIPLE))
    inner = 8 if k_pad % 128 == 0 else 4 if k_pad % 64 == 0 else 2
    return Int4Shape(n, k, group, round_up(n, n_multiple), k_pad, inner)


def tinygemm_params(scales, zeros):
    """bf16 scales_and_zeros [groups, N, 2] for codes with w = (q - z) * s: (bf16(s), bf16((8 - z) * bf16(s)))."""
    z = zeros.float()
    if z.numel() and (float(z.min()) < ZERO_RANGE[0] or float(z.max()) > ZERO_RANGE[1]):
        raise UnsupportedOnTarget(f"a zero point ({float(z.min()):.2f} .. {float(z.max()):.2f}) lies outside "
                                  f"{ZERO_RANGE}, where tinygemm's fp32 emulation is no longer provably exact",
                                  "quantize with int4-gptq / int4-rtn (integer zero points)")
    s_bf = scales.float().to(torch.bfloat16)
    zf = (8.0 - z) * s_bf.float()
    zf = torch.where(zf.abs() < s_bf.float() * ZF_FLUSH, torch.zeros_like(zf), zf).to(torch.bfloat16)
    return torch.stack([s_bf, zf], -1).transpose(0, 1).contiguous()


def unpack_int4(packed):
    """uint8 [N, K/2], element 2i in the low nibble -> uint8 codes [N, K]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def int4_dequantize(qweight, scales_and_zeros, group: int, k: int):
    """bf16 [N, k]: the weights tinygemm computes with, bf16((q - 8) * s + zf), computed exactly in fp32 and rounded
    once. qweight: uint8 [N, groups * group / 2] (low nibble first); scales_and_zeros: bf16 [groups, N, 2]."""
    q = unpack_int4(qweight).float()
    s = scales_and_zeros[..., 0].t().float().repeat_interleave(group, 1)
    zf = scales_and_zeros[..., 1].t().float().repeat_interleave(group, 1)
    return ((q - 8.0) * s + zf).to(torch.bfloat16)[:, :k]


def _pad_int4(qweight, sz, shape: Int4Shape, device):
    """Codes uint8 [n_pad, k_pad] and scales_and_zeros [k_pad / group, n_pad, 2] on `device`: padded rows and
    groups have scale 0 and zero 0 (weight exactly 0); padded columns of a real group keep their stored code and
    only ever meet zero activations."""
    codes = unpack_int4(qweight.to(device))
    n, kg = codes.shape
    full = torch.full((shape.n_pad, shape.k_pad), 8, dtype=torch.uint8, device=device)
    full[:n, :min(kg, shape.k_pad)] = codes[:, :shape.k_pad]
    sz_full = torch.zeros((shape.k_pad // shape.group, shape.n_pad, 2), dtype=torch.bfloat16, device=device)
    sz_full[: sz.shape[0], :n] = sz.to(device)[: shape.k_pad // shape.group]
    return full, sz_full


class Int4Linear(torch.nn.Module):
    """W4A16 through tinygemm: bf16 activations in, the module's dtype out. Built from stored codes on the device it
    runs on; no floating-point copy of the weight exists at any point."""

    def __init__(self, qweight, scales_and_zeros, group: int, in_features: int, out_features: int, bias=None,
                 device="cuda"):
        super().__init__()
        device = torch.device(device)
        cpu = device.type == "cpu"
        self.in_features, self.out_features, self.group = int(in_features), int(out_features), int(group)
        self.shape = int4_shape(out_features, in_features, group, CPU_INT4_N_MULTIPLE if cpu else TINYGEMM_N_MULTIPLE)
        codes, sz = _pad_int4(qweight, scales_and_zeros, self.shape, device)
        if cpu:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        else:  # tinygemm wants element 2i in the HIGH nibble
            hi_first = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(hi_first, self.shape.inner_k_tiles)
        del codes
        self.register_buffer("weight_packed", packed)
        self.register_buffer("scales_and_zeros", sz)
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=torch.bfloat16))
        self._op = (torch.ops.aten._weight_int4pack_mm_for_cpu if cpu else torch.ops.aten._weight_int4pack_mm)

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.shape.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.shape.k_pad - self.in_features))
        y = self._op(x2.contiguous(), self.weight_packed, self.group, self.scales_and_zeros)
        if self.shape.n_pad != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"padded_to=({self.shape.n_pad}, {self.shape.k_pad}), inner_k_tiles={self.shape.inner_k_tiles}")


# ------------------------------------------------------------------------------------------------------ int8
def int8_from_codes(codes, scales):
    """Our stored int8 (uint8 codes, zero 128, fp32 scale [N, 1]) -> (int8 [N, K], fp32 scale [N])."""
    return (codes.to(torch.int16) - 128).to(torch.int8), scales.float().reshape(-1)


class Int8Linear(torch.nn.Module):
    """W8A16: y = (x @ w8^T) * s. On CPU aten._weight_int8pack_mm (a real kernel there) for fp32 activations, or 16-bit
    ones with K % 16 == 0: torch 2.13's CPU kernel crashes (SIGSEGV) on bf16 input with K = 172 or 100."""

    def __init__(self, weight_int8, scales, bias=None, device="cuda"):
        super().__init__()
        self.out_features, self.in_features = (int(d) for d in weight_int8.shape)
        self.register_buffer("weight_int8", weight_int8.to(device).contiguous())
        self.register_buffer("scales", scales.float().reshape(-1).to(device))
        self.register_buffer("bias", None if bias is None else bias.to(device))

    def forward(self, x):
        if x.device.type == "cpu" and (x.dtype == torch.float32 or (x.dtype in (torch.bfloat16, torch.float16)
                                                                    and self.in_features % 16 == 0)):
            lead = x.shape[:-1]
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.weight_int8,
                                          self.scales.to(x.dtype)).reshape(*lead, self.out_features)
        else:
            y = (F.linear(x, self.weight_int8.to(x.dtype)) * self.scales).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# ------------------------------------------------------------------------------------------------------- fp8
def fp8_shape(n: int, k: int) -> tuple[int, int]:
    """(n_pad, k_pad) for torch._scaled_mm's rule that K and N are multiples of 16."""
    return round_up(n, FP8_MULTIPLE), round_up(k, FP8_MULTIPLE)


def quantize_activation_fp8(x2):
    """Per-token (row) dynamic scale amax / 448 and the e4m3 activations: (x8 [M, K], scale [M, 1] fp32)."""
    xs = (x2.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
    return (x2.float() / xs).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), xs


class Fp8Linear(torch.nn.Module):
    """W8A8 FP8: e4m3 weights with an fp32 scale per output row, activations quantized per token at run time, one
    torch._scaled_mm on CUDA; on CPU the same quantized operands multiplied in fp32 (the emulation the compile stage
    measures quality with)."""

    def __init__(self, weight_fp8, scale, bias=None, device="cuda"):
        super().__init__()
        n, k = (int(d) for d in weight_fp8.shape)
        self.out_features, self.in_features = n, k
        self.n_pad, self.k_pad = fp8_shape(n, k)
        w = torch.zeros((self.n_pad, self.k_pad), dtype=torch.float8_e4m3fn, device=device)
        w[:n, :k] = weight_fp8.to(device)
        s = torch.ones((1, self.n_pad), dtype=torch.float32, device=device)
        s[0, :n] = scale.float().reshape(-1).to(device)
        self.register_buffer("weight_fp8", w)  # [N, K] row-major: .t() is the column-major [K, N] _scaled_mm wants
        self.register_buffer("scale_w", s)
        self.register_buffer("bias", None if bias is None else bias.to(device))

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        x8, xs = quantize_activation_fp8(x2)
        if x.device.type == "cuda":
            y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=xs, scale_b=self.scale_w, out_dtype=torch.bfloat16,
                                 use_fast_accum=True)
        else:
            y = (x8.float() * xs) @ (self.weight_fp8.float() * self.scale_w.t()).t()
        if self.n_pad != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features).to(x.dtype)


# ---------------------------------------------------------------------------------- stored codes -> kernels
def int4_tensors(name: str, qweight, scales, zeros) -> dict:
    """tinygemm's tensors for our codes: the packed codes unchanged, (bf16(s), bf16((8 - z) s)) per group."""
    return {f"{name}.qweight": qweight.contiguous(), f"{name}.scales_and_zeros": tinygemm_params(scales, zeros)}


def lowbit_from_stored(name: str, rec: dict, st: dict) -> tuple[dict, dict]:
    """(kernel tensors, layer record) of one linear of a torch-quant artifact (compress/quant_torch.py layout): the
    stored codes, unchanged."""
    shape = {"in_features": rec["in_features"], "out_features": rec["out_features"]}
    if rec["kind"] == "int" and rec["bits"] == 4:
        return (int4_tensors(name, st[f"{name}.qweight"], st[f"{name}.scales"], st[f"{name}.zeros"]),
                {"kind": "int4", "group_size": rec["group_size"], **shape})
    if rec["kind"] == "int" and rec["bits"] == 8:
        if not bool((st[f"{name}.zeros"].float() == 128).all()):
            raise UnsupportedOnTarget(f"{name}: int8 codes with zero points other than 128 (asymmetric)",
                                      "quantize with --method int8 (symmetric per channel)")
        w8, s = int8_from_codes(st[f"{name}.qweight"], st[f"{name}.scales"])
        return {f"{name}.qweight": w8, f"{name}.scales": s}, {"kind": "int8", **shape}
    if rec["kind"] == "fp8":
        return ({f"{name}.fp8": st[f"{name}.fp8"], f"{name}.scale": st[f"{name}.scale"].float()},
                {"kind": "fp8", **shape})
    raise UnsupportedOnTarget(f"the GPU kernels have no '{rec['kind']}' layers ({name})",
                              "quantize with int4-gptq / int8 / fp8")


def kernel_module(name: str, rec: dict, st: dict, device, emulate: bool = False):
    """The module that runs one quantized linear (layer record `rec`, kernel tensors in `st`) on `device`;
    emulate=True: a CPU fp32 module computing with exactly the kernel's weights (int4: int4_dequantize, bit for
    bit; int8: (q - 128) * s; fp8: Fp8Linear's own emulation, per-token fp8 activations included)."""
    bias = st.get(f"{name}.bias")
    n, k, kind = rec["out_features"], rec["in_features"], rec["kind"]
    if kind == "fp8":
        return Fp8Linear(st[f"{name}.fp8"], st[f"{name}.scale"], bias, device="cpu" if emulate else device)
    if kind not in ("int4", "int8"):
        raise ValueError(f"unknown quantized layer kind '{kind}' for {name}")
    if not emulate:
        if kind == "int4":
            return Int4Linear(st[f"{name}.qweight"], st[f"{name}.scales_and_zeros"], rec["group_size"], k, n, bias,
                              device=device)
        return Int8Linear(st[f"{name}.qweight"], st[f"{name}.scales"], bias, device=device)
    if kind == "int4":
        w = int4_dequantize(st[f"{name}.qweight"], st[f"{name}.scales_and_zeros"], rec["group_size"], k).float()
    else:
        w = st[f"{name}.qweight"].float() * st[f"{name}.scales"].float()[:, None]
    lin = torch.nn.Linear(k, n, bias=bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.float(), requires_grad=False)
    return lin


def set_module(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
