"""Load and save Hugging Face checkpoints safely. Heavy imports (torch, transformers) happen inside functions."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgepack.artifact import Artifact, open_artifact
from edgepack.errors import ArtifactError, ConfigError

# Files that make up a tokenizer / generation setup; copied beside every model a stage writes.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
DTYPES = ("float32", "float16", "bfloat16")


def quiet_transformers() -> None:
    """No per-load progress bars or tokenizer length warnings: edgepack prints its own progress and tables."""
    import logging
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torchao (when installed) logs missing CUDA kernels and torch deprecation notes at import; not actionable here.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'", f"use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype_for(device: str, stored: str | None = None):
    """float32 on CPU (no fast bf16/fp16 there); the stored 16-bit dtype on CUDA."""
    import torch

    if device == "cpu":
        return torch.float32
    return getattr(torch, stored) if stored in ("float16", "bfloat16") else torch.float32


def load_model(art: Artifact | str | Path, *, device: str | None = None, dtype=None, trust_pickle: bool = False):
    """An `AutoModelForCausalLM` from an 'hf' artifact, eval mode, on `device` (default: CUDA if present).

    Weights load from safetensors only unless trust_pickle; remote code is never executed."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    art = art if isinstance(art, Artifact) else open_artifact(art, trust_pickle=trust_pickle)
    if art.format != "hf":
        raise ArtifactError(f"'{art.path}' is a '{art.format}' artifact, not a Hugging Face checkpoint",
                            "pass the model directory this artifact was made from, or use a command for its format")
    device = device or default_device()
    art.verify()  # every file against its sha256 in edgepack.json (a plain checkpoint has none to check)
    use_st = any(art.path.glob("*.safetensors"))
    _check_weight_dtypes(art.path)
    if dtype is None:
        dtype = compute_dtype_for(device, _stored_dtype(art.path))
    hint = "check that config.json matches the weights (a transformers version mismatch?)"
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            art.path, dtype=dtype, use_safetensors=use_st, trust_remote_code=False, local_files_only=True,
            output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ArtifactError(f"cannot load the model in '{art.path}': {str(exc).strip().splitlines()[0]}", hint) from None
    missing = sorted(info.get("missing_keys") or [])
    if missing or info.get("mismatched_keys"):
        what = f"{len(missing)} tensor(s) missing from the weights ({', '.join(missing[:3])})" if missing else \
            f"tensor shapes that differ from config.json ({', '.join(str(m[0]) for m in info['mismatched_keys'][:3])})"
        raise ArtifactError(f"'{art.path}': {what}; they would start as random numbers", hint)
    bad = next((n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()), None)
    if bad is not None:
        raise ArtifactError(f"'{art.path}': tensor '{bad}' holds NaN or Inf values",
                            "the weights are damaged (or a stage diverged): rebuild them from a good parent")
    model.to(device).eval()
    torch.set_grad_enabled(False)
    return model


# weights stored as integers are quantized (their names then say so: qweight, ... or config.json has a
# quantization_config); a plain `.weight` / `.bias` in an integer dtype is a broken or tampered checkpoint
_INT_DTYPES = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL")


def _check_weight_dtypes(path: Path) -> None:
    from edgepack.artifact import check_safetensors
    from edgepack.facts import read_model_config

    if (read_model_config(path, missing_ok=True) or {}).get("quantization_config"):
        return
    for shard in sorted(path.glob("*.safetensors")):
        for name, meta in check_safetensors(shard).items():
            if name != "__metadata__" and name.endswith((".weight", ".bias")) and meta["dtype"] in _INT_DTYPES:
                raise ArtifactError(f"{shard}: tensor '{name}' is stored as {meta['dtype']}, not as floating point",
                                    "the checkpoint is damaged or not a plain Hugging Face model; re-export it")


def _stored_dtype(path: Path) -> str | None:
    from edgepack.facts import read_model_config

    cfg = read_model_config(path)
    return cfg.get("dtype") or cfg.get("torch_dtype")


def load_tokenizer(path):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(Path(path), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot load a tokenizer from '{path}': {first_sentences(str(exc)) or type(exc).__name__}",
                            "copy the tokenizer files (tokenizer.json, tokenizer_config.json) beside the model") from None


def first_sentences(text: str, limit: int = 240) -> str:
    """A library's message as one line: whitespace collapsed, cut after the last whole sentence within `limit`
    characters (else at a word), never mid-word and never ending in a dangling separator."""
    one = " ".join(text.split())
    if len(one) <= limit:
        return one.rstrip(" -:")
    cut = one.rfind(". ", 0, limit)
    return one[:cut + 1] if cut > 0 else one[:limit].rsplit(" ", 1)[0].rstrip(" -:,") + " ..."


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_model(model, dst: Path, *, tokenizer_from: Path | None = None, dtype: str | None = None) -> None:
    """save_pretrained as safetensors (optionally cast to `dtype`), plus the tokenizer files of `tokenizer_from`."""
    if dtype is not None:
        model = model.to(torch_dtype(dtype))
    model.save_pretrained(dst, safe_serialization=True)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, dst)
