"""Stage `convert`: import a Hugging Face checkpoint as an artifact, optionally casting the weights.

A cast is lossy, so the stage records the SQNR and max-abs-diff of the logits against the source on a fixed probe.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, stage_record
from edgepack.hf import DTYPES


@dataclass(frozen=True)
class ConvertConfig:
    dtype: str | None = None  # None keeps the stored dtype; else float32 | float16 | bfloat16

    def validate(self) -> list[str]:
        return [] if self.dtype in (None, *DTYPES) else [f"dtype must be one of {', '.join(DTYPES)}"]


def probe_ids(vocab_size: int, length: int = 64, seed: int = 0):
    """A fixed pseudo-random token sequence [1, length] used to compare logits between an artifact and its parent."""
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab_size, size=(1, length), dtype=np.int64)


def logits_parity(ref_fn, test_fn, vocab_size: int) -> dict:
    """max-abs-diff and SQNR of logits on the fixed probe (both fns: [1,T] ids -> [1,T,V] logits)."""
    import numpy as np

    from edgepack.compress.evaluate import sqnr_db

    ids = probe_ids(vocab_size)
    ref, test = np.asarray(ref_fn(ids)), np.asarray(test_fn(ids))
    return {"max_abs_diff": float(np.abs(ref - test).max()), "sqnr_db": round(sqnr_db(ref, test), 2),
            "argmax_agreement": float((ref.argmax(-1) == test.argmax(-1)).mean())}


def convert(src: Artifact, cfg: ConvertConfig, target, out: Path, *, force: bool = False) -> Artifact:
    from edgepack.compress.evaluate import hf_logits_fn
    from edgepack.hf import load_model, save_model, weight_bytes

    t0 = time.perf_counter()
    model = load_model(src, device="cpu")  # float32 compute on CPU
    stored = model.config.to_dict().get("dtype") or "float32"
    metrics = {"params": sum(p.numel() for p in model.parameters()), "dtype": cfg.dtype or str(stored)}
    with ArtifactWriter(out, force=force) as w:
        save_model(model, w.path, tokenizer_from=src.path, dtype=cfg.dtype)
        if cfg.dtype not in (None, "float32"):
            cast = load_model(Artifact(w.path, {"format": "hf"}, False), device="cpu")
            metrics.update(logits_parity(hf_logits_fn(model), hf_logits_fn(cast), model.config.vocab_size))
        metrics["bytes"] = weight_bytes(w.path)
        rec = stage_record("convert", asdict(cfg), time.perf_counter() - t0, metrics,
                           parent=src.digest())
        return w.commit(format="hf", record=rec, parent=src, base_model=src.base_model)
