"""Device bundles: what goes to a device, checked against the target before anything is written.

Layout of a bundle (a directory, or the same tree in a .tar):

    bundle.json              manifest: bundle id, target profile, runtime, precision, lineage, files + sha256
    artifact/                the compiled artifact exactly as the stage wrote it (with its edgepack.json)
    tokenizer/               only when the artifact has no tokenizer files of its own
    runtime.json             how to run it: runtime name, context length, serving defaults
    requirements.txt         what the device needs installed (the runtime's extras in edgepack.formats.RUNTIMES)
    README.md                a short note for whoever logs into the device
    SHA256SUMS               `sha256sum -c` input for every file above (bundle.json lists the same, and itself not)
    edgepack-serve.service   a systemd user unit that serves `current` (see README.md inside the bundle)

The bundle id is "<artifact name>-<target>-<12 hex of the content digest>", so building the same bundle twice gives
the same id, and a push of an unchanged bundle sends nothing. bundle.json is not part of the digest (it holds the
creation time). Reading a bundle (a directory or a .tar) accepts only the regular files bundle.json lists, each with
its size and sha256, and cross-checks bundle.json against SHA256SUMS and the digest in the bundle id; a .tar is
unpacked by our own code (never tarfile's extractor), after every member header passed the checks.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from edgepack.artifact import (
    Artifact,
    AtomicOutput,
    check_output_dir,
    files_digest,
    hash_files,
    load_json,
    open_artifact,
    sha256_file,
)
from edgepack.deploy.runtime import resolve_runtime
from edgepack.errors import ArtifactError, ConfigError, UnsupportedOnTarget
from edgepack.facts import artifact_precision, context_length
from edgepack.formats import RUNTIMES

BUNDLE_MANIFEST = "bundle.json"
BUNDLE_SCHEMA = 1
SERVICE_NAME = "edgepack-serve.service"
DEVICE_DIR = "edgepack"  # default install dir on the device, relative to the login user's home
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")

@dataclass(frozen=True)
class BundleConfig:
    runtime: str | None = None  # None: the artifact's own (deploy.runtime.resolve_runtime)
    device_dir: str = DEVICE_DIR  # where `edgepack push --dest` puts it; the service unit points there
    port: int = 8000  # the service unit's port (it binds 127.0.0.1; put a reverse proxy in front to expose it)
    max_tokens_cap: int = 512  # serve refuses max_tokens above this (tokens)
    tokenizer: str | None = None  # directory with tokenizer files, when the artifact has none
    name: str | None = None  # first part of the bundle id; None = the artifact directory's name

    def validate(self) -> list[str]:
        errs = []
        if not 0 < self.port < 65536:
            errs.append("port must be in 1..65535")
        if self.max_tokens_cap < 1:
            errs.append("max_tokens_cap must be >= 1 (tokens)")
        if not re.fullmatch(r"[A-Za-z0-9_./-]+", self.device_dir or "") or self.device_dir.startswith("-") \
                or ".." in self.device_dir.split("/"):
            errs.append("device_dir must be a directory name or path of letters, digits, '_', '.', '/', '-' "
                        "(it goes into the systemd unit, where spaces, newlines and '%' change its meaning)")
        return errs


# ------------------------------------------------------------------------------------------- what the artifact is
def engine_sm(art: Artifact) -> int | None:
    """The GPU architecture (SM x10) a prebuilt engine was built for, if the artifact is one."""
    for key in ("engine_sm", "sm"):
        if art.extra.get(key) is not None:
            return int(art.extra[key])
    return None


def check_runs_on(art: Artifact, target, runtime: str) -> str | None:
    """Raise UnsupportedOnTarget unless `art` can run on `target` with `runtime`. Returns the precision."""
    on_cuda = art.extra.get("device") == "cuda"
    offered = RUNTIMES[runtime].hosts
    if on_cuda:
        offered = tuple(r for r in offered if r != "torch-cpu")
    if on_cuda and not target.has_cuda:
        raise UnsupportedOnTarget(f"'{art.path.name}' was compiled for CUDA, but target '{target.name}' has no CUDA GPU",
                                  "compile it for this target (edgepack compile --target ...)")
    if not any(target.supports(runtime=r) for r in offered):
        raise UnsupportedOnTarget(
            f"'{art.path.name}' runs on runtime '{runtime}', which target '{target.name}' does not offer "
            f"(it has: {', '.join(target.runtimes)})",
            "compile the artifact for one of the target's runtimes (e.g. 'edgepack compile'), or pick another --target")
    precision = artifact_precision(art)
    if precision and not target.supports(precision=precision):
        raise UnsupportedOnTarget(
            f"'{art.path.name}' holds {precision} weights, which target '{target.name}' does not run "
            f"(it runs: {', '.join(target.precisions)})", "quantize or cast to a precision the target lists")
    sm = engine_sm(art)
    if sm is not None:
        if target.sm is None or target.sm != sm:
            raise UnsupportedOnTarget(
                f"'{art.path.name}' is an engine built for sm_{sm}, but target '{target.name}' is "
                + (f"sm_{target.sm}" if target.sm else "not a CUDA device"),
                "engines only run on the GPU architecture that built them: bundle the ONNX model and build the "
                "engine for this target (on the device when the target says engine_build = device)")
        if target.engine_build == "device":
            raise UnsupportedOnTarget(
                f"target '{target.name}' builds engines on the device, but '{art.path.name}' is a prebuilt engine",
                "bundle the ONNX model instead; 'edgepack remote prepare' builds the engine on the device")
    return precision


def device_requirements(runtime: str, system_tensorrt: bool = False) -> list[str]:
    """pip requirement lines the device needs for `runtime`: edgepack's core dependencies plus the runtime's extras,
    exactly as the installed edgepack declares them. `system_tensorrt`: the device's own TensorRT is used (targets
    that build engines on the device: JetPack ships TensorRT for its L4T and CUDA, PyPI's wheels do not fit it)."""
    from importlib import metadata

    extras = set(RUNTIMES[runtime].extras) - ({"tensorrt"} if system_tensorrt else set())
    out = []
    for line in metadata.requires("edgepack") or []:
        spec, _, marker = line.partition(";")
        m = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if m is None or m.group(1) in extras:
            out.append(spec.strip())
    return sorted(set(out), key=str.lower)


