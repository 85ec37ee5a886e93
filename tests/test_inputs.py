"""Stages refuse inputs that would give silent wrong numbers: checksums that do not match the manifest, NaN / Inf
weights, integer weights, a missing tensor, impossible config.json numbers, and out-of-range settings."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from edgepack.cli import cli


@pytest.fixture()
def art(stories_copy):
    return stories_copy


def _weights(a, edit):
    from safetensors.numpy import load_file, save_file

    w = load_file(a / "model.safetensors")
    edit(w)
    save_file(w, a / "model.safetensors", metadata={"format": "pt"})


def _nan(w):
    k = sorted(w)[0]
    w[k] = w[k].copy()
    w[k].flat[3] = float("nan")


def _int32(w):
    k = next(k for k in sorted(w) if k.endswith("q_proj.weight"))
    w[k] = (w[k] * 100).astype("int32")


def _missing(w):
    del w[next(k for k in sorted(w) if k.endswith("layers.0.mlp.up_proj.weight"))]


def _config(a, **kw):
    p = a / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **kw}))


@pytest.mark.parametrize("damage,needle", [
    (lambda a: _weights(a, _nan), "holds NaN or Inf"),
    (lambda a: _weights(a, _int32), "stored as I32, not as floating point"),
    (lambda a: _weights(a, _missing), "1 tensor(s) missing from the weights"),
    (lambda a: _config(a, num_hidden_layers=-3), "num_hidden_layers = -3"),
    (lambda a: _config(a, hidden_size=32), "config.json"),  # weights are 64 wide: shapes differ from config.json
])
def test_damaged_checkpoints_give_an_error_not_a_number(art, tmp_path, damage, needle):
    damage(art)
    (tmp_path / "t.txt").write_text("Once upon a time there was a little girl named Lily. " * 20)
    r = CliRunner().invoke(cli, ["eval", str(art), "--text", str(tmp_path / "t.txt"), "--window", "64", "--json"])
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]  # after any progress line
    assert r.exit_code == 1 and len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output, r.output


def test_a_flipped_byte_under_a_manifest_is_caught_by_every_stage(art, tmp_path):
    conv = tmp_path / "conv"
    r = CliRunner().invoke(cli, ["convert", str(art), "-o", str(conv)])
    assert r.exit_code == 0, r.output
    p = conv / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01  # one bit, in the middle of a weight: no header check can see it
    p.write_bytes(bytes(b))
    (tmp_path / "t.txt").write_text("Once upon a time there was a little girl named Lily. " * 20)
    for args in (["eval", str(conv), "--text", str(tmp_path / "t.txt"), "--window", "64"], ["generate", str(conv), "--prompt", "Once", "--max-new-tokens", "2"],
                 ["convert", str(conv), "-o", str(tmp_path / "c2")]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and "does not match its sha256" in r.output, (args, r.output)


@pytest.mark.parametrize("args,needle", [
    (["generate", "{a}", "--prompt", "Once", "--threads", "0"], "--threads"),
    (["generate", "{a}", "--prompt", "Once", "--max-new-tokens", "600"], "beyond the model's context of 512"),
    (["generate", "{a}", "--prompt", "Once", "--seed", "-1"], "seed must be in"),
    (["eval", "{a}", "--text", "{a}/config.json", "--threads", "0"], "'threads' must be >= 1"),
    (["tune", "qlora", "{a}", "--data", "{t}", "--max-minutes", "-1", "-o", "{o}"], "'max_minutes' must be > 0"),
    (["tune", "qlora", "{a}", "--data", "{t}", "--seq-len", "4096", "-o", "{o}"], "beyond the model's context of 512"),
    (["distill", "{a}", "--student-from-prune", "depth:0.2", "--max-seconds", "-5", "-o", "{o}"],
     "'max_seconds' must be > 0"),
])
def test_out_of_range_settings_are_refused(art, tmp_path, args, needle):
    (tmp_path / "t.txt").write_text("Once upon a time there was a little girl named Lily. " * 200)
    r = CliRunner().invoke(cli, [x.format(a=art, o=tmp_path / "o", t=tmp_path / "t.txt") for x in args])
    assert r.exit_code != 0 and needle in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


def _bad_header(a):
    import struct

    p = a / "model.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    head[next(k for k in head if k != "__metadata__")] = "not a tensor entry"
    new = json.dumps(head, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    p.write_bytes(raw[:8] + new[:n] + raw[8 + n:])


@pytest.mark.parametrize("args,needle", [
    (["fit", "{a}", "--target", "cpu-x86-64", "--precision", "int4", "--group-size", "0"], "is not a group size"),
    (["fit", "{a}", "--target", "cpu-x86-64", "--precision", "int4", "--group-size", str(2**40)], "not a group size"),
    (["run", "{r}", "--dry-run"], "is not UTF-8 text"),
    (["tune", "qlora", "{a}", "--data", "{t}", "--target-modules", "nosuch_proj", "--steps", "1", "-o", "{o}"],
     "no module of the model has that name"),
    (["eval", "{h}", "--text", "{t}"], "is not a table of tensors"),
])
def test_former_tracebacks_are_one_line_errors(art, tmp_path, args, needle):
    (tmp_path / "t.txt").write_text("\n\n".join(f"Story {i}: once upon a time, cat {i} sat on mat {i * 7} and sang "
                                                f"{i % 5} songs." for i in range(80)))
    (tmp_path / "r.toml").write_bytes(b'[recipe]\nmodel = "\xff\xfe"\n')
    h = tmp_path / "h"
    shutil.copytree(art, h)
    _bad_header(h)
    r = CliRunner().invoke(cli, [x.format(a=art, o=tmp_path / "o", t=tmp_path / "t.txt", r=tmp_path / "r.toml", h=h)
                                 for x in args])
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]  # after any progress line
    assert r.exit_code == 1 and len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output, r.output
