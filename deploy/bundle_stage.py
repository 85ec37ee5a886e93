"""Stage `bundle`: the device bundle for this branch's target, as the last step of a recipe.

The stage's output is an artifact like any other (same format and extra as its parent, files hard-linked, so
`edgepack generate`/`bench`/`inspect` work on it) that also holds the bundle under `bundle/` (deploy.bundle
make_bundle: every check against the target happens before anything is written). `edgepack push OUT/bundle HOST`
ships it. The record names the bundle (id, relative path, bytes, runtime, precision) and the fit verdict of the
model on the target at the bundle's context length (targets.fit, a prediction), so a report reads everything from
manifests. When the artifact carries no tokenizer, the one of the lineage's base model is bundled.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, check_output_dir, link_files, stage_record
from edgepack.deploy.bundle import TOKENIZER_MARKERS, BundleConfig, make_bundle, verify_bundle
from edgepack.errors import ConfigError
from edgepack.facts import group_size, read_model_config, read_runtime_json

BUNDLE_SUBDIR = "bundle"
FIT_CONTEXT_CAP = 4096  # tokens: the fit verdict's context is the model's maximum, capped here (a 128k Llama would
#                         be judged on a KV cache nobody allocates by default)


def _lineage_tokenizer(src: Artifact) -> str | None:
    cands = [src.base_model] + [str((r.get("config") or {}).get(k)) for r in reversed(src.history)
                                for k in ("source", "model", "checkpoint")]
    for c in cands:
        p = Path(str(c))
        if p.is_dir() and any((p / m).is_file() for m in TOKENIZER_MARKERS):
            return str(p)
    return None


def fit_verdict(art: Artifact, target, precision: str | None, context: int | None,
                runtime: str | None = None) -> dict | None:
    """targets.fit at the bundle's context (capped), batch 1; None when the artifact has no config.json."""
    from edgepack.targets.fit import fit

    mcfg = read_model_config(art.path, missing_ok=True)
    if mcfg is None or precision is None:
        return None
    ctx = min(int(context or 2048), FIT_CONTEXT_CAP)
    group = group_size(art)
    r = fit(mcfg, target, precision, context=ctx, batch=1, check_support=False, runtime=runtime,
            **({"group_size": group} if group else {}))
    return {"fits": r.fits, "required_bytes": r.required_bytes, "usable_bytes": r.usable_bytes,
            "headroom_bytes": r.headroom_bytes, "context": ctx, "precision": precision,
            "decode_tokens_per_s_limit": r.decode_tokens_per_s_limit, "label": "predicted (targets.fit)"}


def bundle_stage(src: Artifact, cfg: BundleConfig, target, out: Path, *, force: bool = False) -> Artifact:
    if target is None:
        raise ConfigError("the bundle stage needs a target", "list targets in [recipe] targets")
    check_output_dir(Path(out), force, [src.path])
    t0 = time.perf_counter()
    if cfg.tokenizer is None and not any((src.path / m).is_file() for m in TOKENIZER_MARKERS):
        cfg = replace(cfg, tokenizer=_lineage_tokenizer(src))
    if cfg.name is None:  # a recipe's stage folders are named by hash: name the bundle after the base model
        cfg = replace(cfg, name=Path(str(src.base_model or src.path.name)).name)
    with ArtifactWriter(out, force=force, inputs=[src.path]) as w:
        link_files(src, w.path)
        bdir = make_bundle(src, target, w.path / BUNDLE_SUBDIR, cfg)
        m = verify_bundle(bdir)
        size = sum(int(f["bytes"]) for f in m["files"].values())
        metrics = {"bundle_id": m["bundle_id"], "bundle_path": BUNDLE_SUBDIR, "bundle_bytes": size,
                   "bundle_files": len(m["files"]), "runtime": m["runtime"], "precision": m["precision"],
                   "engine_build": target.engine_build,
                   "fit": fit_verdict(src, target, m["precision"], read_runtime_json(bdir).get("context"), m["runtime"])}
        rec = stage_record("bundle", asdict(cfg), time.perf_counter() - t0, metrics, target=target.name,
                           parent=src.digest())
        return w.commit(format=src.format, record=rec, parent=src, extra=src.extra)