# --------------------------------------------------------------------------------------------------- writing
def make_bundle(artifact, target, out, cfg: BundleConfig = BundleConfig(), *, force: bool = False) -> Path:
    """Write a bundle of `artifact` for `target` to `out` (a directory, or a file ending in .tar / .tar.gz).
    Every check runs before anything is written."""
    from edgepack import __version__ as edgepack_version

    errs = cfg.validate()
    if errs:
        raise ConfigError("bundle settings: " + "; ".join(errs), "change the values named (each says what it must be)")
    art = artifact if isinstance(artifact, Artifact) else open_artifact(artifact)
    art.verify()
    runtime = resolve_runtime(art, cfg.runtime)
    precision = check_runs_on(art, target, runtime)
    tok_src = None
    if not any((art.path / m).is_file() for m in TOKENIZER_MARKERS):
        if not cfg.tokenizer:
            raise ArtifactError(f"'{art.path}' has no tokenizer files ({', '.join(TOKENIZER_MARKERS)})",
                                "pass --tokenizer DIR (the checkpoint the artifact came from)")
        tok_src = Path(cfg.tokenizer)
        if not any((tok_src / m).is_file() for m in TOKENIZER_MARKERS):
            raise ArtifactError(f"--tokenizer '{tok_src}' holds no tokenizer files", "point at a model directory")
    out = Path(out)
    as_tar = out.name.endswith((".tar", ".tar.gz", ".tgz"))
    check_output_dir(out, force, [art.path, cfg.tokenizer])
    requirements = device_requirements(runtime, system_tensorrt=target.engine_build == "device")

    with AtomicOutput(out, force=force, inputs=[art.path, cfg.tokenizer]) as w:
        root = w.path / "bundle"
        _copy_tree(art.path, root / "artifact")
        if tok_src is not None:
            from edgepack.hf import copy_tokenizer

            (root / "tokenizer").mkdir()
            copy_tokenizer(tok_src, root / "tokenizer")
        name = _slug(cfg.name or art.path.name)
        runtime_cfg = {"runtime": runtime, "precision": precision, "format": art.format, "context": context_length(art),
                       "max_tokens_cap": cfg.max_tokens_cap, "port": cfg.port,
                       "tokenizer": "tokenizer" if tok_src is not None else "artifact",
                       "engine_build": target.engine_build}
        (root / "runtime.json").write_text(json.dumps(runtime_cfg, indent=2) + "\n")
        (root / "requirements.txt").write_text(
            f"# what a device needs for runtime '{runtime}' (edgepack {edgepack_version}'s own dependency ranges).\n"
            "# edgepack itself is not on this list: install the same edgepack version from your wheel.\n"
            + "".join(r + "\n" for r in requirements))
        (root / SERVICE_NAME).write_text(_service_unit(cfg))
        bundle_id = f"{name}-{_slug(target.name)}-{files_digest(hash_files(root))[:12]}"
        (root / "README.md").write_text(_device_readme(bundle_id, art, target, runtime, precision, cfg))
        # for `sha256sum -c SHA256SUMS` on a device that has no edgepack (yet)
        (root / "SHA256SUMS").write_text("".join(f"{m['sha256']}  {n}\n" for n, m in sorted(hash_files(root).items())))
        files = hash_files(root)
        manifest = {
            "schema_version": BUNDLE_SCHEMA, "bundle_id": bundle_id,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "edgepack_version": edgepack_version, "runtime": runtime, "precision": precision,
            "target": target.to_dict(),
            "artifact": {"name": art.path.name, "format": art.format, "digest": art.digest(),
                         "base_model": art.base_model, "lineage": art.history, "extra": art.extra},
            "requirements": requirements, "device_dir": cfg.device_dir, "files": files,
        }
        (root / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if as_tar:
            _write_tar(root, w.path / out.name)
            w.publish(w.path / out.name)
        else:
            w.publish(root)
    return out


def _copy_tree(src: Path, dst: Path) -> None:
    """Every regular file under src (hidden ones excluded), hard-linked where possible: bundles never write into
    a file they share with the artifact."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or p.is_symlink():
            continue
        d = dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, d)
        except OSError:
            shutil.copy2(p, d)


def _write_tar(root: Path, out: Path) -> None:
    """A reproducible tar: sorted names, fixed owner and mtime, regular files and directories only."""
    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        ti.mode = 0o755 if ti.isdir() else 0o644
        return ti

    with tarfile.open(out, "w:gz" if out.name.endswith(("gz", "tgz")) else "w") as tf:
        for p in sorted(root.rglob("*")):
            tf.add(p, arcname=p.relative_to(root).as_posix(), recursive=False, filter=clean)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-.") or "model"


def _service_unit(cfg: BundleConfig) -> str:
    # A user unit: no root needed on the device, %h is the login user's home. `current` always points at the
    # active release, so rollback + restart switches the served model.
    base = cfg.device_dir if cfg.device_dir.startswith("/") else f"%h/{cfg.device_dir}"
    return f"""[Unit]
Description=edgepack OpenAI-compatible server for the active bundle ({base}/current)
After=network-online.target

[Service]
Type=simple
WorkingDirectory={base}/current
# EDGEPACK_API_KEY=... in this file turns on the API key check (keep the key out of the command line)
EnvironmentFile=-{base}/serve.env
ExecStart={base}/venv/bin/edgepack serve {base}/current --host 127.0.0.1 --port {cfg.port}
Restart=on-failure
RestartSec=5

[Install]
WantedBy=default.target
"""


def _device_readme(bundle_id, art, target, runtime, precision, cfg) -> str:
    base = cfg.device_dir if cfg.device_dir.startswith("/") else f"~/{cfg.device_dir}"
    steps = [f"- {r.get('stage')}: {', '.join(f'{k}={v}' for k, v in list((r.get('metrics') or {}).items())[:4])}"
             for r in art.history] or ["- (a plain checkpoint: no stages applied)"]
    engine_note = ("" if target.engine_build != "device" or runtime != "tensorrt" else
                   f"    edgepack device prepare {base}/current        (builds the TensorRT engine HERE, with the "
                   "device's own JetPack TensorRT; not pip-installed)\n")
    return f"""# edgepack bundle {bundle_id}

Model `{art.path.name}` ({art.format}, {precision or 'unknown precision'}) from `{art.base_model}`, made for
target **{target.name}** ({target.description}) to run with runtime `{runtime}`.

Lineage:
{chr(10).join(steps)}

## On the device

    {base}/current -> releases/<bundle id>      (switched atomically by `edgepack push`, `edgepack rollback`)
    pip install -r {base}/current/requirements.txt   (or, from the host: edgepack remote prepare HOST)
    edgepack serve {base}/current                     (OpenAI-compatible API on 127.0.0.1:{cfg.port})
{engine_note}
Service: `mkdir -p ~/.config/systemd/user && cp {base}/current/{SERVICE_NAME} ~/.config/systemd/user/`, then
`systemctl --user daemon-reload && systemctl --user enable --now {SERVICE_NAME}` (and `loginctl enable-linger`
so it starts at boot). Check the files: `cd {base}/current && sha256sum -c --quiet SHA256SUMS`, or from the host
`edgepack remote status HOST --verify`.
"""


# --------------------------------------------------------------------------------------------------- reading
MAX_MEMBERS = 10_000  # files + directories a bundle may hold (a model, its tokenizer and a few small files)
MAX_BUNDLE_BYTES = 1 << 40  # total unpacked bytes a bundle may claim (1 TiB); free disk space is checked too
MAX_MANIFEST_BYTES = 64 << 20  # bundle.json itself
UNLISTED_DIRS = ("engine-cache",)  # written on the device by `edgepack device prepare` (tensorrt_runtime)
_BUNDLE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_DAMAGED = "the bundle is damaged or was not made by edgepack; rebuild it"


def check_bundle_id(bundle_id) -> str:
    """A bundle id is one safe directory name (letters, digits, '.', '_', '-'; never '.', '..' or hidden)."""
    if not isinstance(bundle_id, str) or not _BUNDLE_ID_RE.match(bundle_id):
        raise ArtifactError(f"{bundle_id!r} is not a bundle id",
                            "ids start with a letter or digit and hold only letters, digits, '.', '_' and '-'")
    return bundle_id


def check_manifest(m, where) -> dict:
    """bundle.json's shape: a bundle id, and a files table of {relative path: {"sha256", "bytes"}}."""
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or "bundle_id" not in m:
        raise ArtifactError(f"{where} has no bundle_id or files table", _DAMAGED)
    if not isinstance(m.get("schema_version", 0), int):
        raise ArtifactError(f"{where}: schema_version is not a number", _DAMAGED)
    if m.get("schema_version", 0) > BUNDLE_SCHEMA:
        raise ArtifactError(f"{where} has schema {m['schema_version']}, newer than this edgepack knows", "upgrade edgepack")
    check_bundle_id(m["bundle_id"])
    if len(m["files"]) > MAX_MEMBERS:
        raise ArtifactError(f"{where} lists {len(m['files'])} files, more than a bundle may hold ({MAX_MEMBERS})",
                            _DAMAGED)
    for name, meta in m["files"].items():
        _check_member_name(name)
        if name == BUNDLE_MANIFEST or not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) \
                or not _SHA_RE.match(meta["sha256"]) or type(meta.get("bytes")) is not int or meta["bytes"] < 0:
            raise ArtifactError(f"{where}: the entry for '{name}' is not {{\"sha256\": 64 hex, \"bytes\": n >= 0}}",
                                _DAMAGED)
    if sum(meta["bytes"] for meta in m["files"].values()) > MAX_BUNDLE_BYTES:
        raise ArtifactError(f"{where} claims more than {MAX_BUNDLE_BYTES >> 30} GiB of files", _DAMAGED)
    return m


