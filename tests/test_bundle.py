"""Bundles: contents and checksums, refusal of artifacts a target cannot run, safe unpacking of hostile tars."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest
from click.testing import CliRunner
from conftest import STORIES

from edgepack.artifact import ArtifactWriter, open_artifact, sha256_file, stage_record
from edgepack.cli import cli
from edgepack.deploy.bundle import (
    BundleConfig,
    device_requirements,
    make_bundle,
    open_bundle,
    read_bundle_manifest,
    unpack_bundle,
    verify_bundle,
)
from edgepack.errors import ArtifactError, ConfigError, UnsupportedOnTarget
from edgepack.hf import copy_tokenizer
from edgepack.targets import load_target


@pytest.fixture(scope="module")
def stories():
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    return STORIES


def _fake_compiled(path, fmt: str, extra: dict, tokenizer: bool = True):
    """A compiled artifact as a compile stage would record it (format + extra), with a stand-in model file."""
    with ArtifactWriter(path) as w:
        (w.path / "model.bin.plan").write_bytes(os.urandom(4096))
        if tokenizer:
            copy_tokenizer(STORIES, w.path)
        return w.commit(format=fmt, base_model=str(STORIES), extra=extra,
                        record=stage_record("compile", {"format": fmt}, 0.1, {"max_abs_diff": 1e-5}))


def test_bundle_holds_artifact_manifest_lineage_requirements_and_service(stories, tmp_path):
    t = load_target("cpu-x86-64")
    out = make_bundle(stories, t, tmp_path / "b", BundleConfig(port=8123))
    m = verify_bundle(out)
    art = open_artifact(stories)
    assert m["target"]["name"] == "cpu-x86-64" and m["runtime"] == "torch-cpu" and m["precision"] == "fp32"
    assert m["artifact"]["digest"] == art.digest() and m["artifact"]["format"] == "hf"
    for name, meta in art.files.items():  # the model travels byte for byte
        assert m["files"][f"artifact/{name}"]["sha256"] == meta["sha256"]
        assert sha256_file(out / "artifact" / name) == meta["sha256"]
    reqs = (out / "requirements.txt").read_text().splitlines()
    assert {"torch>=2.4", "transformers>=5.0", "fastapi>=0.110", "uvicorn>=0.29"} <= set(reqs)
    assert not any(r.startswith("onnxruntime") for r in reqs)  # torch-cpu does not need onnxruntime
    assert any(r.startswith("onnxruntime") for r in device_requirements("onnxruntime"))
    unit = (out / "edgepack-serve.service").read_text()
    assert "ExecStart=%h/edgepack/venv/bin/edgepack serve %h/edgepack/current --host 127.0.0.1 --port 8123" in unit
    rcfg = json.loads((out / "runtime.json").read_text())
    assert rcfg["context"] == 512 and rcfg["tokenizer"] == "artifact"
    assert m["bundle_id"] in (out / "README.md").read_text()
    if shutil.which("sha256sum"):  # what a device without edgepack can check
        r = subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out, capture_output=True)
        assert r.returncode == 0, r.stdout
    # the same inputs give the same bundle id, as a .tar too
    tar = make_bundle(stories, t, tmp_path / "b.tar", BundleConfig(port=8123))
    assert read_bundle_manifest(unpack_bundle(tar, tmp_path / "u"))["bundle_id"] == m["bundle_id"]
    other = make_bundle(stories, t, tmp_path / "c", BundleConfig(port=9000))
    assert read_bundle_manifest(other)["bundle_id"] != m["bundle_id"]


def test_artifacts_a_target_cannot_run_are_refused(stories, tmp_path):
    with pytest.raises(UnsupportedOnTarget, match="'torch-cpu', which target 'jetson-orin-nano-8gb' does not offer"):
        make_bundle(stories, load_target("jetson-orin-nano-8gb"), tmp_path / "x")
    engine = _fake_compiled(tmp_path / "engine", "tensorrt", {"runtime": "tensorrt", "engine_sm": 90,
                                                             "precision": "fp16"})
    with pytest.raises(UnsupportedOnTarget, match="built for sm_90, but target 'a100-80gb' is sm_80"):
        make_bundle(engine, load_target("a100-80gb"), tmp_path / "x")
    with pytest.raises(UnsupportedOnTarget, match="is sm_87"):
        make_bundle(engine, load_target("jetson-agx-orin-64gb"), tmp_path / "x")
    orin_engine = _fake_compiled(tmp_path / "engine87", "tensorrt", {"runtime": "tensorrt", "engine_sm": 87,
                                                                    "precision": "fp16"})
    with pytest.raises(UnsupportedOnTarget, match="builds engines on the device"):  # even with the right SM
        make_bundle(orin_engine, load_target("jetson-agx-orin-64gb"), tmp_path / "x")
    fp8 = _fake_compiled(tmp_path / "fp8", "onnx", {"runtime": "onnxruntime", "precision": "fp8"})
    with pytest.raises(UnsupportedOnTarget, match="fp8 weights"):
        make_bundle(fp8, load_target("cpu-arm64"), tmp_path / "x")
    assert not (tmp_path / "x").exists()  # every check runs before anything is written
    # the right SM on a host-build target passes the target checks; the bundle still needs a runtime that exists
    from edgepack.formats import RUNTIMES

    if "tensorrt" not in RUNTIMES:
        with pytest.raises(ConfigError, match="runtime 'tensorrt' is not available in this edgepack"):
            make_bundle(engine, load_target("h100-sxm"), tmp_path / "x")
    else:
        assert read_bundle_manifest(make_bundle(engine, load_target("h100-sxm"), tmp_path / "h"))["runtime"] == "tensorrt"
    onnx = _fake_compiled(tmp_path / "onnx", "onnx", {"runtime": "onnxruntime", "precision": "int8"})
    jb = make_bundle(onnx, load_target("jetson-orin-nano-8gb"), tmp_path / "jetson")
    assert any(r.startswith("onnxruntime") for r in read_bundle_manifest(jb)["requirements"])


def test_tokenizer_is_required_and_can_come_from_elsewhere(stories, tmp_path):
    bare = _fake_compiled(tmp_path / "bare", "onnx", {"runtime": "onnxruntime", "precision": "int8"}, tokenizer=False)
    with pytest.raises(ArtifactError, match="no tokenizer files") as exc:
        make_bundle(bare, load_target("cpu-x86-64"), tmp_path / "x")
    assert "--tokenizer" in exc.value.hint
    out = make_bundle(bare, load_target("cpu-x86-64"), tmp_path / "b", BundleConfig(tokenizer=str(stories)))
    assert sha256_file(out / "tokenizer" / "tokenizer.json") == sha256_file(stories / "tokenizer.json")
    assert json.loads((out / "runtime.json").read_text())["tokenizer"] == "tokenizer"


def _tar_with(path, add):
    with tarfile.open(path, "w") as tf:
        add(tf)
    return path


def _member(tf, name, data=b"x", **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(ti, k, v)
    ti.size = len(data) if ti.isreg() else 0
    tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)


@pytest.mark.parametrize("what,add,needle", [
    ("absolute path", lambda tf: _member(tf, "/tmp/edgepack-evil"), "unsafe path"),
    ("dot-dot", lambda tf: _member(tf, "artifact/../../evil"), "unsafe path"),
    ("symlink out", lambda tf: _member(tf, "artifact/link", type=tarfile.SYMTYPE, linkname="../../etc/passwd"),
     "is a link"),
    ("absolute symlink", lambda tf: _member(tf, "link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "is a link"),
    ("hard link out", lambda tf: _member(tf, "hl", type=tarfile.LNKTYPE, linkname="../outside"), "is a link"),
    ("char device", lambda tf: _member(tf, "dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3), "device file"),
    ("fifo", lambda tf: _member(tf, "pipe", type=tarfile.FIFOTYPE), "device file or FIFO"),
    ("newline in a name", lambda tf: _member(tf, "artifact/a\nb"), "unsafe path"),
])
def test_hostile_tars_are_refused_before_anything_is_written(tmp_path, what, add, needle):
    tar = _tar_with(tmp_path / "evil.tar", add)
    dest = tmp_path / "out"
    with pytest.raises(ArtifactError, match=needle):
        unpack_bundle(tar, dest)
    assert not dest.exists() and not (tmp_path.parent / "evil").exists()


@pytest.fixture(scope="module")
def good_dir(stories, tmp_path_factory):
    return make_bundle(stories, load_target("cpu-x86-64"), tmp_path_factory.mktemp("good") / "b")


def _retar(src_dir, out, extra=None, skip=(), order=None):
    """A tar of a bundle directory as make_bundle writes it, plus `extra(tf)` members."""
    with tarfile.open(out, "w:gz" if out.name.endswith("gz") else "w") as tf:
        for p in sorted(src_dir.rglob("*")):
            rel = p.relative_to(src_dir).as_posix()
            if rel not in skip:
                tf.add(p, arcname=rel, recursive=False)
        if extra:
            extra(tf)
    return out


def _tampered(good_dir, tmp_path, edit, *, sums=True, reid=True, after=None):
    """A copy of the bundle with `edit(dir)` applied, then bundle.json's table (and, if asked, SHA256SUMS and the
    id's digest) recomputed: what an attacker who knows the format would make."""
    from edgepack.artifact import files_digest, hash_files

    d = tmp_path / "t"
    shutil.copytree(good_dir, d)
    edit(d)
    if sums:
        table = {n: m for n, m in hash_files(d).items() if n not in ("bundle.json", "SHA256SUMS")}
        (d / "SHA256SUMS").write_text("".join(f"{m['sha256']}  {n}\n" for n, m in sorted(table.items())))
    m = json.loads((d / "bundle.json").read_text())
    m["files"] = {n: meta for n, meta in hash_files(d).items() if n != "bundle.json"}
    if reid:
        content = {n: meta for n, meta in m["files"].items() if n not in ("README.md", "SHA256SUMS")}
        m["bundle_id"] = m["bundle_id"].rsplit("-", 1)[0] + "-" + files_digest(content)[:12]
    (d / "bundle.json").write_text(json.dumps(m))
    if after:
        after(d)
    return d


