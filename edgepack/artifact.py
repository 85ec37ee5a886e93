"""The one artifact type that flows through every stage: a directory plus an `edgepack.json` manifest.

Manifest (schema 1):
    schema_version  int
    format          "hf" (safetensors checkpoint), "onnx", "torch-cuda", "tensorrt", ...
    base_model      where the lineage started (path or hub id), as the user gave it
    history         append-only list of stage records (stage, config, target, parent digest, versions,
                    seconds, metrics, finished_at)
    files           {relative path: {"sha256": hex, "bytes": int}} for every file but the manifest
    extra           free-form format details a runtime needs (e.g. ONNX input names)

Writes go to a hidden temporary sibling directory that is renamed into place only when complete, so a crash or
Ctrl-C never leaves a half-written artifact that looks finished. Opening never imports or executes anything named
in the manifest; pickled checkpoints are refused unless the caller trusts them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import ArtifactError

MANIFEST_NAME = "edgepack.json"
SCHEMA_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_HASH_CHUNK = 1 << 20  # bytes read at a time when hashing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(root: Path) -> list[Path]:
    """Every regular file under root except the manifest, sorted, as paths relative to root."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.as_posix() != MANIFEST_NAME and not any(part.startswith(".") for part in rel.parts):
            out.append(rel)
    return out


def hash_files(root: Path) -> dict[str, dict[str, Any]]:
    return {rel.as_posix(): {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in _payload_files(root)}


def check_safetensors(path: Path) -> dict:
    """Raise ArtifactError if a .safetensors file is truncated or its header is not valid JSON; returns the header.

    Reads only the header (8-byte little-endian length + JSON), so it is cheap even for a 70B shard.
    """
    size = path.stat().st_size
    hint = "re-download or re-export the checkpoint; the file is damaged"
    if size < 8:
        raise ArtifactError(f"{path} is truncated ({size} bytes, not a safetensors file)", hint)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100_000_000:
            raise ArtifactError(f"{path} is corrupt or truncated (header length {n} > file size {size})", hint)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path} is corrupt: its header is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})", hint) from None
    if not isinstance(header, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2 and all(type(x) is int and x >= 0 for x in v["data_offsets"])
            for k, v in header.items() if k != "__metadata__"):
        raise ArtifactError(f"{path} is corrupt: its header is not a table of tensors (dtype, data_offsets)", hint)
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ArtifactError(
            f"{path} is corrupt or truncated: header promises {8 + n + end} bytes, file has {size}", hint)
    return header


def files_digest(files: dict[str, dict[str, Any]]) -> str:
    """Content digest of a file table: sha256 over the sorted (path, sha256) pairs. Names content, not place."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]['sha256']}\n".encode())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape numbers, read from package metadata (imports nothing)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("edgepack", "torch", "transformers", "safetensors", "onnx", "onnxruntime", "onnxruntime-genai",
                 "peft", "bitsandbytes", "torchao", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def stage_record(stage: str, config: dict, seconds: float, metrics: dict, *, target: str | None = None,
                 parent: str | None = None) -> dict:
    return {
        "stage": stage,
        "config": _jsonable(config),
        "target": target,
        "parent": parent,
        "versions": library_versions(),
        "seconds": round(float(seconds), 3),
        "metrics": _jsonable(metrics),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


@dataclass
class Artifact:
    """An opened artifact. `manifest` is the parsed edgepack.json (synthesised for a plain HF checkpoint)."""

    path: Path
    manifest: dict = field(repr=False)
    has_manifest: bool = True

    @property
    def format(self) -> str:
        return self.manifest["format"]

    @property
    def history(self) -> list[dict]:
        return self.manifest.get("history", [])

    @property
    def base_model(self) -> str:
        return self.manifest.get("base_model", str(self.path))

    @property
    def extra(self) -> dict:
        return self.manifest.get("extra", {})

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        """File table; computed (hashing every file) on first use for a plain checkpoint."""
        if "files" not in self.manifest:
            self.manifest["files"] = hash_files(self.path)
        return self.manifest["files"]

    def digest(self) -> str:
        """Content digest of the artifact's files (see files_digest)."""
        return files_digest(self.files)

    def size_bytes(self) -> int:
        return sum(int(f["bytes"]) for f in self.files.values())

    def last_metrics(self, key: str):
        """The newest value of a metric across the history (e.g. 'perplexity'), or None."""
        for rec in reversed(self.history):
            if key in (rec.get("metrics") or {}):
                return rec["metrics"][key]
        return None

    def verify(self) -> None:
        """Check every listed file exists with the recorded size and sha256."""
        if not self.has_manifest:
            return
        for name, meta in self.manifest.get("files", {}).items():
            p = self.path / name
            if not p.is_file():
                raise ArtifactError(f"{self.path}: file '{name}' listed in {MANIFEST_NAME} is missing",
                                    "the artifact is incomplete; re-run the stage that made it")
            if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
                raise ArtifactError(f"{self.path}: file '{name}' does not match its sha256 in {MANIFEST_NAME}",
                                    "the artifact was modified or damaged; re-run the stage that made it")