def read_bundle_manifest(root: Path) -> dict:
    p = Path(root) / BUNDLE_MANIFEST
    if not p.is_file() or p.is_symlink():
        raise ArtifactError(f"'{root}' is not a bundle: it has no {BUNDLE_MANIFEST}",
                            "make one with 'edgepack bundle ARTIFACT --target T -o OUT'")
    if p.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{p} is larger than {MAX_MANIFEST_BYTES >> 20} MiB", _DAMAGED)
    return check_manifest(load_json(p, _DAMAGED), p)


def verify_bundle(root: Path) -> dict:
    """Check a bundle directory against bundle.json; returns the manifest. Every listed file must be a regular file
    (never a link) with its size and sha256, nothing else may be there (only the device's own engine-cache/), and
    bundle.json must agree with SHA256SUMS, with the content digest in the bundle id, and keep runtime.json's paths
    inside the bundle."""
    from edgepack.facts import read_runtime_json

    root = Path(root)
    m = read_bundle_manifest(root)
    bad = []
    for n, meta in m["files"].items():
        p = root / n
        if not _regular_inside(root, p) or p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            bad.append(n)
    if bad:
        raise ArtifactError(f"bundle '{root}': {len(bad)} file(s) missing or not matching bundle.json: "
                            + ", ".join(sorted(bad)[:5]), "rebuild the bundle or copy it again")
    extra = sorted(n for n in _tree(root) if n not in m["files"] and n != BUNDLE_MANIFEST
                   and n.split("/", 1)[0] not in UNLISTED_DIRS)
    if extra:
        raise ArtifactError(f"bundle '{root}': {len(extra)} file(s) or link(s) not listed in bundle.json: "
                            + ", ".join(extra[:5]), "refusing it: a bundle holds only the files it lists; rebuild it")
    _cross_check(m, root, read_runtime_json(root) if "runtime.json" in m["files"] else {})
    return m


