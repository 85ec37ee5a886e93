"""Stage `convert`: import a Hugging Face checkpoint as an artifact, optionally casting the weights.

A cast is lossy, so the stage records the SQNR and max-abs-diff of the logits against the source on a fixed probe.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, stage_record
from edgepack.hf import DTYPES


@dataclass(frozen=True)
class ConvertConfig:
    dtype: str | None = field(default=None, metadata={"choices": DTYPES})  # None keeps the stored dtype

    def validate(self) -> list[str]:
        return [] if self.dtype in (None, *DTYPES) else [f"dtype must be one of {', '.join(DTYPES)}"]


def convert(src: Artifact, cfg: ConvertConfig, target, out: Path, *, force: bool = False) -> Artifact:
    from edgepack.facts import weight_bytes
    from edgepack.hf import load_model, save_model
    from edgepack.quality import hf_logits_fn, logits_parity

    t0 = time.perf_counter()
    model = load_model(src, device="cpu")  # float32 compute on CPU
    stored = model.config.to_dict().get("dtype") or "float32"
    metrics = {"params": sum(p.numel() for p in model.parameters()), "dtype": cfg.dtype or str(stored)}
    with ArtifactWriter(out, force=force, inputs=[src.path]) as w:
        save_model(model, w.path, tokenizer_from=src.path, dtype=cfg.dtype)
        if cfg.dtype not in (None, "float32"):
            cast = load_model(Artifact(w.path, {"format": "hf"}, False), device="cpu")
            metrics.update(logits_parity(hf_logits_fn(model), hf_logits_fn(cast), model.config.vocab_size))
        metrics["bytes"] = weight_bytes(w.path)
        rec = stage_record("convert", asdict(cfg), time.perf_counter() - t0, metrics,
                           parent=src.digest())
        return w.commit(format="hf", record=rec, parent=src, base_model=src.base_model)