def open_artifact(path, *, verify: bool = False, trust_pickle: bool = False) -> Artifact:
    """Open an edgepack artifact, or a plain Hugging Face checkpoint directory (no manifest)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"'{path}' does not exist", "check the path")
    if not path.is_dir():
        raise ArtifactError(f"'{path}' is a file, not a model directory",
                            "pass the directory that holds config.json (or edgepack.json)")
    mpath = path / MANIFEST_NAME
    if mpath.is_file():
        manifest = load_json(mpath, "the artifact is damaged; re-run the stage that made it")
        if not isinstance(manifest, dict) or "format" not in manifest:
            raise ArtifactError(f"{mpath} has no 'format'", "the artifact is damaged; re-run the stage that made it")
        if manifest.get("schema_version", 0) > SCHEMA_VERSION:
            raise ArtifactError(f"{mpath} has schema version {manifest['schema_version']}, newer than this edgepack "
                                f"understands ({SCHEMA_VERSION})", "upgrade edgepack")
        art = Artifact(path, manifest, True)
    else:
        if not (path / "config.json").is_file():
            raise ArtifactError(f"'{path}' is not a model directory: it has neither {MANIFEST_NAME} nor config.json",
                                "pass a Hugging Face checkpoint directory or an edgepack artifact")
        art = Artifact(path, {"schema_version": SCHEMA_VERSION, "format": "hf", "base_model": str(path),
                              "history": []}, False)
    if art.format == "hf":
        _check_hf_weights(path, trust_pickle)
    if verify:
        art.verify()
    return art


def _check_hf_weights(path: Path, trust_pickle: bool) -> None:
    shards = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not shards and pickles and not trust_pickle:
        raise ArtifactError(
            f"'{path}' holds only pickled weights ({pickles[0].name}); loading a pickle can run arbitrary code",
            "convert it to safetensors, or pass --trust-pickle if you trust where it came from")
    if not shards and not pickles:
        raise ArtifactError(f"'{path}' has a config.json but no weights (*.safetensors)",
                            "copy the weight files into the directory or point at the complete checkpoint")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{index} is malformed ({exc})", "re-download the checkpoint") from None
        missing = sorted(w for w in wanted if not (path / w).is_file())
        if missing:
            raise ArtifactError(f"'{path}' is missing weight shard(s) {', '.join(missing)}",
                                "re-download the checkpoint")
    for shard in shards:
        check_safetensors(shard)


def load_json(path: Path, hint: str):
    """json.loads of a file that an edgepack stage wrote, with the one-line error a damaged file deserves (the caller
    checks that the file exists: what a missing file means differs from file to file)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", hint) from None


