"""Quality measures every stage shares: perplexity under one fixed, documented protocol, SQNR and logit parity on a
fixed probe, held-out text splits, and the table of scorers per artifact format. Every number carries the protocol
it was made with.

Protocol `edgepack-ppl-v1` (the default, used by every stage's quality numbers):
  - the whole text is one token stream: tokenized once without special tokens, BOS prepended once
    (when the tokenizer has one); a file is not split into documents;
  - windows of `window` tokens (default 512, capped at the model's max_position_embeddings) advance by `stride`
    (default window/2), so every scored token but those of the first window sees at least window - stride tokens
    of context; each token is scored exactly once, by the first window in which it is not in the overlap;
  - the first token of the stream is never scored (nothing predicts it), nor, when stride == window, the first
    token of each window;
  - perplexity = exp(mean negative log-likelihood over scored tokens), natural log, fp32 logits, log-softmax in fp64.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgepack.errors import ArtifactError, ConfigError

PROTOCOL_NAME = "edgepack-ppl-v1"


@dataclass(frozen=True)
class PplProtocol:
    window: int = 512  # tokens per forward pass
    stride: int | None = None  # tokens the window advances; None = window // 2
    bos: bool = True  # prepend BOS once to the stream
    max_tokens: int | None = None  # score at most this many tokens (None = the whole text)

    def resolved(self, max_positions: int | None = None) -> PplProtocol:
        window = min(self.window, max_positions) if max_positions else self.window
        stride = self.stride if self.stride is not None else window // 2
        if window < 2 or not 0 < stride <= window:
            raise ConfigError(f"perplexity window {window} / stride {stride} are invalid", "need 2 <= window and 0 < stride <= window")
        return PplProtocol(window=window, stride=stride, bos=self.bos, max_tokens=self.max_tokens)

    def describe(self) -> dict:
        return {"name": PROTOCOL_NAME, **asdict(self)}


@dataclass(frozen=True)
class PplResult:
    perplexity: float
    nll: float  # mean negative log-likelihood, nats/token
    tokens: int  # tokens scored
    protocol: dict

    def to_dict(self) -> dict:
        return asdict(self)


# logits_fn: int64 array [B, T] of token ids -> float array [B, T, V] of logits for each position.
LogitsFn = Callable[[np.ndarray], np.ndarray]


def token_stream(tokenizer, text: str, protocol: PplProtocol) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if protocol.bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + list(ids)
    return list(ids)


def _window_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """NLL (fp64) of targets[i] under logits[i]; row-chunked so a 128k vocab does not need gigabytes."""
    out = np.empty(len(targets), dtype=np.float64)
    for i in range(0, len(targets), 64):
        chunk = logits[i:i + 64].astype(np.float64)
        m = chunk.max(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(chunk - m).sum(axis=1))
        out[i:i + 64] = lse - chunk[np.arange(len(chunk)), targets[i:i + 64]]
    return out


def plan_windows(n: int, protocol: PplProtocol) -> list[tuple[int, int, int, int]]:
    """(begin, end, first, take) per window: tokens[begin:end] are fed, and the `take` targets starting at stream
    position begin + first are scored (predicted by the logits at position first - 1 of the window)."""
    out, next_target, begin = [], 1, 0
    limit = min(protocol.max_tokens or n, n - 1)
    scored = 0
    while next_target < n and scored < limit:
        end = min(begin + protocol.window, n)
        if next_target == begin:  # stride == window: a window's first token has no context in it; not scored
            next_target += 1
        take = min(end - next_target, limit - scored)
        if take > 0:
            out.append((begin, end, next_target - begin, take))
            scored += take
            next_target += take
        if end == n:
            break
        begin += protocol.stride
    return out


def perplexity(logits_fn: LogitsFn, ids: list[int], protocol: PplProtocol, progress=None,
               batch_size: int = 8) -> PplResult:
    """Perplexity of a token stream under `protocol` (already resolved). Full-length windows go through
    `logits_fn` `batch_size` at a time ([B, T] ids -> [B, T, V] logits). `progress(done, total)` is optional."""
    ids_arr = np.asarray(ids, dtype=np.int64)
    if len(ids_arr) < 2:
        raise ConfigError("the evaluation text is too short (fewer than 2 tokens)", "use a longer text file")
    windows = plan_windows(len(ids_arr), protocol)
    total_nll, scored, i = 0.0, 0, 0
    while i < len(windows):
        length = windows[i][1] - windows[i][0]
        group = [windows[i]]
        while (len(group) < batch_size and i + len(group) < len(windows)
               and windows[i + len(group)][1] - windows[i + len(group)][0] == length):
            group.append(windows[i + len(group)])
        logits = np.asarray(logits_fn(np.stack([ids_arr[b:e] for b, e, _, _ in group])))
        if logits.ndim == 2:
            logits = logits[None]
        for row, (b, _e, first, take) in zip(logits, group):
            nll = _window_nll(row[first - 1:first - 1 + take], ids_arr[b + first:b + first + take])
            total_nll += float(nll.sum())
            scored += take
        i += len(group)
        if progress:
            progress(i, len(windows))
    mean = total_nll / scored
    return PplResult(perplexity=math.exp(mean), nll=mean, tokens=scored, protocol=protocol.describe())


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - test)^2). inf when identical."""
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(test, dtype=np.float64)
    noise = float((err * err).sum())
    return float("inf") if noise == 0 else 10.0 * math.log10(float((ref * ref).sum()) / noise)