def _regular_inside(root: Path, p: Path) -> bool:
    """p is a regular file reached from root without any symbolic link on the way."""
    cur = root
    for part in p.relative_to(root).parts:
        cur = cur / part
        if cur.is_symlink() or not cur.exists():
            return False
    return cur.is_file()


def _tree(root: Path) -> list[str]:
    """Every non-directory entry under root (links included, never followed), as posix paths relative to root."""
    out = []
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root)
        out += [(rel / f).as_posix() for f in files]
        out += [(rel / d).as_posix() for d in dirs if (Path(dirpath) / d).is_symlink()]
    return out


def _cross_check(m: dict, where, rcfg: dict) -> None:
    """What bundle.json says against what the rest of the bundle says about itself (made by make_bundle)."""
    files = m["files"]
    if "SHA256SUMS" in files:
        sums = {}
        for line in Path(where, "SHA256SUMS").read_bytes().decode(errors="replace").splitlines():
            h, sep, name = line.partition("  ")
            if not sep or not _SHA_RE.match(h):
                raise ArtifactError(f"bundle '{where}': SHA256SUMS has a malformed line", _DAMAGED)
            sums[name] = h
        want = {n: meta["sha256"] for n, meta in files.items() if n != "SHA256SUMS"}
        if sums != want:
            diff = sorted(set(sums.items()) ^ set(want.items()))
            raise ArtifactError(f"bundle '{where}': bundle.json and SHA256SUMS disagree about "
                                + ", ".join(sorted({n for n, _ in diff})[:5]),
                                "refusing it: the bundle was tampered with; rebuild it")
    digest = m["bundle_id"].rsplit("-", 1)[-1]
    content = {n: meta for n, meta in files.items() if n not in ("README.md", "SHA256SUMS")}
    if re.fullmatch(r"[0-9a-f]{12}", digest) and files_digest(content)[:12] != digest:
        raise ArtifactError(f"bundle '{where}': its files do not hash to the digest in its id {m['bundle_id']}",
                            "refusing it: the bundle was tampered with; rebuild it")
    tok = rcfg.get("tokenizer", "artifact")
    if not isinstance(tok, str) or not tok or tok.startswith("/") or any(p in ("", ".", "..") for p in tok.split("/")) \
            or not any(n.startswith(tok + "/") for n in files):
        raise ArtifactError(f"bundle '{where}': runtime.json names tokenizer {tok!r}, which is not a folder of the "
                            "bundle", "refusing it: every path a bundle names stays inside it; rebuild the bundle")


