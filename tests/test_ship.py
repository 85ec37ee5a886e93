"""Push / rollback / remote commands against a REAL OpenSSH server on 127.0.0.1, started here on a free port with
its own host and user keys in a temporary directory. The "device" is this machine, reached only through ssh."""

from __future__ import annotations

import getpass
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT, STORIES

from edgepack.artifact import sha256_file
from edgepack.cli import cli
from edgepack.deploy.bundle import make_bundle, read_bundle_manifest
from edgepack.deploy.remote import remote_bench, remote_prepare, remote_status
from edgepack.deploy.ship import Remote, RemoteError, SSHOptions, push_bundle, rollback, verify_on_device
from edgepack.errors import ValidationFailed
from edgepack.targets import load_target

pytestmark = pytest.mark.ssh
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """{"config": ssh client config with Host aliases, "dir": key dir}; the server is killed at teardown."""
    if not Path(SSHD).is_file() or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip("OpenSSH server/client not installed (apt-get install openssh-server openssh-client)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key", "other_host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        try:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir, when root
        except OSError as exc:
            pytest.skip(f"sshd cannot start: cannot create /run/sshd ({exc})")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "MaxSessions 50\nMaxStartups 50\nLogLevel ERROR\n")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"sshd cannot start: {proc.stderr.read().decode().strip()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.skip("sshd did not accept connections within 10 s")
    host_pub = (d / "host_key.pub").read_text().split()[:2]
    other_pub = (d / "other_host_key.pub").read_text().split()[:2]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_pub)}\n")
    (d / "wrong_known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(other_pub)}\n")
    common = f"  HostName 127.0.0.1\n  Port {port}\n  User {getpass.getuser()}\n" \
             f"  IdentityFile {d}/user_key\n  IdentitiesOnly yes\n  IdentityAgent none\n  GlobalKnownHostsFile /dev/null\n"
    (d / "ssh_config").write_text(
        f"Host device\n{common}  UserKnownHostsFile {d}/known_hosts\n\n"
        f"Host stranger\n{common}  UserKnownHostsFile {d}/stranger_known_hosts\n\n"
        f"Host impostor\n{common}  UserKnownHostsFile {d}/wrong_known_hosts\n\n"
        f"Host deadhost\n  HostName 127.0.0.1\n  Port {_free_port()}\n  IdentityFile {d}/user_key\n")
    yield {"config": str(d / "ssh_config"), "dir": d}
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Two bundles of real models: stories260K, and a copy whose weights are halved (same tokenizer files)."""
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    from safetensors.numpy import load_file, save_file

    d = tmp_path_factory.mktemp("bundles")
    other = d / "stories-half"
    shutil.copytree(STORIES, other)
    os.chmod(other, 0o755)
    for p in other.iterdir():
        os.chmod(p, 0o644)
    w = load_file(STORIES / "model.safetensors")
    save_file({k: v * 0.5 for k, v in w.items()}, other / "model.safetensors", metadata={"format": "pt"})
    t = load_target("cpu-x86-64")
    return make_bundle(STORIES, t, d / "a"), make_bundle(other, t, d / "b")


def _opts(sshd, **kw):
    return SSHOptions(ssh_config=sshd["config"], **kw)


def _files(bundle: Path) -> dict:
    m = read_bundle_manifest(bundle)
    return {**m["files"], "bundle.json": {"sha256": sha256_file(bundle / "bundle.json"),
                                          "bytes": (bundle / "bundle.json").stat().st_size}}


def test_push_verifies_activates_and_a_second_push_sends_nothing(sshd, bundles, tmp_path):
    a, _ = bundles
    dest = str(tmp_path / "dev")
    files = _files(a)
    with Remote("device", _opts(sshd)) as r:
        res = push_bundle(a, r, dest)
        again = push_bundle(a, r, dest)
        st = remote_status(r, dest, verify=True)
    bid = read_bundle_manifest(a)["bundle_id"]
    assert res.ok and res.files_sent == len(files) and res.files_reused == 0
    assert res.bytes_sent == sum(f["bytes"] for f in files.values())
    assert os.readlink(Path(dest) / "current") == f"releases/{bid}"
    for name, meta in files.items():
        assert sha256_file(Path(dest) / "current" / name) == meta["sha256"]
    assert again.files_sent == 0 and again.bytes_sent == 0 and again.files_reused == len(files)
    assert again.already_active and not res.already_active
    assert st["verified"] is True and st["current"] == bid and st["bundle"]["runtime"] == "torch-cpu"
    assert (Path(dest) / ".history").read_text().split() == [bid]


def test_interrupted_push_resumes_without_activating_a_partial_release(sshd, bundles, tmp_path):
    a, b = bundles
    dest = tmp_path / "dev"
    fa, fb = _files(a), _files(b)
    aid, bid = read_bundle_manifest(a)["bundle_id"], read_bundle_manifest(b)["bundle_id"]

    class Dropped(Exception):
        pass

    sent = []

    def drop_after_two(name, nbytes):
        sent.append(name)
        if len(sent) == 2:
            raise Dropped("connection dropped")

    with Remote("device", _opts(sshd)) as r:
        push_bundle(a, r, str(dest))
        with pytest.raises(Dropped):
            push_bundle(b, r, str(dest), on_file=drop_after_two)
        # the partial release is not active and not in releases/; the active one is untouched and intact
        assert os.readlink(dest / "current") == f"releases/{aid}"
        assert not (dest / "releases" / bid).exists()
        assert remote_status(r, str(dest), verify=True)["verified"] is True
        staging = dest / "releases" / f".incoming-{bid}"
        staged = {p.relative_to(staging).as_posix(): sha256_file(p) for p in staging.rglob("*") if p.is_file()}
        # the two files handed to ssh arrived whole; the rest of staging was hard-linked from the active release
        assert all(staged[n] == fb[n]["sha256"] for n in sent) and "artifact/model.safetensors" not in staged
        assert all(staged[n] == fa[n]["sha256"] for n in staged if n not in sent)
        # a truncated file (as a connection dying mid-file leaves) must be re-sent, not trusted
        victim = sent[0]
        (staging / victim).write_bytes((b / victim).read_bytes()[:10])
        res = push_bundle(b, r, str(dest))
    # only what the device lacks travels: not the files already streamed, not files equal to the active release's
    unchanged = {n for n in fb if fa.get(n, {}).get("sha256") == fb[n]["sha256"]}
    expect = sorted(n for n in fb if n not in unchanged and n not in sent[:2] or n == victim)
    assert res.files_sent == len(expect)
    assert res.bytes_sent == sum(fb[n]["bytes"] for n in expect)
    assert "artifact/model.safetensors" in expect and len(unchanged) >= 6  # tokenizer files came from release a
    assert os.readlink(dest / "current") == f"releases/{bid}" and res.previous == aid
    assert sha256_file(dest / "current" / victim) == fb[victim]["sha256"]
    assert not (dest / "releases" / f".incoming-{bid}").exists()


def test_corrupted_file_on_device_is_detected_and_repaired(sshd, bundles, tmp_path):
    a, _ = bundles
    dest = tmp_path / "dev"
    bid = read_bundle_manifest(a)["bundle_id"]
    weights = dest / "releases" / bid / "artifact" / "model.safetensors"
    with Remote("device", _opts(sshd)) as r:
        push_bundle(a, r, str(dest))
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
        weights.write_bytes(bytes(data))
        st = remote_status(r, str(dest), verify=True)
        assert verify_on_device(r, str(dest), f"releases/{bid}", read_bundle_manifest(a)["files"]) == \
            ["artifact/model.safetensors"]
    assert st["verified"] is False and st["mismatched"] == ["artifact/model.safetensors"]
    cli_args = ["remote", "status", "device", "--verify", "--ssh-config", sshd["config"], "--dest", str(dest)]
    out = CliRunner().invoke(cli, cli_args)
    assert out.exit_code == 1 and "DAMAGED" in out.output
    out = CliRunner().invoke(cli, cli_args + ["--json"])
    assert out.exit_code == 1
    assert json.loads(out.output.strip().splitlines()[-1])["hosts"][0]["status"]["mismatched"] == \
        ["artifact/model.safetensors"]
    with Remote("device", _opts(sshd)) as r:
        res = push_bundle(a, r, str(dest))  # re-push repairs: only the damaged file travels
    assert res.files_sent == 1 and res.bytes_sent == (a / "artifact" / "model.safetensors").stat().st_size
    out = CliRunner().invoke(cli, cli_args + ["--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.strip().splitlines()[-1])["hosts"][0]["status"]["verified"] is True


def test_file_damaged_before_activation_blocks_the_switch(sshd, bundles, tmp_path):
    a, b = bundles
    dest = tmp_path / "dev"
    aid, bid = read_bundle_manifest(a)["bundle_id"], read_bundle_manifest(b)["bundle_id"]
    victim = "artifact/tokenizer.json"  # identical in both bundles: linked from the active release, not sent
    staged = dest / "releases" / f".incoming-{bid}" / victim

    def damage(name, nbytes):  # while the transfer runs, a staged file goes bad (disk error, another writer)
        if staged.exists() and staged.read_bytes() == (b / victim).read_bytes():
            staged.unlink()  # a new inode: the active release's copy (same inode before) stays intact
            staged.write_bytes(b"{}")

    with Remote("device", _opts(sshd)) as r:
        push_bundle(a, r, str(dest))
        with pytest.raises(ValidationFailed, match=f"{victim}.*NOT activated"):
            push_bundle(b, r, str(dest), on_file=damage)
        assert os.readlink(dest / "current") == f"releases/{aid}" and not (dest / "releases" / bid).exists()
        assert remote_status(r, str(dest), verify=True)["verified"] is True
        res = push_bundle(b, r, str(dest))  # the damaged staged file is sent again; the rest is reused
    assert res.files_sent == 1 and res.bytes_sent == (b / victim).stat().st_size
    assert os.readlink(dest / "current") == f"releases/{bid}"


def test_rollback_walks_back_and_old_releases_are_pruned(sshd, bundles, tmp_path):
    a, b = bundles
    dest = str(tmp_path / "dev")
    aid, bid = read_bundle_manifest(a)["bundle_id"], read_bundle_manifest(b)["bundle_id"]
    with Remote("device", _opts(sshd)) as r:
        push_bundle(a, r, dest)
        push_bundle(b, r, dest)
        back = rollback(r, dest)
        assert os.readlink(Path(dest) / "current") == f"releases/{aid}"
        with pytest.raises(RemoteError, match="no earlier release"):
            rollback(r, dest)
        cli_out = CliRunner().invoke(cli, ["rollback", "device", "--to", bid, "--ssh-config", sshd["config"],
                                           "--dest", dest, "--json"])
        assert cli_out.exit_code == 0, cli_out.output
        fwd = json.loads(cli_out.output.strip().splitlines()[-1])["hosts"][0]["result"]
        assert os.readlink(Path(dest) / "current") == f"releases/{bid}"
        pruned = push_bundle(a, r, dest, keep=1)
    assert back == {"host": "device", "from": bid, "to": aid} and fwd == {"host": "device", "from": aid, "to": bid}
    assert pruned.removed == [bid] and not (Path(dest) / "releases" / bid).exists()
    assert sorted(p.name for p in (Path(dest) / "releases").iterdir()) == [aid]
    assert os.readlink(Path(dest) / "current") == f"releases/{aid}"


def test_unknown_or_changed_host_key_is_refused(sshd, bundles, tmp_path):
    a, _ = bundles
    dest = tmp_path / "dev"
    with pytest.raises(RemoteError, match="not in known_hosts") as exc:
        with Remote("stranger", _opts(sshd)) as r:
            push_bundle(a, r, str(dest))
    assert "--accept-new-host-key" in exc.value.hint and not dest.exists()
    with pytest.raises(RemoteError, match="CHANGED"):
        with Remote("impostor", _opts(sshd, accept_new_host_key=True)) as r:  # opting in never accepts a changed key
            push_bundle(a, r, str(dest))
    assert not dest.exists()
    with Remote("stranger", _opts(sshd, accept_new_host_key=True)) as r:
        assert push_bundle(a, r, str(dest)).ok
    recorded = (sshd["dir"] / "stranger_known_hosts").read_text()
    assert (sshd["dir"] / "host_key.pub").read_text().split()[1] in recorded


def test_parallel_push_one_failing_host_does_not_stop_the_others(sshd, bundles, tmp_path):
    a, _ = bundles
    dest = tmp_path / "dev"
    out = CliRunner().invoke(cli, ["push", str(a), "deadhost", "device", "--ssh-config", sshd["config"],
                                   "--dest", str(dest), "--connect-timeout", "5", "--json"])
    assert out.exit_code == 1
    rep = json.loads(out.output.strip().splitlines()[-1])
    by_host = {h["host"]: h for h in rep["hosts"]}
    assert by_host["device"]["ok"] and by_host["device"]["result"]["files_sent"] == len(_files(a))
    assert not by_host["deadhost"]["ok"] and "cannot connect" in by_host["deadhost"]["error"]
    assert (dest / "current" / "bundle.json").is_file()


@pytest.mark.slow  # the device side imports torch and loads the model for a real bench run
def test_remote_prepare_and_bench_bring_the_device_json_back(sshd, bundles, tmp_path):
    a, _ = bundles
    dest = str(tmp_path / "dev")
    ep, py = str(ROOT / ".venv" / "bin" / "edgepack"), str(ROOT / ".venv" / "bin" / "python")
    if not Path(ep).is_file():
        pytest.skip("needs the repository's .venv/bin/edgepack to act as the device's edgepack")
    with Remote("device", _opts(sshd)) as r:
        push_bundle(a, r, dest)
        prep = remote_prepare(r, dest, remote_python=py, remote_edgepack=ep)  # pip finds everything installed
        rec = remote_bench(r, dest, remote_edgepack=ep, results_dir=tmp_path / "results",
                           bench_args="--prompt-len 8 --gen-len 4 --runs 2 --warmup 1 --target cpu-x86-64")
        # a bundle for the other CPU architecture is refused by prepare on this device
        other = "cpu-arm64" if platform.machine() == "x86_64" else "cpu-x86-64"
        wrong = make_bundle(STORIES, load_target(other), tmp_path / "wrong")
        push_bundle(wrong, r, str(tmp_path / "dev2"))
        with pytest.raises(RemoteError, match=f"made for target '{other}' .*but the device is {platform.machine()}"):
            remote_prepare(r, str(tmp_path / "dev2"), remote_python=py, remote_edgepack=ep)
    steps = {s[0]: s for s in prep["steps"]}
    assert steps["device"][1] == "matches"
    assert steps["requirements"][1] == "already satisfied" and steps["edgepack"][1] == "ok"
    assert steps["engine build"][1] == "not needed"  # torch-cpu on a CPU target: no engine to build
    saved = json.loads(Path(rec["remote"]["saved_to"]).read_text())
    assert saved["remote"]["bundle_id"] == read_bundle_manifest(a)["bundle_id"]
    assert saved["artifact"].endswith("current/artifact") and saved["runtime"] == "torch-cpu"
    assert saved["decode_tokens_per_s"] > 0 and saved["settings"]["gen_lens"] == [4]
    from edgepack.bench.record import load_record  # the local results compare with `edgepack bench compare`

    assert load_record(rec["remote"]["saved_to"])["decode_tokens_per_s"] == saved["decode_tokens_per_s"]


@pytest.mark.slow  # quantizes and exports stories260K to the INT4 Q/DQ fp16 ONNX for the engine build spec
def test_remote_prepare_builds_the_engine_on_the_device_or_names_trtexec(sshd, tmp_path):
    """A bundle whose target builds TensorRT engines on the device: `remote prepare` runs the device's own
    `edgepack device prepare` on the release. This "device" (this machine, over ssh) has no TensorRT, so the build
    must fail with the device's one-line reason: what to install and the trtexec line that builds the same engine."""
    import importlib.util

    from edgepack.artifact import open_artifact
    from edgepack.deploy.compile import CompileConfig, compile_stage

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: the engine would really be built (covered by the tensorrt tests)")
    ep, py = str(ROOT / ".venv" / "bin" / "edgepack"), str(ROOT / ".venv" / "bin" / "python")
    if not Path(ep).is_file():
        pytest.skip("needs the repository's .venv/bin/edgepack to act as the device's edgepack")
    # a GPU box of this machine's CPU architecture whose profile says: build engines on the device (as Jetson does)
    text = (ROOT / "targets" / "profiles" / "jetson-orin-nano-8gb.toml").read_text()
    text = text.replace('name = "jetson-orin-nano-8gb"', 'name = "gpu-box-device-build"')
    text = text.replace('device_type = "jetson"', 'device_type = "gpu"').replace("unified_memory = true",
                                                                                 "unified_memory = false")
    (tmp_path / "gpu-box.toml").write_text(text)
    target = load_target(str(tmp_path / "gpu-box.toml"))
    assert target.engine_build == "device"
    art = compile_stage(open_artifact(STORIES), CompileConfig(exporter="torchscript", max_context=128), target,
                        tmp_path / "compiled")
    assert art.extra["runtime"] == "tensorrt" and (art.path / "trt_build.json").is_file()
    assert art.extra["precision"] == "int4"  # the default for device-built TensorRT: INT4 weights as Q/DQ
    bundle = make_bundle(art, target, tmp_path / "bundle")
    reqs = [ln for ln in (bundle / "requirements.txt").read_text().splitlines() if not ln.startswith("#")]
    assert reqs and not any(ln.startswith("tensorrt") for ln in reqs)  # the device's own TensorRT builds it
    assert "edgepack device prepare" in (bundle / "README.md").read_text()
    dest = str(tmp_path / "dev")
    with Remote("device", _opts(sshd)) as r:
        push_bundle(bundle, r, dest)
        with pytest.raises(RemoteError, match="building the TensorRT engine on the device failed") as e:
            remote_prepare(r, dest, remote_python=py, remote_edgepack=ep)
    assert "tensorrt" in str(e.value) and "trtexec --onnx=" in str(e.value) and "--stronglyTyped" in str(e.value)
    assert f"{dest}/releases/" in str(e.value)  # the command line points at the release on the device