def check_output_dir(out: Path, force: bool, inputs=()) -> None:
    """`out` may be written: empty or absent (or --force), and neither equal to, inside, nor holding any of `inputs`
    (the paths the command reads: a stage never changes its input, and --force must not delete it)."""
    out = Path(out)
    real = out.resolve()
    for src in inputs:
        if src is None:
            continue
        s = Path(src).resolve()
        if real == s or s in real.parents or real in s.parents:
            how = "is" if real == s else "is inside" if s in real.parents else "holds"
            raise ArtifactError(f"output '{out}' {how} the input '{src}'",
                                "write the output elsewhere (a sibling directory): a command never changes its input")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ArtifactError(f"output '{out}' already exists and is not empty",
                            "choose another -o directory, or pass --force to replace it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicOutput:
    """Build `out` (a directory or a file) inside a hidden temporary sibling, `.NAME.partial-PID`, and rename it into
    place only when complete. `publish(built)` moves `built` (the temporary directory itself, or a file or directory
    made inside it) onto `out`, replacing an old `out` only then; leaving the block without publishing (an exception,
    Ctrl-C) removes the temporary directory, so `out` is never half-written. Partial siblings of killed runs are
    removed on the way in. ArtifactWriter and the bundle writer both stand on it.
    """

    def __init__(self, out, *, force: bool = False, inputs=()):
        self.out = Path(out).absolute()
        check_output_dir(self.out, force, inputs)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.out.parent, f".{self.out.name}.partial-")  # left by a killed run
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        self.published = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)

    def publish(self, built: Path | None = None) -> Path:
        built = Path(built) if built is not None else self.path
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(built, self.out)
        if old is not None and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            old.unlink(missing_ok=True)
        if built != self.path:
            shutil.rmtree(self.path, ignore_errors=True)
        self.published = True
        return self.out


class ArtifactWriter:
    """Write a new artifact into a temporary sibling of `out`; `commit()` writes the manifest and renames.

        with ArtifactWriter(out, force=force) as w:
            model.save_pretrained(w.path)
            art = w.commit(format="hf", parent=src, record=stage_record(...))

    Leaving the block without commit (an exception, Ctrl-C) removes the temporary directory; `out` is untouched.
    """

    def __init__(self, out, *, force: bool = False, inputs=()):
        self._atomic = AtomicOutput(out, force=force, inputs=inputs)
        self.out, self.path = self._atomic.out, self._atomic.path
        self.committed: Artifact | None = None

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._atomic.__exit__(exc_type, exc, tb)

    def commit(self, *, format: str, record: dict | None, parent: Artifact | None = None,
               base_model: str | None = None, extra: dict | None = None) -> Artifact:
        history = list(parent.history) if parent is not None else []
        if record is not None:
            history.append(record)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": format,
            "base_model": base_model or (parent.base_model if parent is not None else "unknown"),
            "history": history,
            "files": hash_files(_canonical(self.path)),
            "extra": _jsonable(extra or {}),
        }
        tmp_manifest = self.path / (MANIFEST_NAME + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp_manifest, self.path / MANIFEST_NAME)
        self._atomic.publish()
        self.committed = Artifact(self.out, manifest, True)
        return self.committed


def _canonical(root: Path) -> Path:
    """Same content, same bytes: every .safetensors header under root rewritten with sorted keys (the safetensors
    writer emits its metadata table in hash-map order, which changes from run to run and so changed every digest
    and recipe key downstream), and every JSON file's top-level "target_modules" list sorted (peft writes a set)."""
    for p in sorted(root.rglob("*.safetensors")):
        if p.is_symlink() or p.stat().st_nlink > 1:
            continue  # hard-linked from the parent artifact: already canonical there, and never written into
        header = check_safetensors(p)
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            raw = f.read(n)
            new = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
            new += b" " * (-len(new) % 8)
            if new == raw:
                continue
            tmp = p.with_name(p.name + ".canon")
            with open(tmp, "wb") as out:
                out.write(struct.pack("<Q", len(new)) + new)
                shutil.copyfileobj(f, out, _HASH_CHUNK)
        os.replace(tmp, p)
    for p in sorted(root.rglob("adapter_config.json")):
        cfg = json.loads(p.read_text())
        if isinstance(cfg.get("target_modules"), list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
            p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return root


class WorkDir:
    """A scratch directory beside `out`, `.NAME.work-PID`, removed on exit; ones left by killed runs (their pid is
    gone) are removed on the way in, so a kill -9 mid-compile leaves nothing behind for long."""

    def __init__(self, out):
        out = Path(out).absolute()
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out.parent, f".{out.name}.work-")
        self.path = out.parent / f".{out.name}.work-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()

    def __enter__(self) -> str:
        return str(self.path)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _remove_stale(parent: Path, prefix: str) -> None:
    for stale in parent.glob(prefix + "*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def link_files(src: Artifact, dst: Path, names=None) -> None:
    """Hard-link (or copy, across filesystems) the artifact's files into dst. Stages never write into
    an existing file, so sharing inodes with the parent is safe and costs no disk."""
    for name in (names if names is not None else src.files):
        s, d = src.path / name, Path(dst) / name
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