def _check_member_name(name) -> None:
    ok = isinstance(name, str) and 0 < len(name) < 4096 and not name.startswith("/") \
        and not re.search(r"[\x00-\x1f\x7f\\]", name) and not re.match(r"^[A-Za-z]:", name)
    if not ok or any(part in ("", ".", "..") for part in name.split("/")):
        raise ArtifactError(f"unsafe path {name!r} in bundle (absolute, leaving the bundle, or not a plain name)",
                            "refusing to unpack it; the bundle was not made by edgepack or was tampered with")


def _scan_tar(tf: tarfile.TarFile, tar_path) -> list[tarfile.TarInfo]:
    """Every member header, refusing links, devices, odd names and duplicates, capped in count and total size
    before a single byte is extracted."""
    members, seen, total = [], set(), 0
    while True:
        m = tf.next()
        if m is None:
            return members
        name = m.name[:-1] if m.isdir() and m.name.endswith("/") else m.name
        _check_member_name(name)
        if m.issym() or m.islnk():
            raise ArtifactError(f"bundle member '{name}' is a link ({m.linkname})",
                                "refusing to unpack it; bundles hold only regular files")
        if m.isdev() or m.isfifo():
            raise ArtifactError(f"bundle member '{name}' is a device file or FIFO",
                                "refusing to unpack it; bundles hold only regular files")
        if not (m.isfile() or m.isdir()):
            raise ArtifactError(f"bundle member '{name}' is not a regular file", "refusing to unpack it")
        if name in seen:
            raise ArtifactError(f"bundle member '{name}' appears twice", "refusing to unpack it; " + _DAMAGED)
        seen.add(name)
        total += m.size
        members.append(m)
        if len(members) > MAX_MEMBERS or total > MAX_BUNDLE_BYTES:
            raise ArtifactError(f"'{tar_path}' holds more than {MAX_MEMBERS} members or {MAX_BUNDLE_BYTES >> 30} GiB",
                                "refusing to unpack it; " + _DAMAGED)


