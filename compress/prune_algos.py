"""Pruning as pure verbs on a torch causal LM (Llama-family layout: model.model.layers[i].self_attn / .mlp).

Unstructured (weights zeroed in place, shapes unchanged):
  magnitude_      smallest |W| per matrix
  wanda_          smallest |W_ij| * ||X_j||_2 per output row (Sun et al. 2023), X = calibration inputs of the layer
  sparsegpt_      OBS-style mask selection with weight updates from H = X^T X (Frantar & Alistarh 2023)
  Each takes n:m (e.g. 2:4) instead of a sparsity: keep the n... prune n of every m consecutive input weights.
Structured (a new, smaller model is returned):
  layer_importance + drop_layers    depth: remove whole decoder layers
  shrink_width                      width: MLP channels and attention KV groups (with their query heads)

Activation-aware verbs are sequential: layer i is pruned with inputs that already went through the pruned layers
0..i-1, which is what the Wanda and SparseGPT papers do. Calibration is a LongTensor [N, T] of token ids.
"""

from __future__ import annotations

import torch
from torch import nn

from edgepack.errors import ConfigError

# Decoder linears the unstructured pruners walk: Llama-style names, Phi-3's fused qkv_proj / gate_up_proj (each row
# is still one output channel, which is what wanda / sparsegpt / N:M compare within), and DeepSeek's MLA projections
PRUNABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
            "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def decoder_layers(model) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no model.layers list: pruning supports Llama-family decoders",
                          "use a Llama / Qwen / Mistral-style checkpoint")
    return layers


def prunable_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in PRUNABLE}


def all_prunable(model) -> dict[str, nn.Linear]:
    return {f"layers.{i}.{n}": m for i, layer in enumerate(decoder_layers(model)) for n, m in prunable_linears(layer).items()}


def unpruned_weights(model) -> dict[str, int]:
    """Weight parameters (2-D and up) of the decoder layers that the unstructured pruners do not walk, by kind: an
    MoE's routed experts (3-D tensors in transformers 5) and routers; the record says they stayed dense."""
    from edgepack.compress.quant_algos import is_router

    walked = {id(m.weight) for m in all_prunable(model).values()}
    out: dict[str, int] = {}
    for layer in decoder_layers(model):
        for name, p in layer.named_parameters():
            if p.dim() < 2 or id(p) in walked:
                continue
            kind = ("routed experts" if p.dim() == 3 or ".experts." in name else
                    "routers" if is_router(name.rsplit(".", 1)[0]) else "other")
            out[kind] = out.get(kind, 0) + p.numel()
    return out


def sparsity_of(model) -> float:
    """Fraction of exactly-zero weights over the prunable linears of the decoder layers."""
    zeros = total = 0
    for m in all_prunable(model).values():
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / max(total, 1)


def check_n_m(model, n: int, m: int) -> bool:
    """True when every group of m consecutive input weights of every prunable matrix has at least n zeros."""
    for lin in all_prunable(model).values():
        w = lin.weight
        if w.shape[1] % m:
            return False
        if int((w.reshape(w.shape[0], -1, m) == 0).sum(-1).min()) < n:
            return False
    return True


