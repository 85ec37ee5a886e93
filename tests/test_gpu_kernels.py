"""The low-bit kernels torch-cuda runs (compress/quant_kernels.py) compute exactly what was measured: int4 tinygemm
bit for bit against our codes (through torch's CPU int4pack kernel here, the CUDA one under the `gpu` marker),
int8 from the codes, fp8 W8A8's scaling and shape rules (torch._scaled_mm on CPU where this torch has it, else the
emulation alone), and the attention over the filled length equals full attention."""

from __future__ import annotations

import pytest
import torch

from edgepack.compress import quant_kernels as qk
from edgepack.compress.quant_algos import hqq, rtn
from edgepack.compress.quant_torch import fp8_quantize, pack_codes
from edgepack.errors import UnsupportedOnTarget

# (out, in, group, algorithm): aligned, the 172-wide stories260K MLP both ways, innerKTiles 2, HQQ float zeros,
# symmetric codes (zero 8: zf = 0)
CASES = [(64, 128, 32, "rtn"), (172, 64, 32, "rtn"), (64, 172, 32, "rtn"), (32, 96, 32, "rtn"),
         (48, 256, 64, "hqq"), (40, 256, 128, "sym")]


def _codes(n, k, g, alg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, :3] *= 8  # outliers: groups that use codes 0 and 15 and groups that do not
    return {"rtn": lambda: rtn(w, 4, g), "hqq": lambda: hqq(w, 4, g), "sym": lambda: rtn(w, 4, g, symmetric=True)}[alg]()


@pytest.mark.parametrize("n,k,g,alg", CASES)
def test_int4_tinygemm_layout_reproduces_our_codes_bit_for_bit(n, k, g, alg):
    """torch's own int4pack kernel (CPU variant: same formula as CUDA's, w = (q - 8) * s + zf) dequantizes our packed
    codes to exactly bf16((q - 8) * bf16(s) + bf16((8 - z) * bf16(s))), the emulation the compile stage measures
    quality with; and that is (q - z) * s up to three bf16 roundings (s, zf, the result: each at most 2^-8 relative,
    so at most (15 + 8 + 15) / 256 = 0.15 of a step; 0.04-0.09 here)."""
    qw = _codes(n, k, g, alg)
    packed = pack_codes(qw.codes, 4)
    sz = qk.tinygemm_params(qw.scales, qw.zeros)
    assert sz.shape == (qw.scales.shape[1], n, 2) and sz.dtype == torch.bfloat16
    lin = qk.Int4Linear(packed, sz, g, k, n, device="cpu")
    got = lin(torch.eye(k)).t().to(torch.bfloat16)  # row j of I_K picks input column j: the kernel's own weight
    want = qk.int4_dequantize(packed, sz, g, k)
    assert torch.equal(got, want)
    step = qw.scales.repeat_interleave(g, 1)[:, :k]
    err = ((want.float() - qw.dequantize()) / step).abs().max()
    assert err <= 0.15
    shape = qk.int4_shape(n, k, g)
    assert shape.k_pad % g == 0 and shape.k_pad % (16 * shape.inner_k_tiles) == 0 and shape.n_pad % 8 == 0
    assert shape.padded == (n % 8 != 0 or k % max(g, 32) != 0)
    # a whole-model-like input gives the same result as the emulated weights in bf16 arithmetic
    x = torch.randn(3, k, dtype=torch.bfloat16)
    ref = x.float() @ want.float().t()
    assert ((lin(x).float() - ref).norm() / ref.norm()) < 1e-2


def test_int4_shape_rules_and_exactness_guards():
    assert qk.int4_shape(2048, 2048, 32) == qk.Int4Shape(2048, 2048, 32, 2048, 2048, 8)  # Llama-1B: no padding
    assert qk.int4_shape(8192, 2048, 128).inner_k_tiles == 8
    assert qk.int4_shape(64, 172, 32) == qk.Int4Shape(64, 172, 32, 64, 192, 4)
    with pytest.raises(UnsupportedOnTarget, match="groups of 32, 64, 128, 256 input channels, not 16"):
        qk.int4_shape(64, 64, 16)
    # symmetric codes: zero 8 gives zf = 0 exactly; a float zero within s/512 of 8 is flushed to 0
    s = torch.full((2, 1), 0.01)
    sz = qk.tinygemm_params(s, torch.tensor([[8.0], [8.0 + 1e-4]]))
    assert sz[0, :, 1].tolist() == [0.0, 0.0]
    with pytest.raises(UnsupportedOnTarget, match="outside"):
        qk.tinygemm_params(s, torch.tensor([[30.0], [8.0]]))