def hf_logits_fn(model) -> LogitsFn:
    import torch

    device = next(model.parameters()).device

    def fn(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(ids).to(device), use_cache=False)
        return out.logits.float().cpu().numpy()

    return fn


def probe_ids(vocab_size: int, length: int = 64, seed: int = 0) -> np.ndarray:
    """A fixed pseudo-random token sequence [1, length] used to compare logits between an artifact and its parent."""
    return np.random.default_rng(seed).integers(3, vocab_size, size=(1, length), dtype=np.int64)


def logits_parity(ref_fn, test_fn, vocab_size: int) -> dict:
    """max-abs-diff, SQNR and argmax agreement of logits on the fixed probe (both fns: [1,T] ids -> [1,T,V])."""
    ids = probe_ids(vocab_size)
    ref, test = np.asarray(ref_fn(ids)), np.asarray(test_fn(ids))
    return {"max_abs_diff": float(np.abs(ref - test).max()), "sqnr_db": round(sqnr_db(ref, test), 2),
            "argmax_agreement": float((ref.argmax(-1) == test.argmax(-1)).mean())}


def split_at_line(text: str, fraction: float) -> tuple[str, str, int]:
    """(leading part, rest, cut): the cut is the first line break after `fraction` of the characters, so calibration
    / training text and held-out text never share a line."""
    cut = text.find("\n", int(len(text) * fraction))
    cut = cut if cut > 0 else int(len(text) * fraction)
    return text[:cut], text[cut:], cut


def open_hf_scorer(art):
    from edgepack.facts import read_model_config
    from edgepack.hf import load_model

    model = load_model(art)
    cfg = read_model_config(art.path)
    return hf_logits_fn(model), art.path, cfg.get("max_position_embeddings")


def open_scorer(art):
    import importlib

    from edgepack.formats import FORMATS

    spec = FORMATS[art.format].scorer if art.format in FORMATS else None
    if spec is None:
        raise ArtifactError(f"perplexity is not available for '{art.format}' artifacts",
                            f"evaluate one of: {', '.join(n for n, f in FORMATS.items() if f.scorer)}")
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)(art)


def read_text(path) -> tuple[str, str]:
    """(text, sha256) of a UTF-8 text file, with a clear error when it is missing or not text. A .jsonl / .json file
    is read as records (tune/data.py records_text), never scored as raw JSON; the sha256 is still of the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"text file '{p}' does not exist", "pass a UTF-8 text file with --text")
    data = p.read_bytes()
    if p.suffix.lower() in (".jsonl", ".json"):
        from edgepack.tune.data import records_text

        return records_text(p), hashlib.sha256(data).hexdigest()
    try:
        return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
    except UnicodeDecodeError:
        raise ConfigError(f"'{p}' is not UTF-8 text", "pass a plain UTF-8 text file") from None


def evaluate_artifact(art, text_path, protocol: PplProtocol = PplProtocol(), progress=None, scorer=None) -> PplResult:
    """Perplexity of any artifact format on a text file. `scorer` (from open_scorer) may be passed to reuse a
    loaded model across texts."""
    from edgepack.hf import load_tokenizer

    text, digest = read_text(text_path)
    logits_fn, tok_dir, max_pos = scorer or open_scorer(art)
    tok = load_tokenizer(tok_dir)
    proto = protocol.resolved(max_pos)
    ids = token_stream(tok, text, proto)
    res = perplexity(logits_fn, ids, proto, progress)
    return PplResult(res.perplexity, res.nll, res.tokens, {**res.protocol, "text": Path(text_path).name, "text_sha256": digest})
