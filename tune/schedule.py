"""The learning-rate schedule both training loops use (tune/trainer.py for LoRA / QLoRA, compress/distill.py for
distillation): linear warm-up to the peak, then cosine decay to `min_ratio` of it. One formula, so a change to it
reaches both loops."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): (step + 1) / warmup during the
    warm-up (the peak is reached on its last step, and step 0 never trains at lr 0), then cosine from 1 at step
    `warmup` to `min_ratio` at step `total` (held there beyond)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