def _flip_weights(d):
    p = d / "artifact" / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[-100] ^= 0xFF
    p.write_bytes(bytes(b))


def _chain(tf):
    """d0 -> ., d1 -> d0/d0 ... and a file written through the chain (the PATH_MAX / realpath trick's shape)."""
    _member(tf, "d0", type=tarfile.SYMTYPE, linkname=".")
    for i in range(1, 10):
        _member(tf, f"d{i}", type=tarfile.SYMTYPE, linkname=f"d{i - 1}/" * 3)
    _member(tf, "d9/y", type=tarfile.SYMTYPE, linkname="../" * 12 + "etc/hostname")


def _set_manifest(d, **kw):
    m = json.loads((d / "bundle.json").read_text())
    for k, v in kw.items():
        if callable(v):
            v(m)
        else:
            m[k] = v
    (d / "bundle.json").write_text(json.dumps(m))


@pytest.mark.parametrize("what,make,needle", [
    ("unlisted chat template", lambda g, t: _retar(g, t / "x.tar", lambda tf: _member(
        tf, "artifact/chat_template.jinja", b"{{ 'pwned' }}")), "not listed in bundle.json"),
    ("internal symlink chain", lambda g, t: _retar(g, t / "x.tar", _chain), "is a link"),
    ("hard link inside", lambda g, t: _retar(g, t / "x.tar", lambda tf: _member(
        tf, "artifact/w2", type=tarfile.LNKTYPE, linkname="artifact/model.safetensors")), "is a link"),
    ("duplicate member", lambda g, t: _retar(g, t / "x.tar", lambda tf: _member(tf, "README.md", b"other")),
     "appears twice"),
    ("missing listed file", lambda g, t: _retar(g, t / "x.tar", skip=("artifact/config.json",)), "missing"),
    ("truncated tar", lambda g, t: _truncate(_retar(g, t / "x.tar"), 0.5), "not a readable bundle tar"),
    ("truncated tar.gz", lambda g, t: _truncate(_retar(g, t / "x.tar.gz"), 0.5), "not a readable bundle tar"),
    ("weights + bundle.json tampered", lambda g, t: _retar(_tampered(g, t, _flip_weights, sums=False, reid=False),
                                                           t / "x.tar"), "bundle.json and SHA256SUMS disagree"),
    ("weights + bundle.json + SHA256SUMS tampered", lambda g, t: _retar(
        _tampered(g, t, _flip_weights, reid=False), t / "x.tar"), "do not hash to the digest in its id"),
    ("absolute tokenizer path", lambda g, t: _retar(_tampered(g, t, lambda d: (d / "runtime.json").write_text(
        json.dumps({**json.loads((d / "runtime.json").read_text()), "tokenizer": "/usr/share"}))), t / "x.tar"),
     "not a folder of the bundle"),
    ("bundle id '..'", lambda g, t: _retar(_tampered(g, t, bool, after=lambda d: _set_manifest(d, bundle_id="..")),
                                           t / "x.tar"), "is not a bundle id"),
    ("bundle id '.'", lambda g, t: _retar(_tampered(g, t, bool, after=lambda d: _set_manifest(d, bundle_id=".")),
                                          t / "x.tar"), "is not a bundle id"),
    ("file entry is a string", lambda g, t: _retar(_tampered(g, t, bool, after=lambda d: _set_manifest(
        d, files=lambda m: m["files"].update({"README.md": "abc"}))), t / "x.tar"),
     "entry for 'README.md' is not"),
])
def test_hostile_bundle_corpus_is_refused_and_leaves_nothing(good_dir, tmp_path, what, make, needle):
    tar = make(good_dir, tmp_path)
    work = tmp_path / "w"
    with pytest.raises(ArtifactError, match=needle):
        open_bundle(tar, work)
    assert not (work / "bundle").exists()
    r = CliRunner().invoke(cli, ["push", str(tar), "nohost-never-contacted"])  # the CLI: one line, no traceback
    assert r.exit_code == 1 and r.output.startswith("error: ") and "Traceback" not in r.output, r.output


