"""Model-level weight quantization verbs in torch: round-to-nearest (RTN), GPTQ, AWQ and HQQ, on nn.Linear layers.

Every algorithm returns the same thing per layer, a `QuantizedWeight`: integer codes in [0, 2^bits), one scale and
one zero point per (output row, group of `group_size` input columns), laid out exactly like onnxruntime's
`MatMulNBits` (dequantized w = (code - zero) * scale), so the ONNX path packs these codes directly and the torch
path stores them; both therefore run the very weights whose quality was measured here.

Group sizes that do not divide a layer's input width (stories260K's MLP down_proj is 172 wide) are handled like
MatMulNBits handles them: the last group is short. Its scale and zero come from its real columns only; the codes
are padded with the zero point, so padding dequantizes to exactly 0.

Why our own GPTQ / AWQ / HQQ rather than a library:
  - gptqmodel pulls a large dependency tree and CUDA-oriented kernels for a ~100-line algorithm; auto-gptq does not
    import with transformers 5; llmcompressor pins transformers <= 5.17 (this project uses 5.23).
  - onnxruntime's MatMulNBitsQuantizer GPTQ mode needs neural-compressor and calibrates through the ONNX graph,
    so the torch path could not share it; one torch implementation serves both runtimes with identical codes.
Measured on stories260K, group 32, calibration on the first 90 % of the TinyStories sample, perplexity on the
held-out 10 % (25k tokens, edgepack-ppl-v1; scripts/quantize_table.py): RTN +10.8 %, HQQ +7.2 %, AWQ+RTN +8.6 %,
GPTQ +5.5 %. GPTQ variants tried, none better beyond noise (+/-0.5 %): act-order, more / longer calibration
sequences, damping 0.01-0.1, HQQ grids inside GPTQ, least-squares scale refits, AWQ scales before GPTQ, GPTAQ input
correction (+6.2 %); dynamic groups were worse (+7 to +8 %). The simplest (static groups with a clip search,
true-sequential) is the default. int4-gptq-kd (quant_refine.py) starts from these codes and refines them end to
end by distillation: +3.3 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # uint8 [out, groups * group_size], values in [0, 2^bits); padding holds the zero point
    scales: torch.Tensor  # float32 [out, groups]
    zeros: torch.Tensor  # float32 [out, groups]: integer-valued except for HQQ
    in_features: int  # real input width K (codes may be padded beyond it)
    group_size: int
    bits: int

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in_features] weight that a weight-only kernel computes with."""
        n, g = self.scales.shape
        q = self.codes.float().view(n, g, self.group_size)
        w = (q - self.zeros[..., None]) * self.scales[..., None]
        return w.reshape(n, g * self.group_size)[:, : self.in_features]


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def group_params(w: torch.Tensor, bits: int, symmetric: bool, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of w [rows, cols] for min/max (or max-abs) round-to-nearest. `clip` (<= 1) shrinks the
    range. Symmetric uses zero = 2^(bits-1) (MatMulNBits' default when no zero points are given)."""
    maxq = 2**bits - 1
    if symmetric:
        amax = w.abs().amax(dim=1).clamp_min(1e-12) * clip
        scale = amax / (maxq // 2)  # codes -maxq//2-1 .. maxq//2 around the zero: e.g. [-8, 7] for 4 bits
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        lo = (w.amin(dim=1).clamp(max=0) * clip)
        hi = (w.amax(dim=1).clamp(min=0) * clip)
        scale = ((hi - lo) / maxq).clamp_min(1e-12)
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale[:, None] + zero[:, None]), 0, 2**bits - 1)


def _pack(codes_by_group: list[torch.Tensor], scales, zeros, k: int, group_size: int, bits: int) -> QuantizedWeight:
    n = scales[0].shape[0]
    codes = torch.empty(n, len(codes_by_group) * group_size, dtype=torch.uint8, device=scales[0].device)
    for g, c in enumerate(codes_by_group):
        block = torch.round(zeros[g]).clamp(0, 2**bits - 1)[:, None].expand(n, group_size).clone()
        block[:, : c.shape[1]] = c
        codes[:, g * group_size:(g + 1) * group_size] = block.to(torch.uint8)
    return QuantizedWeight(codes, torch.stack(scales, 1).float(), torch.stack(zeros, 1).float(), k, group_size, bits)


CLIP_GRID = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # range shrink factors tried by the clip search


def rtn(w: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = False,
        clip_search: bool = False) -> QuantizedWeight:
    """Round-to-nearest per group. `clip_search`: per group, try shrinking the range (1.0 .. 0.80) and keep the
    factor with the lowest squared error (cheap, data-free)."""
    w = w.detach().float()
    k = w.shape[1]
    codes, scales, zeros = [], [], []
    for g0 in range(0, k, group_size):
        wg = w[:, g0:g0 + group_size]
        scale, zero = group_params(wg, bits, symmetric)
        if clip_search:
            best = (((encode(wg, scale, zero, bits) - zero[:, None]) * scale[:, None] - wg).pow(2)).sum(1)
            for c in CLIP_GRID:
                s2, z2 = group_params(wg, bits, symmetric, clip=c)
                err = (((encode(wg, s2, z2, bits) - z2[:, None]) * s2[:, None] - wg).pow(2)).sum(1)
                better = err < best
                scale, zero, best = torch.where(better, s2, scale), torch.where(better, z2, zero), torch.minimum(err, best)
        codes.append(encode(wg, scale, zero, bits))
        scales.append(scale)
        zeros.append(zero)
    return _pack(codes, scales, zeros, k, group_size, bits)


def hqq(w: torch.Tensor, bits: int = 4, group_size: int = 32, iters: int = 20, lp_norm: float = 0.7,
        beta: float = 10.0, kappa: float = 1.01) -> QuantizedWeight:
    """HQQ: keep the min/max scale, optimise a float zero point per group by half-quadratic splitting with a
    sparsity-promoting l_p (p < 1) error, so outlier weights do not drag the whole group's grid."""
    w = w.detach().float()
    k = w.shape[1]
    maxq = 2**bits - 1
    codes, scales, zeros = [], [], []
    for g0 in range(0, k, group_size):
        wg = w[:, g0:g0 + group_size]
        lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
        scale = ((hi - lo) / maxq).clamp_min(1e-12)
        zero = -lo / scale
        b, best_err, best_zero = beta, float("inf"), zero
        for _ in range(iters):
            q = torch.clamp(torch.round(wg / scale + zero), 0, maxq)
            w_hat = (q - zero) * scale
            err = wg - w_hat
            # generalised soft-thresholding: the proximal step of |e|^p
            w_e = torch.sign(err) * torch.relu(err.abs() - (1.0 / b) * err.abs().clamp_min(1e-12).pow(lp_norm - 1))
            zero = torch.mean(q - (wg - w_e) / scale, dim=1, keepdim=True)
            b *= kappa
            cur = float(err.abs().mean())
            if cur < best_err:
                best_err, best_zero = cur, zero
            else:
                break
        zero = best_zero
        codes.append(torch.clamp(torch.round(wg / scale + zero), 0, maxq))
        scales.append(scale[:, 0])
        zeros.append(zero[:, 0])
    # with a float zero no code dequantizes to exactly 0; padding columns are never read (dequantize() and
    # MatMulNBits both stop at the real input width)
    return _pack(codes, scales, zeros, k, group_size, bits)


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = False,
         act_order: bool = False, damp: float = 0.01, static_groups: bool = True) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize columns one at a time, spreading each column's error over the columns
    not yet quantized through the inverse Hessian of the layer's inputs (H = 2/n sum x x^T, [in, in]).

    static_groups (default, measured best): scale/zero come from the original weights with a small clip search
    before any update; otherwise each group takes min/max of the error-updated weights when GPTQ reaches it.
    act_order visits columns by decreasing Hessian diagonal; it forces static groups, so codes keep the contiguous
    group layout MatMulNBits needs."""
    w = w.detach().float().clone()
    n, k = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    ref = rtn(w, bits, group_size, symmetric, clip_search=True)
    scale_cols = ref.scales.repeat_interleave(group_size, 1)[:, :k]
    zero_cols = ref.zeros.repeat_interleave(group_size, 1)[:, :k]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    scale_cols, zero_cols = scale_cols[:, perm], zero_cols[:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    maxq = 2**bits - 1
    dynamic = not (act_order or static_groups)  # groups take their range from the error-updated weights
    block = group_size * max(1, 128 // group_size)  # whole groups per block, so a dynamic group sits in one block
    scales, zeros = list(ref.scales.unbind(1)), list(ref.zeros.unbind(1))
    q_all = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if dynamic and (i1 + i) % group_size == 0:
                g = (i1 + i) // group_size
                scales[g], zeros[g] = group_params(w1[:, i:i + group_size], bits, symmetric)
                scale_cols[:, i1 + i:i1 + i + group_size] = scales[g][:, None]
                zero_cols[:, i1 + i:i1 + i + group_size] = zeros[g][:, None]
            col, s, z = w1[:, i], scale_cols[:, i1 + i], zero_cols[:, i1 + i]
            q = torch.clamp(torch.round(col / s + z), 0, maxq)
            q_all[:, i1 + i] = q
            e = (col - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = torch.empty_like(q_all)
    codes[:, perm] = q_all
    groups = [codes[:, g0:g0 + group_size] for g0 in range(0, k, group_size)]
    return _pack(groups, scales, zeros, k, group_size, bits)


# ------------------------------------------------------------------------------------------------ model level
# MoE routers (Linear hidden -> experts; Qwen2-MoE's shared-expert gate): tiny, and a flipped top-k choice sends a
# token to another expert, so they stay at full precision
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})


def is_router(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ROUTER_NAMES


def quantizable_linears(model) -> dict[str, torch.nn.Linear]:
    """The decoder's nn.Linear layers by qualified name. lm_head is left out on purpose: it is tied to the input
    embedding in many small models and is the most quantization-sensitive matrix (see quantize.py's record); MoE
    routers too (ROUTER_NAMES)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head") and not is_router(name)}


def expert_weights(model) -> dict[str, torch.nn.Parameter]:
    """An MoE's routed experts stored as 3-D [experts, out, in] parameters (transformers 5's fused experts), by
    qualified name; transposed layouts ([experts, in, out]) are left out (and stay floating point)."""
    return {f"{mname}.{pname}": p for mname, m in model.named_modules()
            if type(m).__name__.endswith("Experts") and not getattr(m, "is_transposed", False)
            for pname, p in m.named_parameters(recurse=False) if p.dim() == 3}


def experts_weight_only_(model, method: str, bits: int = 4, group_size: int = 32,
                         symmetric: bool = False) -> dict[str, QuantizedWeight]:
    """Each routed expert's matrix quantized on its own, data-free ('rtn' or 'hqq'), dequantized weights written
    back; codes keyed NAME.E (expert E of the 3-D parameter NAME). group_size 0 = per output row."""
    out = {}
    with torch.no_grad():
        for name, p in expert_weights(model).items():
            for e in range(p.shape[0]):
                w = p[e]
                gs = group_size or w.shape[1]
                qw = rtn(w, bits, gs, symmetric) if method == "rtn" else hqq(w, bits, gs)
                w.copy_(qw.dequantize().to(p.dtype))
                out[f"{name}.{e}"] = qw
    return out


def decoder_layers(model):
    return model.model.layers


CALIB_BATCH = 16  # calibration sequences per forward pass


def _capture_layer_inputs(model, calib_ids: torch.Tensor):
    """Inputs (hidden states and keyword arguments) that reach decoder layer 0, per batch of CALIB_BATCH sequences."""
    layers = decoder_layers(model)
    captured = []

    class _Stop(Exception):
        pass

    def hook(_module, args, kwargs):
        captured.append((args[0].detach(), kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in calib_ids.split(CALIB_BATCH):
            try:
                model(ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def gptq_model_(model, calib_ids: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = False,
                act_order: bool = False, damp: float = 0.01, static_groups: bool = True,
                correct_inputs: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize every decoder linear with GPTQ, layer by layer and, inside a layer, in data order (q/k/v, o,
    gate/up, down), so each linear is calibrated on the inputs the already-quantized model really produces.
    calib_ids: int64 [n_seqs, seq_len]. Writes the dequantized weights into the model and returns the codes.

    correct_inputs (the GPTAQ / "GPTQ v2" idea, Li et al. 2025): the target is the *float* model's output,
    ||X W^T - X~ W_hat^T|| with X the float inputs and X~ the quantized model's, not ||X~ (W - W_hat)^T||.
    Its least-squares optimum is W* = W C H^-1 (C = X^T X~, H = X~^T X~), so GPTQ quantizes W* under H and
    thereby also undoes error that earlier layers passed on. Off by default: on stories260K (group 32, held-out
    TinyStories) it measured +6.2 % perplexity against +5.4 % without it."""
    import copy

    out: dict[str, QuantizedWeight] = {}
    with torch.no_grad():
        states = _capture_layer_inputs(model, calib_ids)
        fp_states = states
        for li, layer in enumerate(decoder_layers(model)):
            fp_layer = copy.deepcopy(layer) if correct_inputs else None
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and not is_router(n)}
            for stage in _sequential_stages(list(linears)):
                hess, cross = _collect_stats(layer, stage, states, fp_layer, fp_states)
                for name in stage:
                    m, w = linears[name], linears[name].weight.float()
                    if cross is not None:
                        h = hess[name] + damp * torch.mean(torch.diag(hess[name])) * torch.eye(m.in_features)
                        w = torch.linalg.solve(h, (w @ cross[name]).T).T  # W C H^-1 (H symmetric)
                    qw = gptq(w, hess[name], bits, group_size, symmetric, act_order, damp, static_groups)
                    m.weight.copy_(qw.dequantize().to(m.weight.dtype))
                    out[f"model.layers.{li}.{name}"] = qw
            states = [(_first(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in states]
            if fp_layer is not None:
                fp_states = [(_first(fp_layer(hidden, **kwargs)), kwargs) for hidden, kwargs in fp_states]
                del fp_layer
    return out


def _sequential_stages(names: list[str]) -> list[list[str]]:
    """Linears of a decoder layer grouped by the order data reaches them (Llama-style names); unknown names
    form a last stage of their own."""
    order = (("q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa"), ("q_b_proj", "kv_b_proj"),
             ("o_proj",), ("gate_proj", "up_proj", "gate_up_proj"), ("down_proj",))
    stages = [[n for n in names if n.rsplit(".", 1)[-1] in group] for group in order]
    rest = [n for n in names if not any(n in st for st in stages)]
    return [st for st in stages if st] + ([rest] if rest else [])


def _collect_stats(layer, names: list[str], states, fp_layer=None, fp_states=None):
    """(H, C) per linear: H = 2/n sum x~ x~^T of its inputs when `layer` runs on `states` and, with a float twin
    `fp_layer` fed `fp_states`, C = 2/n sum x x~^T (float inputs against quantized ones); C is None without it."""
    seen: dict[str, list] = {n: [] for n in names}
    seen_fp: dict[str, list] = {n: [] for n in names}

    def recorder(store, name):
        def hook(_m, inp, _o):
            store[name].append(inp[0].detach().float().reshape(-1, inp[0].shape[-1]))
        return hook

    handles = [layer.get_submodule(n).register_forward_hook(recorder(seen, n)) for n in names]
    if fp_layer is not None:
        handles += [fp_layer.get_submodule(n).register_forward_hook(recorder(seen_fp, n)) for n in names]
    hess = {n: 0.0 for n in names}
    cross = {n: 0.0 for n in names} if fp_layer is not None else None
    count = 0
    try:
        for i, (hidden, kwargs) in enumerate(states):
            layer(hidden, **kwargs)
            if fp_layer is not None:
                fp_layer(fp_states[i][0], **fp_states[i][1])
            for n in names:
                x_q = seen[n].pop()
                hess[n] = hess[n] + x_q.T @ x_q
                if cross is not None:
                    cross[n] = cross[n] + seen_fp[n].pop().T @ x_q
            count += x_q.shape[0]
    finally:
        for h in handles:
            h.remove()
    hess = {n: 2.0 * v / count for n, v in hess.items()}
    return hess, ({n: 2.0 * v / count for n, v in cross.items()} if cross is not None else None)


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def weight_only_model_(model, method: str, bits: int = 4, group_size: int = 32,
                       symmetric: bool = False) -> dict[str, QuantizedWeight]:
    """Data-free methods ('rtn', 'hqq'): quantize every decoder linear in place (dequantized weights written back).
    group_size 0 means one group per output row (per-channel, what INT8 uses)."""
    out = {}
    with torch.no_grad():
        for name, m in quantizable_linears(model).items():
            gs = group_size or m.in_features
            if method == "rtn":
                qw = rtn(m.weight, bits, gs, symmetric)
            elif method == "hqq":
                qw = hqq(m.weight, bits, gs)
            else:
                raise ValueError(f"unknown data-free method {method}")
            m.weight.copy_(qw.dequantize().to(m.weight.dtype))
            out[name] = qw
    return out


def calibration_ids(tokenizer, text: str, n_seqs: int = 64, seq_len: int = 256, bos_id: int | None = None) -> torch.Tensor:
    """Up to n_seqs non-overlapping windows of seq_len tokens from the start of `text` (BOS first when given)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = seq_len - (1 if bos_id is not None else 0)
    rows = []
    for i in range(0, len(ids) - body + 1, body):
        rows.append(([bos_id] if bos_id is not None else []) + ids[i:i + body])
        if len(rows) == n_seqs:
            break
    if not rows:
        rows = [([bos_id] if bos_id is not None else []) + ids]
    return torch.tensor(rows, dtype=torch.long)



# --------------------------------------------------------------------------------------------------------- AWQ
AWQ_GRID = tuple(i / 20 for i in range(20))  # exponents alpha tried for s = mean|x|^alpha


def awq_scale_(model, calib_ids: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = False,
               max_tokens: int = 4096) -> dict[str, float]:
    """AWQ (Lin et al. 2023) scale search: for each group of linears that read one input (q/k/v after the input
    norm, gate/up after the post-attention norm, down after up), scale input channel j by s_j = mean|x_j|^alpha and
    fold 1/s_j into the op before (the RMSNorm weight, or up_proj's rows), so the fp model is unchanged while
    salient channels get finer steps. alpha is chosen per group by the output error of RTN on calibration inputs.
    Modifies the model in place (still float); returns the chosen alpha per group."""
    chosen = {}
    with torch.no_grad():
        states = _capture_layer_inputs(model, calib_ids)
        for li, layer in enumerate(decoder_layers(model)):
            for gname, linears, fold in awq_groups(layer):
                x = _inputs_of(layer, linears[0], states, max_tokens)
                xmean = x.abs().mean(0).clamp_min(1e-6)
                ref = [x @ m.weight.T for m in linears]
                best = (float("inf"), 0.0, None)
                for alpha in AWQ_GRID:
                    s = xmean.pow(alpha)
                    s = s / (s.max() * s.min()).sqrt()
                    err = 0.0
                    for m, r in zip(linears, ref):
                        w_hat = rtn(m.weight * s[None, :], bits, group_size, symmetric).dequantize() / s[None, :]
                        err += float(((x @ w_hat.T - r) ** 2).mean())
                    if err < best[0]:
                        best = (err, alpha, s)
                _, alpha, s = best
                for m in linears:
                    m.weight.mul_(s[None, :])
                fold(s)
                chosen[f"model.layers.{li}.{gname}"] = alpha
            states = [(_first(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in states]
    return chosen


def _linears(module, names) -> list:
    return [getattr(module, n) for n in names if isinstance(getattr(module, n, None), torch.nn.Linear)]


def _fold_norm(norm):
    """1/s folded into an RMSNorm's scale: weight / s, or for Gemma's (1 + weight) parametrisation (1 + w) / s - 1."""
    def fold(s):
        if "Gemma" in type(norm).__name__:
            norm.weight.copy_((1 + norm.weight) / s - 1)
        else:
            norm.weight.div_(s)
    return fold


def _fold_rows(linear, start: int = 0):
    """1/s folded into the output rows [start, start + len(s)) of the linear that feeds the scaled input."""
    def fold(s):
        linear.weight[start:start + len(s)].div_(s[:, None])
    return fold


def awq_groups(layer) -> list:
    """(name, linears that read one input, fold of 1/s into the op before) per AWQ group of a decoder layer: the attention
    inputs after the input norm (q/k/v, Phi-3's fused qkv_proj, MLA's q / q_a and kv_a projections), and a dense
    gated MLP's gate/up after its norm (Gemma 2 / 3: pre_feedforward_layernorm) and down after up (Phi-3: the up
    half of gate_up_proj). An MoE block's experts are not scaled (its attention is)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = []
    first = _linears(attn, ("q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa"))
    if first:
        groups.append(("qkv", first, _fold_norm(layer.input_layernorm)))
    mlp_norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
    if isinstance(getattr(mlp, "gate_up_proj", None), torch.nn.Linear) and isinstance(getattr(mlp, "down_proj", None),
                                                                                       torch.nn.Linear):
        half = mlp.gate_up_proj.out_features // 2  # Phi-3: gate rows first, then up
        groups += [("gate_up", [mlp.gate_up_proj], _fold_norm(mlp_norm)),
                   ("down", [mlp.down_proj], _fold_rows(mlp.gate_up_proj, half))]
    elif all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        groups += [("gate_up", [mlp.gate_proj, mlp.up_proj], _fold_norm(mlp_norm)),
                   ("down", [mlp.down_proj], _fold_rows(mlp.up_proj))]
    return groups


def _inputs_of(layer, linear, states, max_tokens: int) -> torch.Tensor:
    """Up to max_tokens input rows [tokens, in] that reach `linear` when the layer runs on `states`."""
    rows = []

    def hook(_m, inp, _o):
        rows.append(inp[0].detach().float().reshape(-1, inp[0].shape[-1]))

    handle = linear.register_forward_hook(hook)
    try:
        for hidden, kwargs in states:
            layer(hidden, **kwargs)
            if sum(r.shape[0] for r in rows) >= max_tokens:
                break
    finally:
        handle.remove()
    return torch.cat(rows)[:max_tokens]
