"""One home for every fact that is read off an artifact (or a bundle) rather than computed by a stage: the model's
config.json, the weight precision and quantization group size the stages recorded, the context length, the weight
bytes on disk, and a bundle's runtime.json. Bench, bundle, serve, fit and the report all ask here, so two readers
can never disagree on precedence."""

from __future__ import annotations

import json
from pathlib import Path

from edgepack.errors import ArtifactError, ConfigError
from edgepack.formats import DTYPE_PRECISION, PRECISIONS, WEIGHT_SUFFIXES


def read_model_config(path, *, missing_ok: bool = False) -> dict | None:
    """The model's own config.json (in directory `path`, or the file itself) as a dict, with one clear error when it
    is missing or malformed; `missing_ok` returns None instead for a missing, unreadable or malformed file."""
    p = Path(path)
    cfg_path = p if p.is_file() else p / "config.json"
    if not cfg_path.is_file():
        if missing_ok:
            return None
        raise ArtifactError(f"'{path}' has no config.json", "pass a Hugging Face checkpoint directory or an artifact")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        if missing_ok:
            return None
        raise ConfigError(f"{cfg_path} is malformed JSON ({exc})", "fix or re-download config.json") from None
    if not isinstance(cfg, dict):
        if missing_ok:
            return None
        raise ConfigError(f"{cfg_path} is not a JSON object", "fix or re-download config.json")
    bad = [f"{k} = {cfg[k]!r}" for k in ARCH_COUNTS if k in cfg and cfg[k] is not None
           and (type(cfg[k]) is not int or cfg[k] < 1)]
    if bad and not missing_ok:
        raise ConfigError(f"{cfg_path}: {', '.join(bad)} (must be whole numbers >= 1)", "fix or re-download config.json")
    return None if bad else cfg


# config.json sizes that must be whole numbers >= 1 wherever they appear
ARCH_COUNTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "max_position_embeddings", "head_dim")


def _newest(art, pick):
    """The first non-None pick(d) over the stage records, newest first, metrics before config."""
    for rec in reversed(art.history):
        for d in (rec.get("metrics") or {}, rec.get("config") or {}):
            v = pick(d)
            if v is not None:
                return v
    return None


def _record_precision(d: dict) -> str | None:
    if d.get("precision") in PRECISIONS:
        return d["precision"]
    method = str(d.get("method") or "").split("-")[0]  # quantize methods: int8, int4-gptq, int4-rtn, nf4, fp8
    if method in PRECISIONS:
        return method
    bits = d.get("bits", d.get("weight_bits"))
    if bits in (4, 8) and not isinstance(bits, bool):
        return f"int{bits}"
    return None


def artifact_precision(art) -> str | None:
    """Weight precision: the manifest's extra["precision"] (what the artifact declares it holds), else the newest
    stage record naming one ("precision", a quantize "method" such as int4-rtn, or "bits"), else, for a checkpoint,
    the dtype in its config.json."""
    if art.extra.get("precision") in PRECISIONS:
        return art.extra["precision"]
    found = _newest(art, _record_precision)
    if found is not None:
        return found
    if art.format == "hf":
        cfg = read_model_config(art.path, missing_ok=True) or {}
        return DTYPE_PRECISION.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"))
    return None


def group_size(art) -> int | None:
    """Quantization group size recorded by the newest stage that has one (scales per group add bytes)."""
    def pick(d):
        g = d.get("group_size")
        return g if isinstance(g, int) and not isinstance(g, bool) and g > 0 else None

    return _newest(art, pick)


def context_length(art) -> int | None:
    """Tokens of context the artifact serves: extra["context"] (compiled for it), else max_position_embeddings."""
    if art.extra.get("context"):
        return int(art.extra["context"])
    cfg = read_model_config(art.path, missing_ok=True) or {}
    mpe = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    return int(mpe) if isinstance(mpe, int) and mpe > 0 else None


def check_fits_context(art, tokens: int, what: str) -> None:
    """Raise ConfigError when `tokens` (what a command will put through the model at once) exceed its context."""
    ctx = context_length(art)
    if ctx is not None and tokens > ctx:
        raise ConfigError(f"{what} = {tokens} tokens, beyond the model's context of {ctx}",
                          f"use at most {ctx} tokens (the model has no positions beyond that)")


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def weight_bytes(where) -> int:
    """Bytes of the weight files of an artifact (its manifest's list) or of a directory (its top-level files)."""
    files = getattr(where, "files", None)
    if files is not None:
        return sum(int(meta["bytes"]) for name, meta in files.items() if is_weight_file(name))
    return sum(p.stat().st_size for p in Path(where).iterdir() if p.is_file() and is_weight_file(p.name))


RUNTIME_JSON = "runtime.json"


def read_runtime_json(bundle_dir) -> dict:
    """A bundle's runtime.json (written by deploy.bundle.make_bundle): runtime, precision, format, context, ..."""
    from edgepack.artifact import load_json

    p = Path(bundle_dir) / RUNTIME_JSON
    if not p.is_file():
        raise ArtifactError(f"'{bundle_dir}' has no {RUNTIME_JSON}", "rebuild the bundle with 'edgepack bundle'")
    data = load_json(p, "rebuild the bundle with 'edgepack bundle'")
    if not isinstance(data, dict):
        raise ArtifactError(f"{p} is not a JSON object", "rebuild the bundle with 'edgepack bundle'")
    return data