def unpack_bundle(tar_path, dest) -> Path:
    """Unpack a bundle .tar into `dest` (created, must be empty); returns it verified.

    Every member header is checked first (count, total size, names, types), then bundle.json is read from the tar,
    and only the regular files it lists, with exactly the listed sizes, are written -- by this function, never by
    tarfile's extractor, each checked against its sha256 as it is written. Links of any kind, device files, FIFOs
    and unlisted members are refused. On any failure `dest` is removed."""
    tar_path, dest = Path(tar_path), Path(dest)
    check_output_dir(dest, False)
    try:
        with tarfile.open(tar_path) as tf:
            members = _scan_tar(tf, tar_path)
            by_name = {m.name.rstrip("/"): m for m in members}
            mm = by_name.get(BUNDLE_MANIFEST)
            if mm is None or not mm.isfile() or mm.size > MAX_MANIFEST_BYTES:
                raise ArtifactError(f"'{tar_path}' is not a bundle: it has no {BUNDLE_MANIFEST}",
                                    "make one with 'edgepack bundle ARTIFACT --target T -o OUT'")
            try:
                manifest = json.loads(tf.extractfile(mm).read())
            except (ValueError, UnicodeDecodeError) as exc:
                raise ArtifactError(f"{tar_path}: {BUNDLE_MANIFEST} is not valid JSON ({exc})", _DAMAGED) from None
            files = check_manifest(manifest, f"{tar_path}: {BUNDLE_MANIFEST}")["files"]
            dirs = {"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)}
            for name, m in by_name.items():
                if name == BUNDLE_MANIFEST:
                    continue
                if m.isdir() and name in dirs:
                    continue
                if name not in files or not m.isfile():
                    raise ArtifactError(f"bundle member '{name}' is not listed in {BUNDLE_MANIFEST}",
                                        "refusing to unpack it: a bundle holds only the files it lists")
                if m.size != files[name]["bytes"]:
                    raise ArtifactError(f"bundle member '{name}' is {m.size} bytes, {BUNDLE_MANIFEST} says "
                                        f"{files[name]['bytes']}", "refusing to unpack it; copy the bundle again")
            missing = sorted(set(files) - set(by_name))
            if missing:
                raise ArtifactError(f"bundle '{tar_path}': {len(missing)} file(s) missing or not matching "
                                    f"bundle.json: " + ", ".join(missing[:5]), "rebuild the bundle or copy it again")
            need = sum(meta["bytes"] for meta in files.values()) + mm.size
            free = shutil.disk_usage(_existing_parent(dest)).free
            if need > free:
                raise ArtifactError(f"unpacking '{tar_path}' needs {need / 1e6:,.1f} MB, {dest.parent} has "
                                    f"{free / 1e6:,.1f} MB free", "free disk space, or unpack it elsewhere")
            dest.mkdir(parents=True, exist_ok=True)
            try:
                for m in members:
                    name = m.name.rstrip("/")
                    if m.isfile():
                        _write_member(tf, m, dest, name, None if name == BUNDLE_MANIFEST else files[name]["sha256"])
                verify_bundle(dest)
                return dest
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)  # nothing half-trusted stays behind
                raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ArtifactError(f"'{tar_path}' is not a readable bundle tar ({type(exc).__name__}: {exc})",
                            "copy the bundle again") from None


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def _write_member(tf: tarfile.TarFile, m: tarfile.TarInfo, dest: Path, name: str, sha: str | None) -> None:
    """Write one regular file under dest: parents made here (never through a link), the file created exclusively
    without following links, its bytes hashed on the way and compared with the listed sha256."""
    import hashlib

    parent = dest
    for part in name.split("/")[:-1]:
        parent = parent / part
        if not parent.exists():
            parent.mkdir()
        if parent.is_symlink() or not parent.is_dir():
            raise ArtifactError(f"bundle member '{name}' would be written through a link", "refusing to unpack it")
    fd = os.open(parent / name.rsplit("/", 1)[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    h, left = hashlib.sha256(), m.size
    with os.fdopen(fd, "wb") as out, tf.extractfile(m) as src:
        while left:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                raise ArtifactError(f"bundle member '{name}' is truncated", "copy the bundle again")
            h.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    if sha is not None and h.hexdigest() != sha:
        raise ArtifactError(f"bundle '{dest}': 1 file(s) missing or not matching bundle.json: {name}",
                            "rebuild the bundle or copy it again")


def open_bundle(path, workdir=None) -> Path:
    """A verified bundle directory from a bundle directory or .tar (unpacked under `workdir` or a temp dir, which
    is removed again when the bundle is refused)."""
    path = Path(path)
    if path.is_dir():
        verify_bundle(path)
        return path
    if not path.is_file():
        raise ArtifactError(f"bundle '{path}' does not exist", "check the path")
    tmp = None if workdir else tempfile.mkdtemp(prefix="edgepack-bundle-")
    try:
        return unpack_bundle(path, Path(workdir or tmp) / "bundle")
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_bundle(path) -> bool:
    """A bundle .tar (any file) or a directory holding bundle.json."""
    path = Path(path)
    return path.is_file() or (path / BUNDLE_MANIFEST).is_file()


def open_runnable(path, workdir=None, *, trust_pickle: bool = False) -> tuple[Artifact, Path, dict | None, dict]:
    """What serve, generate and bench run: (artifact, tokenizer directory, bundle manifest or None, runtime.json or
    {}) of a bundle directory or .tar (verified; a .tar is unpacked safely under `workdir`, else a temporary
    directory) or of an artifact / checkpoint directory."""
    from edgepack.facts import read_runtime_json

    path = Path(path)
    if not is_bundle(path):
        art = open_artifact(path, trust_pickle=trust_pickle)
        return art, art.path, None, {}
    root = open_bundle(path, workdir)
    manifest, rcfg = read_bundle_manifest(root), read_runtime_json(root)
    return open_artifact(root / "artifact"), root / rcfg.get("tokenizer", "artifact"), manifest, rcfg