def test_concurrent_pushes_are_serialised_by_the_device_lock(sshd, bundles, tmp_path):
    """Four pushes of the same bundle, then two different bundles, at once: every push reports ok, `current` always
    ends on a complete verified release, and no .history entry is lost."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = bundles
    aid, bid = read_bundle_manifest(a)["bundle_id"], read_bundle_manifest(b)["bundle_id"]

    def push(bundle, dest):
        with Remote("device", _opts(sshd)) as r:
            return push_bundle(bundle, r, str(dest))

    same = tmp_path / "same"
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: push(a, same), range(4)))
    assert all(res.ok for res in results)
    assert os.readlink(same / "current") == f"releases/{aid}"
    assert sorted(p.name for p in (same / "releases").iterdir()) == [aid]  # no .old-* / .incoming-* left over
    assert not (same / ".lock").exists()
    with Remote("device", _opts(sshd)) as r:
        assert remote_status(r, str(same), verify=True)["verified"] is True
    two = tmp_path / "two"
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda bb: push(bb, two), [a, b]))
    assert all(res.ok for res in results)
    assert sorted((two / ".history").read_text().split()) == sorted([aid, bid])
    assert os.readlink(two / "current") == f"releases/{(two / '.history').read_text().split()[-1]}"


def test_a_stale_lock_is_taken_over_and_a_live_one_waits(sshd, bundles, tmp_path, monkeypatch):
    import edgepack.deploy.ship as ship

    a, _ = bundles
    dest = tmp_path / "dev"
    (dest / ".lock").mkdir(parents=True)
    (dest / ".lock" / "owner").write_text("someone else\n")
    monkeypatch.setattr(ship, "LOCK_WAIT_S", 1)
    with Remote("device", _opts(sshd)) as r:
        with pytest.raises(RemoteError, match="another push or rollback holds the device lock \\(someone else\\)"):
            push_bundle(a, r, str(dest))
        assert not (dest / "current").exists()
        old = time.time() - ship.LOCK_STALE_S - 5
        os.utime(dest / ".lock", (old, old))  # its holder died long ago
        assert push_bundle(a, r, str(dest)).ok
    assert not (dest / ".lock").exists()


def test_rollback_refuses_a_damaged_release(sshd, bundles, tmp_path):
    a, b = bundles
    dest = tmp_path / "dev"
    aid, bid = read_bundle_manifest(a)["bundle_id"], read_bundle_manifest(b)["bundle_id"]
    with Remote("device", _opts(sshd)) as r:
        push_bundle(a, r, str(dest))
        push_bundle(b, r, str(dest))
        w = dest / "releases" / aid / "artifact" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])  # truncated weights in the release we would roll back to
        with pytest.raises(ValidationFailed, match=f"release {aid} on the device does not match its SHA256SUMS"):
            rollback(r, str(dest))
    assert os.readlink(dest / "current") == f"releases/{bid}"
    assert not (dest / ".lock").exists()


def test_ctrl_c_during_a_push_stops_before_activation(sshd, bundles, tmp_path):
    """SIGINT reaches the main thread while a worker thread streams: the worker must not go on to activate."""
    import signal

    from edgepack.deploy.ship import for_each_host

    a, b = bundles
    dest = tmp_path / "dev"
    aid, bid = read_bundle_manifest(a)["bundle_id"], read_bundle_manifest(b)["bundle_id"]
    with Remote("device", _opts(sshd)) as r:
        push_bundle(a, r, str(dest))

    def push_one(h):
        def sigint_then_slow(name, nbytes):
            if name == sorted(_files(b))[0]:
                os.kill(os.getpid(), signal.SIGINT)  # what `kill -INT` on the push process does
                time.sleep(1.0)  # the main thread sees it while this file is still streaming

        with Remote(h, _opts(sshd)) as r:
            return push_bundle(b, r, str(dest), on_file=sigint_then_slow)

    with pytest.raises(KeyboardInterrupt):
        for_each_host(["device"], push_one)
    assert os.readlink(dest / "current") == f"releases/{aid}" and not (dest / "releases" / bid).exists()
    assert (dest / ".history").read_text().split() == [aid] and not (dest / ".lock").exists()