def _mask_lowest(score: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """Boolean mask (True = prune) of the lowest scores: n of every m along the input dim, else a fraction per row
    (per_row) or per matrix."""
    if n_m is not None:
        n, m = n_m
        if score.shape[1] % m:
            raise ConfigError(f"a matrix with {score.shape[1]} input features cannot take the {n}:{m} pattern",
                              f"{n}:{m} needs input dimensions divisible by {m}")
        groups = score.reshape(score.shape[0], -1, m)
        idx = torch.topk(groups, n, dim=-1, largest=False).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(score.shape)
    if per_row:
        k = int(score.shape[1] * sparsity)
        idx = torch.topk(score, k, dim=1, largest=False).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask.reshape(score.shape)


@torch.no_grad()
def magnitude_(model, sparsity: float = 0.5, n_m: tuple[int, int] | None = None) -> None:
    for lin in all_prunable(model).values():
        lin.weight[_mask_lowest(lin.weight.abs().float(), sparsity, n_m, per_row=False)] = 0


@torch.no_grad()
def _forward_all(model, calib: torch.Tensor, batch: int = 8) -> None:
    for i in range(0, len(calib), batch):
        model(calib[i:i + batch], use_cache=False)


@torch.no_grad()
def _layer_inputs(model, layer_idx: int, calib: torch.Tensor, want_hessian: bool) -> dict[str, dict]:
    """Per prunable linear of layer `layer_idx`: sum of squared inputs per feature ('sq', [in]) and token count, plus
    the input Gram matrix X^T X ('H', [in, in]) when want_hessian."""
    stats: dict[str, dict] = {}
    hooks = []
    for name, lin in prunable_linears(decoder_layers(model)[layer_idx]).items():
        d = lin.in_features
        stats[name] = s = {"sq": torch.zeros(d, dtype=torch.float64), "n": 0,
                           "H": torch.zeros(d, d, dtype=torch.float64) if want_hessian else None}

        def hook(_mod, args, _out, s=s):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s["sq"] += (x * x).sum(0)
            s["n"] += x.shape[0]
            if s["H"] is not None:
                s["H"] += x.T @ x

        hooks.append(lin.register_forward_hook(hook))
    try:
        _forward_all(model, calib)
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def wanda_(model, calib: torch.Tensor, sparsity: float = 0.5, n_m: tuple[int, int] | None = None) -> None:
    for i in range(len(decoder_layers(model))):
        stats = _layer_inputs(model, i, calib, want_hessian=False)
        for name, lin in prunable_linears(decoder_layers(model)[i]).items():
            score = lin.weight.abs().double() * stats[name]["sq"].sqrt()[None, :]
            lin.weight[_mask_lowest(score, sparsity, n_m, per_row=True)] = 0


def _sparsegpt_matrix(w: torch.Tensor, h: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None,
                      block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT on one weight [out, in] with input Gram matrix h [in, in]: choose the mask block by block with the
    OBS saliency w^2 / [H^-1]_jj^2 and spread each pruned weight's error onto the not-yet-processed columns."""
    w = w.double().clone()
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(len(h), dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        diag = torch.diag(hinv1)[None, :]
        if n_m is None:
            mask1 = _mask_lowest(w1 ** 2 / diag ** 2, sparsity, None, per_row=False)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                sal = w1[:, i:i + n_m[1]] ** 2 / diag[:, i:i + n_m[1]] ** 2
                mask1.scatter_(1, i + torch.topk(sal, n_m[0], dim=1, largest=False).indices, True)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


@torch.no_grad()
def sparsegpt_(model, calib: torch.Tensor, sparsity: float = 0.5, n_m: tuple[int, int] | None = None) -> None:
    for i in range(len(decoder_layers(model))):
        stats = _layer_inputs(model, i, calib, want_hessian=True)
        for name, lin in prunable_linears(decoder_layers(model)[i]).items():
            new = _sparsegpt_matrix(lin.weight, stats[name]["H"], sparsity, n_m)
            lin.weight.copy_(new.to(lin.weight.dtype))


# ------------------------------------------------------------------------------------------------- depth
@torch.no_grad()
def layer_importance(model, calib: torch.Tensor) -> list[float]:
    """Per decoder layer: mean over calibration tokens of 1 - cos(hidden in, hidden out). A layer that barely turns
    the residual stream (low score) is the cheapest to remove (Men et al. 2024, "ShortGPT")."""
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = [0] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):
        def hook(_mod, args, kwargs, out, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            cos = nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            sums[i] += float((1 - cos).sum())
            count[i] += cos.numel()

        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        _forward_all(model, calib)
    finally:
        for h in hooks:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, count)]


def _rebuild(model, config, state: dict):
    """A fresh model of the same class from `config`, loaded strictly from `state` (so a wrong slice fails loudly)."""
    new = type(model)(config).to(next(model.parameters()).dtype)
    new.load_state_dict(state, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    return new.eval()


def drop_layers(model, remove: list[int]):
    """A new model without decoder layers `remove`; the kept ones are renumbered (their KV-cache slots too)."""
    import copy

    n = len(decoder_layers(model))
    if not remove or len(set(remove)) >= n or any(not 0 <= r < n for r in remove):
        raise ConfigError(f"cannot remove layers {sorted(remove)} of a {n}-layer model", "keep at least one layer")
    keep = [i for i in range(n) if i not in set(remove)]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    renum = {old: new for new, old in enumerate(keep)}
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            idx = int(k.split(".")[2])
            if idx not in renum:
                continue
            k = f"model.layers.{renum[idx]}." + k.split(".", 3)[3]
        state[k] = v
    return _rebuild(model, config, state)


# ------------------------------------------------------------------------------------------------- width
@torch.no_grad()
def width_scores(model, calib: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: MLP channel scores [intermediate] = ||act(gate) * up||_2 over tokens x ||down[:, j]||_2, and KV-group
    scores [kv_heads] = sum over the group's query heads of ||attention output of head||_2 x ||o_proj[:, head]||_F.
    Both measure how much a unit can move the residual stream on calibration text."""
    layers = decoder_layers(model)
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    mlp_sq = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    head_sq = [torch.zeros(layer.self_attn.o_proj.in_features, dtype=torch.float64) for layer in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def mlp_hook(_m, args, i=i):
            mlp_sq[i] += (args[0].double() ** 2).reshape(-1, args[0].shape[-1]).sum(0)

        def attn_hook(_m, args, i=i):
            head_sq[i] += (args[0].double() ** 2).reshape(-1, args[0].shape[-1]).sum(0)

        hooks += [layer.mlp.down_proj.register_forward_pre_hook(mlp_hook),
                  layer.self_attn.o_proj.register_forward_pre_hook(attn_hook)]
    try:
        _forward_all(model, calib)
    finally:
        for h in hooks:
            h.remove()
    mlp, kv = [], []
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for i, layer in enumerate(layers):
        mlp.append(mlp_sq[i].sqrt() * layer.mlp.down_proj.weight.double().norm(dim=0))
        o = layer.self_attn.o_proj.weight.double()  # [hidden, heads * hd]
        per_head = head_sq[i].reshape(-1, hd).sum(1).sqrt() * o.reshape(o.shape[0], -1, hd).pow(2).sum((0, 2)).sqrt()
        kv.append(per_head.reshape(-1, group).sum(1))
    return mlp, kv


def width_plan(config: dict, mlp_fraction: float, kv_fraction: float = 0.0) -> tuple[int, int]:
    """(MLP channels, KV groups) that width pruning keeps, from the model's config.json alone, so an impossible
    request fails before any weights load. transformers refuses a Llama-style config whose hidden_size is not a
    multiple of its attention heads (even with an explicit head_dim), so only such head counts are offered."""
    inter, n_kv = int(config["intermediate_size"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
    hidden, group = int(config["hidden_size"]), int(config["num_attention_heads"]) // n_kv
    keep_mlp = inter - int(round(inter * mlp_fraction))
    keep_kv = n_kv - int(round(n_kv * kv_fraction))
    if keep_mlp < 1 or keep_kv < 1:
        raise ConfigError(f"width pruning would leave {keep_mlp} MLP channels and {keep_kv} KV groups",
                          "use smaller fractions: at least one channel and one KV group must remain")
    if hidden % (keep_kv * group):
        valid = [f"{(n_kv - k) / n_kv:g} (keeps {k} KV groups, {k * group} heads)" for k in range(n_kv - 1, 0, -1)
                 if hidden % (k * group) == 0]
        raise ConfigError(f"kv_sparsity {kv_fraction:g} keeps {keep_kv} of {n_kv} KV groups = {keep_kv * group} "
                          f"attention heads, and hidden_size {hidden} is not a multiple of {keep_kv * group} "
                          "(transformers cannot load such a config)",
                          "use kv_sparsity " + (" or ".join(valid) if valid else "0 (no KV group can go)"))
    return keep_mlp, keep_kv


def shrink_width(model, calib: torch.Tensor, mlp_fraction: float, kv_fraction: float = 0.0):
    """A new model with the same number of channels removed from every layer (a Llama config holds one
    intermediate_size and one head count): the lowest-scoring mlp_fraction of MLP channels and kv_fraction of KV
    groups (each with its query heads, so the GQA ratio is kept)."""
    import copy

    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    keep_mlp, keep_kv = width_plan(cfg.to_dict(), mlp_fraction, kv_fraction)
    mlp_scores, kv_scores = width_scores(model, calib)
    state = dict(model.state_dict())
    for i, _layer in enumerate(decoder_layers(model)):
        p = f"model.layers.{i}."
        ch = torch.topk(mlp_scores[i], keep_mlp).indices.sort().values
        for name in ("gate_proj", "up_proj"):
            for suffix in ("weight", "bias"):
                if p + f"mlp.{name}.{suffix}" in state:
                    state[p + f"mlp.{name}.{suffix}"] = state[p + f"mlp.{name}.{suffix}"][ch].clone()
        state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, ch].clone()
        kv = torch.topk(kv_scores[i], keep_kv).indices.sort().values
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in kv.tolist()])
        heads = [g * group + j for g in kv.tolist() for j in range(group)]
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for suffix in ("weight", "bias"):
                if p + f"self_attn.{name}.{suffix}" in state:
                    state[p + f"self_attn.{name}.{suffix}"] = state[p + f"self_attn.{name}.{suffix}"][rows].clone()
        state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q_rows].clone()
    config = copy.deepcopy(cfg)
    config.intermediate_size = keep_mlp
    config.num_key_value_heads = keep_kv
    config.num_attention_heads = keep_kv * group
    config.head_dim = hd  # explicit: hidden_size / heads no longer gives it
    return _rebuild(model, config, state)


# ------------------------------------------------------------------------------------------------- 2:4 on CUDA
def semi_structured_matmul_speed(out_features: int = 8192, in_features: int = 2048, tokens: int = 2048,
                                 dtype=None, weight: torch.Tensor | None = None) -> dict:
    """Median time of y = x @ W^T with W dense vs. packed by torch.sparse.to_sparse_semi_structured (CUDA 2:4 sparse
    tensor cores, sm_80+). Default shape: a 1B Llama MLP up-projection (2048 -> 8192) over 2048 tokens, float16.
    Only runs on CUDA; raises ConfigError elsewhere."""
    import torch.nn.functional as F
    from torch.utils import benchmark

    if not torch.cuda.is_available():
        raise ConfigError("2:4 sparse kernels need a CUDA GPU", "run this on an A100 / H100 (sm_80 or newer)")
    from torch.sparse import to_sparse_semi_structured

    dtype = dtype or torch.float16
    w = weight if weight is not None else torch.randn(out_features, in_features)
    w = w.to("cuda", dtype)
    if weight is None or not bool((w.reshape(w.shape[0], -1, 4) == 0).sum(-1).min() >= 2):
        mask = _mask_lowest(w.abs().float(), 0.5, (2, 4), per_row=True)
        w = w.masked_fill(mask, 0)
    x = torch.randn(tokens, w.shape[1], device="cuda", dtype=dtype)
    packed = to_sparse_semi_structured(w)
    dense_y, sparse_y = F.linear(x, w), F.linear(x, packed)
    times = {}
    for name, mat in (("dense", w), ("sparse_2_4", packed)):
        t = benchmark.Timer(stmt="F.linear(x, w)", globals={"F": F, "x": x, "w": mat})
        times[name] = t.blocked_autorange(min_run_time=1.0).median
    return {"shape": [tokens, w.shape[1], w.shape[0]], "dtype": str(dtype).replace("torch.", ""),
            "dense_ms": round(times["dense"] * 1e3, 4), "sparse_ms": round(times["sparse_2_4"] * 1e3, 4),
            "speedup": round(times["dense"] / times["sparse_2_4"], 3),
            "max_abs_diff": float((dense_y - sparse_y).abs().max()), "gpu": torch.cuda.get_device_name()}


def semi_structured_speed(model) -> dict:
    """semi_structured_matmul_speed on the model's largest 2:4-pruned matrix; the error text when the kernels refuse
    it (too small a shape, an unsupported GPU), so a stage can record why instead of failing."""
    lin = max(all_prunable(model).values(), key=lambda m: m.weight.numel())
    try:
        return semi_structured_matmul_speed(tokens=512, weight=lin.weight.detach())
    except (RuntimeError, ValueError) as exc:
        return {"error": str(exc).splitlines()[0], "shape": list(lin.weight.shape)}
