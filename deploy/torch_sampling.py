"""generation.sample_next on torch tensors, so a GPU runtime samples where the logits are (no [B, V] copy to the
host per token). Same rules: temperature 0 = argmax; else top-k, then top-p (the most likely token always kept),
then a draw from the renormalised distribution with the runtime's seeded torch.Generator. The draws differ from
the numpy sampler's for the same seed (another generator), but the same seed gives the same tokens on one runtime."""

from __future__ import annotations


def sample_torch(logits, cfg, generator):
    """logits [B, V] float tensor -> next ids [B] int64 tensor on the same device."""
    import torch

    if cfg.temperature == 0:
        return logits.argmax(-1)
    z = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < z.shape[-1]:
        kth = torch.topk(z, cfg.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = torch.sort(p, dim=-1, descending=True)
        keep_sorted = torch.cumsum(sorted_p, -1) - sorted_p < cfg.top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        p = torch.where(keep, p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    return torch.multinomial(p, 1, generator=generator).view(-1)