def _truncate(p, frac):
    data = p.read_bytes()
    p.write_bytes(data[:int(len(data) * frac)])
    return p


def test_member_count_and_size_caps_hold_before_extracting(good_dir, tmp_path, monkeypatch):
    import edgepack.deploy.bundle as b

    many = _retar(good_dir, tmp_path / "many.tar", lambda tf: [_member(tf, f"junk/{i}", b"") for i in range(60)])
    monkeypatch.setattr(b, "MAX_MEMBERS", 40)
    with pytest.raises(ArtifactError, match="more than 40 members"):
        unpack_bundle(many, tmp_path / "u1")
    monkeypatch.setattr(b, "MAX_MEMBERS", 10_000)
    monkeypatch.setattr(b, "MAX_BUNDLE_BYTES", 100_000)  # the weights alone are 1,044,992 bytes
    with pytest.raises(ArtifactError, match="more than"):
        unpack_bundle(_retar(good_dir, tmp_path / "big.tar.gz"), tmp_path / "u2")
    assert not (tmp_path / "u1").exists() and not (tmp_path / "u2").exists()


def test_bundle_directories_are_held_to_the_same_rules(good_dir, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(good_dir, d)
    verify_bundle(d)
    (d / "artifact" / "chat_template.jinja").write_text("{{ 'pwned' }}")
    with pytest.raises(ArtifactError, match="not listed in bundle.json: artifact/chat_template.jinja"):
        verify_bundle(d)
    (d / "artifact" / "chat_template.jinja").unlink()
    os.symlink("/etc", d / "tokenizer")
    with pytest.raises(ArtifactError, match="not listed in bundle.json: tokenizer"):
        verify_bundle(d)
    (d / "tokenizer").unlink()
    w = d / "artifact" / "model.safetensors"
    w.rename(d / "w")
    os.symlink(d / "w", w)  # a listed file that is a link: refused even though its bytes match
    with pytest.raises(ArtifactError, match="not matching bundle.json: artifact/model.safetensors"):
        verify_bundle(d)


def test_tampered_bundle_file_is_detected(stories, tmp_path):
    good = make_bundle(stories, load_target("cpu-x86-64"), tmp_path / "b.tar")
    with tarfile.open(good) as src, tarfile.open(tmp_path / "bad.tar", "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name == "artifact/config.json":
                data = data.replace(b'"num_hidden_layers": 5', b'"num_hidden_layers": 6')
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ArtifactError, match="1 file\\(s\\) missing or not matching bundle.json: artifact/config.json"):
        open_bundle(tmp_path / "bad.tar", tmp_path / "w")
    assert not (tmp_path / "w" / "bundle").exists()  # the unpacked copy is removed, not left half-trusted


def test_bundle_cli_refuses_with_one_line_and_reports_json(stories, tmp_path):
    r = CliRunner().invoke(cli, ["bundle", str(stories), "--target", "jetson-orin-nano-4gb", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "error: 'stories260K' runs on runtime 'torch-cpu'" in r.output
    r = CliRunner().invoke(cli, ["bundle", str(stories), "--target", "cpu-x86-64", "-o", str(tmp_path / "b.tar"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["bundle_id"].startswith("stories260K-cpu-x86-64-") and rep["runtime"] == "torch-cpu"
    assert rep["bytes"] > 1_044_992  # the weights alone are 1,044,992 bytes


def test_generate_and_device_prepare_take_a_bundle_tar_as_serve_does(stories, tmp_path):
    tar = make_bundle(stories, load_target("cpu-x86-64"), tmp_path / "b.tar", BundleConfig())
    runner = CliRunner()
    args = ["--prompt", "Once upon a time", "--max-new-tokens", "8", "--json"]
    from_tar = runner.invoke(cli, ["generate", str(tar), *args])
    from_dir = runner.invoke(cli, ["generate", str(open_bundle(tar, tmp_path / "u")), *args])
    from_art = runner.invoke(cli, ["generate", str(stories), *args])
    assert from_tar.exit_code == 0 and from_dir.exit_code == 0, from_tar.output + from_dir.output
    tokens = [json.loads(r.output.strip().splitlines()[-1])["tokens"] for r in (from_tar, from_dir, from_art)]
    assert tokens[0] == tokens[1] == tokens[2] and len(tokens[0]) == 8
    prep = runner.invoke(cli, ["device", "prepare", str(tar), "--json"])
    assert prep.exit_code == 0, prep.output
    rep = json.loads(prep.output.strip().splitlines()[-1])
    assert rep["runtime"] == "torch-cpu" and rep["bundle"] == str((tmp_path / "b.bundle" / "bundle").absolute())
    again = runner.invoke(cli, ["device", "prepare", str(tar), "--json"])  # the unpacked copy is reused, verified
    assert again.exit_code == 0, again.output
