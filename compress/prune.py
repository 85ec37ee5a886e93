"""Stage `prune`: unstructured (magnitude, wanda, sparsegpt), 2:4 semi-structured, and structured depth / width
pruning of a Hugging Face artifact, with parameters removed, bytes and held-out perplexity before/after recorded.

Text protocol shared with `distill`: a text file is tokenized once as one stream (no special tokens); the first
(1 - holdout) of the stream is the training / calibration split, the last `holdout` fraction is held out and scored
with edgepack-ppl-v1 (BOS prepended once, window 512, stride 256). Calibration never sees the held-out tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, stage_record
from edgepack.errors import ConfigError, ValidationFailed

METHODS = ("magnitude", "wanda", "sparsegpt", "2:4", "depth", "width")
CRITERIA = ("magnitude", "wanda", "sparsegpt")  # what picks the 2 of 4 weights to zero
SEMI_STRUCTURED_FEATURE = "sparse-2:4"  # target capability: hardware that runs 2:4 sparse kernels


@dataclass(frozen=True)
class PruneConfig:
    method: str = field(default="wanda", metadata={"choices": METHODS})  # magnitude | wanda | sparsegpt | 2:4 | depth | width
    sparsity: float = 0.5  # fraction removed: of weights (unstructured), of layers (depth), of MLP channels (width)
    calib: str = field(default="", metadata={"path": True})  # UTF-8 text; "" = the embedded TinyStories sample
    holdout: float = 0.1  # last fraction of the text's token stream: never calibrated on, scores ppl before/after
    calib_tokens: int = 16384  # tokens of calibration text (from the start of the stream)
    seq_len: int = 256  # tokens per calibration sequence
    criterion: str = field(default="wanda", metadata={"choices": CRITERIA})  # 2:4 only: what picks the 2 of 4
    kv_sparsity: float = 0.0  # width only: fraction of KV groups (each with its query heads) also removed
    layers: tuple[int, ...] = ()  # depth only: remove exactly these layers (default: the least important ones)
    eval_max_tokens: int | None = None  # score at most this many held-out tokens (None = all)
    max_ppl_ratio: float | None = None  # fail (and write nothing) when ppl after / before exceeds this
    task: str = field(default="", metadata={"path": True})  # task file (edgepack.tasks): task metrics before / after
    task_samples: int | None = 64  # held-out task items scored (None: all)
    max_task_drop: float | None = None  # points the task metric may fall; more fails the stage and writes nothing

    def validate(self) -> list[str]:
        from edgepack.errors import did_you_mean

        errs = []
        if self.max_task_drop is not None and self.max_task_drop < 0:
            errs.append("max_task_drop must be >= 0 (points)")
        if self.task_samples is not None and self.task_samples < 1:
            errs.append("task_samples must be >= 1")
        if self.method not in METHODS:
            errs.append(f"unknown method '{self.method}'{did_you_mean(self.method, METHODS)} (one of {', '.join(METHODS)})")
        if not 0.0 < self.sparsity < 1.0:
            errs.append(f"sparsity must be in (0, 1), got {self.sparsity}")
        if not 0.0 < self.holdout < 0.5:
            errs.append(f"holdout must be in (0, 0.5), got {self.holdout}")
        if self.criterion not in CRITERIA:
            errs.append(f"criterion must be one of {', '.join(CRITERIA)}")
        if not 0.0 <= self.kv_sparsity < 1.0:
            errs.append("kv_sparsity must be in [0, 1)")
        if self.calib_tokens < self.seq_len or self.seq_len < 8:
            errs.append("need seq_len >= 8 and calib_tokens >= seq_len")
        if self.max_ppl_ratio is not None and self.max_ppl_ratio < 1.0:
            errs.append("max_ppl_ratio must be >= 1")
        return errs


# ------------------------------------------------------------------------------------------------ text data
def text_path(path: str) -> Path:
    from edgepack.sources import embedded_path, resolve_path

    return embedded_path("tinystories-sample.txt") if not path else resolve_path(path, Path.cwd())


def split_stream(tokenizer, path, holdout: float) -> tuple[list[int], list[int], str]:
    """(train ids, held-out ids, sha256 of the file): one token stream, the last `holdout` fraction held out."""
    from edgepack.quality import read_text

    text, digest = read_text(path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = int(len(ids) * (1.0 - holdout))
    if cut < 64 or len(ids) - cut < 16:
        raise ConfigError(f"'{path}' has only {len(ids)} tokens: too short to split {1 - holdout:.0%}/{holdout:.0%}",
                          "use a longer text file")
    return list(ids[:cut]), list(ids[cut:]), digest


def chunk(ids: list[int], seq_len: int, max_tokens: int | None = None):
    """LongTensor [N, seq_len] of consecutive, non-overlapping chunks (a ragged tail is dropped)."""
    import torch

    n = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    n = n // seq_len * seq_len
    return torch.tensor(ids[:n], dtype=torch.long).reshape(-1, seq_len)


def heldout_perplexity(model, tokenizer, heldout: list[int], max_tokens: int | None = None, progress=None):
    """edgepack-ppl-v1 perplexity of the held-out ids (BOS prepended once) -> PplResult."""
    from edgepack.quality import PplProtocol, hf_logits_fn, perplexity

    proto = PplProtocol(max_tokens=max_tokens).resolved(getattr(model.config, "max_position_embeddings", None))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return perplexity(hf_logits_fn(model), bos + list(heldout), proto, progress)


# ------------------------------------------------------------------------------------------------ model verb
def prune_model(model, cfg: PruneConfig, calib):
    """Apply cfg to `model` (a float32 torch model) -> (pruned model, details). Unstructured methods change the
    model in place; depth and width return a new, smaller model."""
    from edgepack.compress import prune_algos as pa

    details: dict = {}
    m = cfg.method
    if m in ("magnitude", "wanda", "sparsegpt") or m == "2:4":
        crit = cfg.criterion if m == "2:4" else m
        n_m = (2, 4) if m == "2:4" else None
        if crit == "magnitude":
            pa.magnitude_(model, cfg.sparsity, n_m)
        elif crit == "wanda":
            pa.wanda_(model, calib, cfg.sparsity, n_m)
        else:
            pa.sparsegpt_(model, calib, cfg.sparsity, n_m)
        details["criterion"] = crit
        if n_m:
            details["pattern_ok"] = pa.check_n_m(model, *n_m)
        return model, details
    if m == "depth":
        n = len(pa.decoder_layers(model))
        importance = pa.layer_importance(model, calib)
        k = max(1, int(round(n * cfg.sparsity)))
        remove = list(cfg.layers) or sorted(sorted(range(n), key=lambda i: importance[i])[:k])
        details.update(layer_importance=[round(x, 6) for x in importance], removed_layers=remove, layers_before=n,
                       layers_after=n - len(remove))
        return pa.drop_layers(model, remove), details
    before = (model.config.intermediate_size, model.config.num_key_value_heads, model.config.num_attention_heads)
    new = pa.shrink_width(model, calib, cfg.sparsity, cfg.kv_sparsity)
    details.update(intermediate_size=[before[0], new.config.intermediate_size],
                   num_key_value_heads=[before[1], new.config.num_key_value_heads],
                   num_attention_heads=[before[2], new.config.num_attention_heads])
    return new, details


def _check_target(cfg: PruneConfig, target) -> dict:
    """Pruning never needs a capability to run (the mask is applied to dense weights); record whether the target
    can turn 2:4 sparsity into speed."""
    if cfg.method != "2:4":
        return {}
    storage = "2:4 mask applied to dense weights (safetensors hold the zeros; no bytes saved). "
    if target is None:
        return {"sparse_kernels_on_target": None, "storage": storage + "No target given: GPUs with 2:4 sparse tensor "
                "cores (A100, H100) can pack the weights with torch.sparse.to_sparse_semi_structured; CPUs cannot."}
    fast = target.supports(feature=SEMI_STRUCTURED_FEATURE)
    return {"sparse_kernels_on_target": fast,
            "storage": storage + ("The target has 2:4 sparse tensor cores: torch.sparse.to_sparse_semi_structured "
                                  "can pack the weights at load time." if fast else
                                  "The target has no 2:4 sparse kernels, so the sparsity brings no speed there.")}


def prune(src: Artifact, cfg: PruneConfig, target, out: Path, *, force: bool = False) -> Artifact:
    import torch

    from edgepack.compress import prune_algos as pa
    from edgepack.facts import weight_bytes
    from edgepack.hf import load_model, load_tokenizer, save_model

    target_info = _check_target(cfg, target)  # before any weights load
    from edgepack.archs import check_arch
    from edgepack.facts import read_model_config

    check_arch("prune", read_model_config(src.path, missing_ok=True), method=cfg.method)
    if cfg.method == "width":
        pa.width_plan(read_model_config(src.path), cfg.sparsity, cfg.kv_sparsity)
    t0 = time.perf_counter()
    calib_path = text_path(cfg.calib)
    tok = load_tokenizer(src.path)
    train, heldout, digest = split_stream(tok, calib_path, cfg.holdout)
    calib = chunk(train, cfg.seq_len, cfg.calib_tokens)
    model = load_model(src, device="cpu", dtype=torch.float32)
    params_before = sum(p.numel() for p in model.parameters())
    nonzero_before = sum(int((p != 0).sum()) for p in model.parameters())
    ppl_before = heldout_perplexity(model, tok, heldout, cfg.eval_max_tokens)
    model, details = prune_model(model, cfg, calib)
    if cfg.method == "2:4" and torch.cuda.is_available():
        details["cuda_semi_structured"] = pa.semi_structured_speed(model)
    ppl_after = heldout_perplexity(model, tok, heldout, cfg.eval_max_tokens)
    ratio = ppl_after.perplexity / ppl_before.perplexity
    if cfg.max_ppl_ratio is not None and ratio > cfg.max_ppl_ratio:
        raise ValidationFailed(f"pruning ({cfg.method}, sparsity {cfg.sparsity}) raised held-out perplexity "
                               f"{ppl_before.perplexity:.3f} -> {ppl_after.perplexity:.3f} ({ratio:.2f}x > "
                               f"max_ppl_ratio {cfg.max_ppl_ratio})", "prune less, or distill afterwards")
    params_after = sum(p.numel() for p in model.parameters())
    nonzero_after = sum(int((p != 0).sum()) for p in model.parameters())
    metrics = {
        "method": cfg.method, **details, **target_info,
        "params_before": params_before, "params_after": params_after,
        "params_removed": params_before - params_after,  # physically gone (depth / width)
        "weights_zeroed": max(0, nonzero_before - nonzero_after - (params_before - params_after)),
        "nonzero_params_after": nonzero_after,
        "sparsity": round(pa.sparsity_of(model), 6),  # zero fraction of the decoder layers' linear weights
        "bytes_before": weight_bytes(src.path),
        "ppl_before": round(ppl_before.perplexity, 6), "ppl_after": round(ppl_after.perplexity, 6),
        "ppl_ratio": round(ratio, 4), "ppl_tokens": ppl_after.tokens,
        "ppl_protocol": {**ppl_after.protocol, "text": calib_path.name, "text_sha256": digest,
                         "split": f"last {cfg.holdout:.0%} of the token stream"},
        "calib_sequences": int(calib.shape[0]), "calib_seq_len": cfg.seq_len,
    }
    if cfg.method in ("magnitude", "wanda", "sparsegpt", "2:4"):
        left = pa.unpruned_weights(model)
        if left:
            metrics["unpruned_params"] = left
            metrics["note"] = (f"sparsity counts the walked linears only: {', '.join(f'{v:,} {k}' for k, v in left.items())} "
                               "parameters stayed dense")
    with ArtifactWriter(out, force=force, inputs=[src.path]) as w:
        save_model(model, w.path, tokenizer_from=src.path)
        metrics["bytes"] = weight_bytes(w.path)
        if cfg.task:
            from edgepack.tasks import stage_task_metrics

            metrics["task"] = stage_task_metrics(src, Artifact(w.path, {"format": "hf"}, False), cfg.task,
                                                 cfg.task_samples, cfg.max_task_drop)
        rec = stage_record("prune", asdict(cfg), time.perf_counter() - t0, metrics,
                           target=target.name if target is not None else None, parent=src.digest())
        return w.commit(format="hf", record=rec, parent=src, base_model=src.base_model)
