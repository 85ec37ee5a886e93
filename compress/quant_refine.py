"""int4-gptq-kd: GPTQ codes refined end to end by distillation from the fp32 model.

GPTQ minimises each linear's own output error, one layer at a time; the errors it leaves still add up through the
network. This pass starts from GPTQ's codes and tunes, for every decoder linear at once, (a) a rounding offset V per
weight (in units of quantization steps) and (b) a multiplicative correction exp(t) per group scale, to minimise the
KL divergence between the fp32 model's next-token distribution and the quantized model's on calibration text:

    code = clamp(round(W_gptq / s + V) + z, 0, 2^bits - 1),   s = s_gptq * exp(t),   w = (code - z) * s

round() passes gradients straight through (STE). At V = t = 0 the codes are exactly GPTQ's (W_gptq / s_gptq + z is
an integer), so the search starts from GPTQ and a checkpoint is kept only when it lowers the KL on held-out
calibration windows; the result is never worse than GPTQ on that check. Zero points stay GPTQ's integers: the
output is ordinary int4 codes + a float scale + an integer zero per group, what MatMulNBits and the torch path read.

The idea is that of EfficientQAT's end-to-end scale training and of AdaRound / SignRound's learned rounding, applied
with a logits-level (KD) loss rather than per block. Measured on stories260K (edgepack-ppl-v1, held-out 10 % of the
TinyStories sample, calibration on the first 90 %; scripts/quantize_table.py): group 32 GPTQ +5.41 % -> +3.33 % (torch)
/ +3.39 % (onnx MatMulNBits), group 128 +9.15 % -> +5.34 %; seeds 0 / 1 of a direct run +2.9 / +3.0 %. Tried and
dropped: per-block refinement of the same parameters on each decoder layer's output MSE (true-sequential, fp32 block
targets): block MSE fell 20-30 % but perplexity stayed at +5.4 %; a linear-decay Adam step of 5e-3 (+4.1 %) or
2e-2 with a 2e-3 scale step (+4.3 %) instead of 1e-2 (+2.9 %). Offsets move ~lr per step and codes flip only past 0.5, so it needs a few
hundred steps: 300 batches of 8 x 256 tokens take ~1 min on one core for stories260K (the stage: 85 s in all).
"""

from __future__ import annotations

import time

import torch

from edgepack.compress.quant_algos import QuantizedWeight, gptq_model_

TEACHER_CACHE_BYTES = 512 * 2**20  # cache the fp32 logits of the calibration windows up to this; else recompute


