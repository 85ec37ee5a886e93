"""Stage `eval`: measure perplexity (protocol edgepack-ppl-v1) and record it. The model files are hard-linked from
the parent, so the stage costs no disk and the parent is untouched."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, link_files, stage_record
from edgepack.quality import PplProtocol, evaluate_artifact


@dataclass(frozen=True)
class EvalConfig:
    text: str = field(default="", metadata={"path": True})  # UTF-8 text file to score
    window: int = 512  # tokens per forward pass (capped at the model's max positions)
    stride: int | None = None  # tokens the window advances (default window // 2)
    max_tokens: int | None = None  # score at most this many tokens (None = all)

    def validate(self) -> list[str]:
        errs = [] if self.text else ["'text' is required (a UTF-8 text file)"]
        if self.window < 2:
            errs.append("window must be >= 2")
        return errs

    def protocol(self) -> PplProtocol:
        return PplProtocol(window=self.window, stride=self.stride, max_tokens=self.max_tokens)


def eval_stage(src: Artifact, cfg: EvalConfig, target, out: Path, *, force: bool = False, progress=None) -> Artifact:
    t0 = time.perf_counter()
    res = evaluate_artifact(src, cfg.text, cfg.protocol(), progress=progress)
    with ArtifactWriter(out, force=force) as w:
        link_files(src, w.path)
        rec = stage_record("eval", asdict(cfg), time.perf_counter() - t0,
                           {"perplexity": round(res.perplexity, 6), "tokens": res.tokens, "protocol": res.protocol},
                           parent=src.digest())
        return w.commit(format=src.format, record=rec, parent=src, extra=src.extra)
