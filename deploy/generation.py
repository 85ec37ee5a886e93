"""One generation loop for every runtime: prefill, then decode steps, with greedy or sampled tokens.

A runtime only has to implement `prefill(ids [B, T]) -> logits [B, V]` (filling its KV cache) and
`decode_step(ids [B]) -> logits [B, V]`. Timing lives here so all runtimes are measured the same way:
time to first token = prefill + first sampling; each later token's latency = one decode step + sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgepack.errors import ConfigError


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # OpenAI semantics: logit[j] -= frequency_penalty * c[j] + presence_penalty * (c[j] > 0), c[j] = times token j was
    # generated so far (the prompt does not count); logit_bias ((id, bias), ...) is added to the logits. Greedy too.
    presence_penalty: float = 0.0  # -2..2
    frequency_penalty: float = 0.0  # -2..2
    logit_bias: tuple[tuple[int, float], ...] = ()  # bias in -100..100 per token id

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def validate(self) -> list[str]:
        errs = []
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                errs.append(f"{name} must be in [-2, 2]")
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            errs.append("logit_bias values must be in [-100, 100]")
        if self.max_new_tokens < 1:
            errs.append("max_new_tokens must be >= 1")
        if self.temperature < 0:
            errs.append("temperature must be >= 0")
        if self.top_k < 0:
            errs.append("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            errs.append("top_p must be in (0, 1]")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            errs.append("seed must be in 0 .. 2**63-1")
        return errs


@dataclass
class GenerationResult:
    tokens: np.ndarray  # [B, n_new] generated ids (prompt not included)
    prompt_tokens: int
    ttft_s: float  # prefill + first token
    token_latencies_s: list[float] = field(default_factory=list)  # one per decode step after the first token
    stopped: str = "length"  # length | stop_token

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_latencies_s)
        return n * self.tokens.shape[0] / sum(self.token_latencies_s) if n else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens * self.tokens.shape[0] / self.ttft_s


def sample_next(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of logits [B, V]: argmax when temperature == 0, else top-k / top-p sampling."""
    logits = np.asarray(logits, dtype=np.float64)
    if cfg.temperature == 0:
        return logits.argmax(-1)
    z = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < z.shape[-1]:
        kth = np.partition(z, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < cfg.top_p  # always keeps the most likely token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def adjust_logits(logits: np.ndarray, cfg: GenerationConfig, counts: np.ndarray | None) -> np.ndarray:
    """logits [B, V] with cfg's logit_bias added and the presence / frequency penalties of counts [B, V] (tokens
    generated so far per row) subtracted; unchanged (the same array) when cfg asks for neither."""
    if not cfg.adjusts_logits:
        return logits
    z = np.array(logits, dtype=np.float64)
    for tok, bias in cfg.logit_bias:
        if 0 <= tok < z.shape[-1]:
            z[:, tok] += bias
    if counts is not None:
        z -= cfg.frequency_penalty * counts + cfg.presence_penalty * (counts > 0)
    return z


def generate(runtime, input_ids, cfg: GenerationConfig, on_token=None, sync=None) -> GenerationResult:
    """Run prefill + decode on `runtime`. on_token(ids [B]) is called as tokens appear (streaming).
    `sync` (e.g. torch.cuda.synchronize) is called before each clock read on asynchronous devices."""
    errs = cfg.validate()
    if errs:
        raise ConfigError("generation settings: " + "; ".join(errs), "change the values named (each says what it must be)")
    if hasattr(runtime, "generate_on_device"):  # GPU runtimes (torch-cuda) sample where the logits are
        if cfg.adjusts_logits:
            raise ConfigError(f"presence_penalty, frequency_penalty and logit_bias are not implemented for the "
                              f"{getattr(runtime, 'name', 'GPU')} runtime's on-device sampling", "leave them unset")
        return runtime.generate_on_device(input_ids, cfg, on_token=on_token, sync=sync)
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    rng = np.random.default_rng(cfg.seed)
    stop = set(cfg.stop_token_ids)
    runtime.reset()
    sync = sync or (lambda: None)
    sync()
    t0 = time.perf_counter()
    logits = runtime.prefill(ids)
    counts = np.zeros(np.shape(logits), np.float64) if cfg.adjusts_logits else None
    nxt = sample_next(adjust_logits(logits, cfg, counts), cfg, rng)
    sync()
    ttft = time.perf_counter() - t0
    out = [nxt]
    if on_token:
        on_token(nxt)
    lat, stopped = [], "length"
    done = np.isin(nxt, list(stop)) if stop else np.zeros(len(nxt), bool)
    while len(out) < cfg.max_new_tokens and not done.all():
        t = time.perf_counter()
        if counts is not None:
            counts[np.arange(len(nxt)), nxt] += 1
        nxt = sample_next(adjust_logits(runtime.decode_step(nxt), cfg, counts), cfg, rng)
        sync()
        lat.append(time.perf_counter() - t)
        out.append(nxt)
        if on_token:
            on_token(nxt)
        if stop:
            done |= np.isin(nxt, list(stop))
    if stop and done.all():
        stopped = "stop_token"
    return GenerationResult(np.stack(out, 1), ids.shape[1], ttft, lat, stopped)
