"""Stage `eval`: measure perplexity (protocol edgepack-ppl-v1) and / or task quality (edgepack-task-v1: generation
metrics and multiple-choice accuracy on a task file's held-out items, edgepack.tasks) and record them. The model files
are hard-linked from the parent, so the stage costs no disk and the parent is untouched.

With `max_task_drop`, the stage fails (and writes nothing) when the task score fell by more than that many points
since the latest measurement under the same protocol in the artifact's history (an earlier eval stage, or a lossy
stage that measured it), e.g. eval after tune, then again after quantize and after compile."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, link_files, stage_record
from edgepack.quality import PplProtocol, evaluate_artifact
from edgepack.tasks import METRICS, SPLITS, TaskProtocol


@dataclass(frozen=True)
class EvalConfig:
    text: str = field(default="", metadata={"path": True})  # UTF-8 text file to score (perplexity)
    window: int = 512  # tokens per forward pass (capped at the model's max positions)
    stride: int | None = None  # tokens the window advances (default window // 2)
    max_tokens: int | None = None  # score at most this many tokens (None = all)
    task: str = field(default="", metadata={"path": True})  # instruction / chat / choice records (or a tune prepare folder)
    task_split: str = field(default="test", metadata={"choices": SPLITS})  # its held-out split, or all records
    task_seed: int = 0  # seed of the task file's 8:1:1 split (tune's data_seed)
    task_samples: int | None = 64  # items scored (the first of the split; None = all)
    task_max_new_tokens: int = 64  # generated tokens per item at most
    task_metric: str = field(default="auto", metadata={"choices": METRICS})  # gated: auto = rougeL, or acc for choices only
    max_task_drop: float | None = None  # points the task metric may fall since the latest measurement; more fails
    runtime: str | None = None  # runtime that generates (None: the artifact's own)
    threads: int | None = None  # runtime threads (None: its default)

    def validate(self) -> list[str]:
        errs = [] if self.text or self.task else ["'text' (perplexity) or 'task' (task metrics) is required"]
        if self.window < 2:
            errs.append("window must be >= 2")
        errs += self.task_protocol().validate()
        if self.max_task_drop is not None and self.max_task_drop < 0:
            errs.append("max_task_drop must be >= 0 (points)")
        return errs

    def protocol(self) -> PplProtocol:
        return PplProtocol(window=self.window, stride=self.stride, max_tokens=self.max_tokens)

    def task_protocol(self) -> TaskProtocol:
        return TaskProtocol(split=self.task_split, split_seed=self.task_seed, max_samples=self.task_samples,
                            max_new_tokens=self.task_max_new_tokens, metric=self.task_metric)


def measure(src: Artifact, cfg: EvalConfig, progress=None, note: str = "; nothing was written") -> tuple[dict, object]:
    """(metrics, TaskResult or None): what the stage records; raises ValidationFailed past max_task_drop."""
    from edgepack.tasks import compare, evaluate_task, latest_measurement

    metrics, result = {}, None
    if cfg.text:
        res = evaluate_artifact(src, cfg.text, cfg.protocol(), progress=progress)
        metrics.update(perplexity=round(res.perplexity, 6), tokens=res.tokens, protocol=res.protocol)
    if cfg.task:
        result = evaluate_task(src, cfg.task, cfg.task_protocol(), runtime=cfg.runtime, threads=cfg.threads,
                               progress=progress)
        prev = latest_measurement(src, result.summary["protocol"])
        metrics["task"] = compare(prev, result.summary, cfg.max_task_drop, note)
    return metrics, result


def eval_stage(src: Artifact, cfg: EvalConfig, target, out: Path, *, force: bool = False, progress=None) -> Artifact:
    t0 = time.perf_counter()
    metrics, _ = measure(src, cfg, progress)
    with ArtifactWriter(out, force=force, inputs=[src.path]) as w:
        link_files(src, w.path)
        rec = stage_record("eval", asdict(cfg), time.perf_counter() - t0, metrics, parent=src.digest())
        return w.commit(format=src.format, record=rec, parent=src, extra=src.extra)
