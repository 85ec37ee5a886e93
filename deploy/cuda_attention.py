"""Attention over the filled part of a static KV cache, not its whole length.

transformers' StaticLayer returns the whole preallocated [B, KVH, max_context, D] K/V on every step, and its stock
sdpa path reads all of it (plus, with a mask, a repeat_kv copy per layer for GQA): per decoded token the KV traffic
grows with max_context, not with the tokens actually there. Ours is registered as an attention implementation
("edgepack_sliced_sdpa", transformers' AttentionInterface, 5.17 and 5.24): it attends over the first L slots only,
where L is the last dimension of the mask the runtime builds (deploy/torch_cuda.py: L is a bucket >= the filled
length, so one CUDA graph serves each bucket), slicing K/V as views (no copy). A one-token GQA step folds the query
heads of a group into the "sequence" axis of SDPA, so K/V are read once per KV head, never repeated.

Without a mask (a plain forward, no cache) it is transformers' sdpa attention.
"""

from __future__ import annotations

SLICED_ATTENTION = "edgepack_sliced_sdpa"


def sliced_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
    """query [B, H, q, D]; key / value [B, KVH, S, D] (S: the static cache length); attention_mask additive
    [B, 1, q, L] with L <= S. Returns ([B, q, H, D], None) like transformers' attention functions."""
    import torch.nn.functional as F

    if attention_mask is None or attention_mask.dim() != 4:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    length = attention_mask.shape[-1]
    key, value = key[:, :, :length], value[:, :, :length]
    b, h, q, d = query.shape
    kvh = key.shape[1]
    if q == 1 and h != kvh:  # GQA decode: a group's query heads become the query "sequence" of their KV head
        out = F.scaled_dot_product_attention(query.reshape(b, kvh, h // kvh, d), key, value, attn_mask=attention_mask,
                                             scale=scaling).reshape(b, h, 1, d)
    else:
        if h != kvh:
            key = key.repeat_interleave(h // kvh, dim=1)
            value = value.repeat_interleave(h // kvh, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def use_sliced_attention(model) -> str:
    """Register the implementation (idempotent) and switch `model` to it; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(SLICED_ATTENTION, sliced_sdpa)
    try:
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionMaskInterface.register(SLICED_ATTENTION, sdpa_mask)  # masks transformers builds itself: sdpa's
    except ImportError:
        pass
    model.set_attn_implementation(SLICED_ATTENTION)
    return SLICED_ATTENTION


def cache_keyword(model) -> str:
    """The forward keyword that takes the cache: `cache` from transformers 5.24 (`past_key_values` deprecated
    there), `past_key_values` before (5.17 swallows an unknown `cache=` in **kwargs and silently makes its own
    DynamicCache, so the name must be read off the signature, never guessed)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