def gptq_kd_model_(model, calib_ids: torch.Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = False,
                   gptq_samples: int = 64, steps: int = 300, lr: float = 1e-2, scale_lr: float = 1e-3,
                   batch: int = 8, val_samples: int = 8, eval_every: int = 25, seed: int = 0,
                   progress=None) -> tuple[dict, dict]:
    """Quantize every decoder linear with GPTQ (on the first `gptq_samples` windows of calib_ids [n, seq_len]), then
    refine codes and scales by distillation (see the module doc) on the remaining windows but the last
    `val_samples`, which pick the checkpoint. Writes the dequantized weights into the model.

    Returns ({name: QuantizedWeight}, info) with info: KL before / after on the held-out windows, best step, seconds.
    lr: Adam step for the rounding offsets (quantization steps); scale_lr: for the log scale corrections. Both decay
    linearly to 0. Deterministic for a seed (batch order from a seeded generator, zero init). progress(step, steps)
    is called after every distillation step."""
    import copy

    n = calib_ids.shape[0]
    if n < 2:
        raise ValueError(f"int4-gptq-kd needs at least 2 calibration windows, got {n}")
    val_samples = max(1, min(val_samples, n // 4))  # short calibration texts: keep 3/4 of it for training
    train, val = calib_ids[: n - val_samples], calib_ids[n - val_samples:]
    vocab = model.config.vocab_size
    with torch.no_grad():
        teacher = copy.deepcopy(model).eval()
        cached = train.numel() * vocab * 4 <= TEACHER_CACHE_BYTES
        t_train = _logits(teacher, train) if cached else None
        t_val = _logits(teacher, val)
        if cached:
            del teacher
        qweights = gptq_model_(model, calib_ids[:gptq_samples], bits, group_size, symmetric)
    t0 = time.perf_counter()
    params = {name: _Refinable(qw) for name, qw in qweights.items()}
    opt = torch.optim.Adam([{"params": [p.offset for p in params.values()], "lr": lr},
                            {"params": [p.log_scale for p in params.values()], "lr": scale_lr}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / max(steps, 1))
    gen = torch.Generator().manual_seed(seed)

    def weights() -> dict[str, torch.Tensor]:
        return {f"{name}.weight": p.weight() for name, p in params.items()}

    def val_kl() -> float:
        with torch.no_grad():
            return float(_kl(_logits(model, val, weights()), t_val))

    kl0 = val_kl()
    best = (kl0, 0, None)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            idx = torch.randint(0, train.shape[0], (min(batch, train.shape[0]),), generator=gen)
            if cached:
                target = t_train[idx]
            else:
                with torch.no_grad():
                    target = _logits(teacher, train[idx])
            loss = _kl(_forward(model, train[idx], weights()), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress(step, steps)
            if step % eval_every == 0 or step == steps:
                kl = val_kl()
                if kl < best[0]:
                    best = (kl, step, {name: p.quantized() for name, p in params.items()})
    out = best[2] or qweights
    with torch.no_grad():
        for name, qw in out.items():
            w = model.get_parameter(f"{name}.weight")
            w.copy_(qw.dequantize().to(w.dtype))
    info = {"kd_val_kl_gptq": float(f"{kl0:.4g}"), "kd_val_kl": float(f"{best[0]:.4g}"), "kd_best_step": best[1],
            "kd_seconds": round(time.perf_counter() - t0, 1), "kd_train_windows": int(train.shape[0])}
    return out, info


class _Refinable:
    """One linear's GPTQ result with its trainable rounding offsets and log scale corrections."""

    def __init__(self, qw: QuantizedWeight):
        self.qw = qw
        self.w0 = qw.dequantize().detach()  # (code - zero) * scale: W_gptq
        self.offset = torch.zeros_like(self.w0, requires_grad=True)
        self.log_scale = torch.zeros_like(qw.scales, requires_grad=True)

    def _cols(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.qw.group_size, 1)[:, : self.qw.in_features]

    def _codes(self, scale_cols: torch.Tensor) -> torch.Tensor:
        x = self.w0 / scale_cols + self.offset
        x = x + (torch.round(x) - x).detach()  # round with a straight-through gradient
        return torch.clamp(x + self._cols(self.qw.zeros), 0, 2**self.qw.bits - 1)

    def weight(self) -> torch.Tensor:
        s = self._cols(self.qw.scales * torch.exp(self.log_scale))
        return (self._codes(s) - self._cols(self.qw.zeros)) * s

    def quantized(self) -> QuantizedWeight:
        qw = self.qw
        with torch.no_grad():
            scales = (qw.scales * torch.exp(self.log_scale)).detach().clone()
            codes = self._codes(self._cols(scales))
        n, g = scales.shape
        full = torch.round(qw.zeros).repeat_interleave(qw.group_size, 1).clone()  # padding = the zero point
        full[:, : qw.in_features] = codes
        return QuantizedWeight(full.to(torch.uint8), scales, qw.zeros.clone(), qw.in_features, qw.group_size, qw.bits)


def _forward(model, ids: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
    from torch.func import functional_call

    if weights is None:
        return model(ids, use_cache=False).logits
    return functional_call(model, weights, (ids,), {"use_cache": False}).logits


def _logits(model, ids: torch.Tensor, weights: dict | None = None, chunk: int = 16) -> torch.Tensor:
    return torch.cat([_forward(model, part, weights) for part in ids.split(chunk)])


def _kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) in nats."""
    lp, lt = torch.log_softmax(logits.float(), -1), torch.log_softmax(target.float(), -1)
    return (lt.exp() * (lt - lp)).sum(-1).mean()
