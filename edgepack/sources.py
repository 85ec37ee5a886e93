"""Where a model or a data file comes from: shipped inside the package ("embedded:NAME"), a local path (relative
ones resolve against a base folder, e.g. the recipe's), or a Hugging Face hub id ("org/name"), fetched only when a
run starts (safetensors, configs and tokenizer; never pickles)."""

from __future__ import annotations

import re
from pathlib import Path

from edgepack.errors import ConfigError

EMBEDDED_PREFIX = "embedded:"


def embedded_path(name: str) -> Path:
    """Files shipped inside the package (the demo model and text)."""
    from importlib import resources

    p = Path(str(resources.files("edgepack").joinpath("data", name)))
    if not p.exists():
        raise ConfigError(f"there is no embedded '{name}'", "embedded items: stories260K, tinystories-sample.txt")
    return p


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]  # never pickles (*.bin, *.pt)


def resolve_model(value: str, base: Path) -> Path | str:
    """A local path (relative to the recipe), else a Hugging Face hub id ("org/name") kept as text: it is fetched
    when the run starts (fetch_model), never when a recipe is loaded or dry-run."""
    p = resolve_path(value, base)
    return value if is_hub_id_text(value, p) else p


def is_hub_id(model) -> bool:
    return isinstance(model, str)


def fetch_model(model) -> Path:
    """The local directory of the recipe's model: a hub id is downloaded (safetensors, configs, tokenizer only) into
    the Hugging Face cache, or found there offline (HF_HUB_OFFLINE=1)."""
    if not is_hub_id(model):
        return model
    from huggingface_hub import snapshot_download  # a dependency of transformers

    try:
        return Path(snapshot_download(model, allow_patterns=HUB_FILES))
    except Exception as exc:  # network, auth (gated models), offline cache miss: one line for the user
        raise _hub_error(model, exc) from None


def fetch_config(model: str) -> Path:
    """Only the config.json of a hub model (what `fit` needs: kilobytes, not the weights)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model, "config.json"))
    except Exception as exc:
        raise _hub_error(model, exc) from None


def is_hub_id_text(value: str, path: Path | None = None) -> bool:
    """Text shaped like a hub id ("org/name") that is not an existing local path (`path`: where the text resolves,
    default relative to the working directory)."""
    return bool(HUB_ID.match(value)) and not value.startswith(".") and not (path or Path(value)).exists()


def _hub_error(model: str, exc: Exception):
    from edgepack.errors import EdgepackError
    from edgepack.hf import first_sentences

    return EdgepackError(f"cannot fetch '{model}' from the Hugging Face hub ({type(exc).__name__}: "
                         f"{first_sentences(str(exc), 200)})",
                         "check the id and your network; gated models (Llama) need 'huggingface-cli login' "
                         "and an accepted licence; or pass a local checkpoint directory")


def resolve_path(value: str, base: Path) -> Path:
    if value.startswith(EMBEDDED_PREFIX):
        return embedded_path(value[len(EMBEDDED_PREFIX):])
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def split_weight(item: str) -> tuple[str, float | None]:
    """("path", weight) of a weighted data source written "path:weight" (`--mix data.jsonl:0.7`); a string whose text
    after the last ':' is not a number is a path with no weight."""
    head, sep, tail = str(item).rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return str(item), None