def test_int8_kernel_runs_exactly_the_codes():
    qw = rtn(torch.randn(24, 40) * 0.1, 8, 40, symmetric=True)
    w8, s = qk.int8_from_codes(qw.codes, qw.scales)
    assert w8.dtype == torch.int8 and torch.equal((w8.float() * s[:, None]), qw.dequantize())
    lin = qk.Int8Linear(w8, s, device="cpu")
    x = torch.randn(5, 40)
    assert torch.allclose(lin(x), x @ qw.dequantize().t(), atol=1e-5)
    x16 = torch.randn(5, 40, dtype=torch.bfloat16)  # 16-bit with K % 16 != 0: the F.linear path (no CPU crash)
    assert lin(x16).dtype == torch.bfloat16


def test_fp8_w8a8_scaling_and_shape_rules():
    """Weights per output row and activations per token, each scaled by amax / 448 into e4m3; K and N padded to 16;
    the CPU emulation equals torch._scaled_mm's math (where this torch has a CPU _scaled_mm) and stays within e4m3's
    error of the fp32 product."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(172, 64, generator=gen), torch.randn(3, 64, generator=gen) * 4
    w8, ws = fp8_quantize(w)
    assert torch.allclose(ws, w.abs().amax(1) / 448)
    lin = qk.Fp8Linear(w8, ws, device="cpu")
    assert (lin.n_pad, lin.k_pad) == (176, 64) == qk.fp8_shape(172, 64) and qk.fp8_shape(2048, 8192) == (2048, 8192)
    assert lin.weight_fp8.t().stride() == (1, 64)  # the column-major [K, N] operand _scaled_mm wants
    x8, xs = qk.quantize_activation_fp8(x)
    assert xs.shape == (3, 1) and xs.dtype == torch.float32 and torch.allclose(xs, x.abs().amax(1, keepdim=True) / 448)
    assert x8.dtype == torch.float8_e4m3fn and float(x8.float().abs().max()) == 448.0
    y = lin(x)
    assert y.shape == (3, 172)
    ref = x @ w.t()
    assert ((y - ref).norm() / ref.norm()) < 0.06  # e4m3 on both operands
    emul = (x8.float() * xs) @ (w8.float() * ws[:, None]).t()
    assert torch.allclose(y, emul, rtol=1e-5, atol=1e-5)
    try:
        mm = torch._scaled_mm(x8, lin.weight_fp8.t(), scale_a=xs, scale_b=lin.scale_w, out_dtype=torch.bfloat16,
                              use_fast_accum=True)
    except (RuntimeError, NotImplementedError):
        pytest.skip("this torch has no CPU _scaled_mm: the emulation above is what is checked")
    assert ((mm[:, :172].float() - emul).norm() / emul.norm()) < 1e-2  # bf16 output rounding


# ------------------------------------------------------------------------------------------- on a CUDA GPU
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,g,alg", CASES)
def test_int4_cuda_kernel_dequantizes_our_codes_bit_for_bit(n, k, g, alg):
    """The CUDA tinygemm kernel on the nibble-swapped, padded layout holds exactly the emulated weights."""
    qw = _codes(n, k, g, alg)
    packed = pack_codes(qw.codes, 4)
    sz = qk.tinygemm_params(qw.scales, qw.zeros)
    lin = qk.Int4Linear(packed, sz, g, k, n, device="cuda")
    got = lin(torch.eye(k, device="cuda", dtype=torch.bfloat16)).t().cpu()
    assert torch.equal(got, qk.int4_dequantize(packed, sz, g, k))


@pytest.mark.gpu
def test_fp8_scaled_mm_on_cuda_matches_the_emulation():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(2048, 2048, generator=gen) * 0.02, torch.randn(4, 2048, generator=gen)
    w8, ws = fp8_quantize(w)
    gpu = qk.Fp8Linear(w8, ws, device="cuda")(x.cuda().to(torch.bfloat16)).float().cpu()
    cpu = qk.Fp8Linear(w8, ws, device="cpu")(x.to(torch.bfloat16).float())
    assert ((gpu - cpu).norm() / cpu.norm()) < 2e-2  # bf16 activations and output, fast accumulation


@pytest.mark.gpu
def test_int8_on_cuda_matches_the_codes():
    qw = rtn(torch.randn(256, 512) * 0.1, 8, 512, symmetric=True)
    w8, s = qk.int8_from_codes(qw.codes, qw.scales)
    x = torch.randn(2, 512)
    y = qk.Int8Linear(w8, s, device="cuda")(x.cuda().to(torch.bfloat16)).float().cpu()
    ref = x @ qw.dequantize().t()
    assert ((y - ref).norm() / ref.norm()) < 1e-2
