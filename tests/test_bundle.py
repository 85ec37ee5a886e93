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
     "links outside"),
    ("absolute symlink", lambda tf: _member(tf, "link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "links outside"),
    ("hard link out", lambda tf: _member(tf, "hl", type=tarfile.LNKTYPE, linkname="../outside"), "links outside"),
    ("char device", lambda tf: _member(tf, "dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3), "device file"),
    ("fifo", lambda tf: _member(tf, "pipe", type=tarfile.FIFOTYPE), "device file or FIFO"),
])
def test_hostile_tars_are_refused_before_anything_is_written(tmp_path, what, add, needle):
    tar = _tar_with(tmp_path / "evil.tar", add)
    dest = tmp_path / "out"
    with pytest.raises(ArtifactError, match=needle):
        unpack_bundle(tar, dest)
    assert not dest.exists() and not (tmp_path.parent / "evil").exists()


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
