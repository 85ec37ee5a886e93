"""Stage `bench`: measure the artifact on this machine (edgepack.bench.run) and record the whole bench record as the
stage's metrics, so a bundle carries its own evidence. The model files are hard-linked from the parent (no disk
cost, parent untouched); the config is edgepack.bench.run.BenchConfig."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, check_output_dir, link_files, stage_record
from edgepack.bench.run import BenchConfig, run_bench


def bench_stage(src: Artifact, cfg: BenchConfig, target, out: Path, *, force: bool = False, progress=None) -> Artifact:
    from edgepack.targets import load_target

    check_output_dir(Path(out), force)
    target = target if target is not None else load_target("local")
    t0 = time.perf_counter()
    rec = run_bench(src, cfg, target, progress=progress)  # checks the target before loading weights
    with ArtifactWriter(out, force=force) as w:
        link_files(src, w.path)
        record = stage_record("bench", asdict(cfg), time.perf_counter() - t0, rec, target=target.name,
                              parent=src.digest())
        return w.commit(format=src.format, record=record, parent=src, extra=src.extra)
