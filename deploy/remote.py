"""Commands that run on a device over the same SSH connection as push: status, prepare, bench.

status  needs only a shell on the device; prepare and bench run the device's own edgepack (--remote-edgepack,
default DEST/venv/bin/edgepack, the environment `prepare` creates), so the numbers are the device's.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shlex
from pathlib import Path

from edgepack.deploy.ship import (
    DEFAULT_DEST,
    Remote,
    RemoteError,
    dest_sh,
    device_state,
    read_remote_json,
    verify_on_device,
)
from edgepack.errors import ValidationFailed


def default_remote_edgepack(dest: str) -> str:
    return f"{dest.removeprefix('~/')}/venv/bin/edgepack"


def _cmd(path: str) -> str:
    """A remote program path as a shell word (relative paths are under the login home, where ssh starts)."""
    return shlex.quote(path.removeprefix("~/"))


def _active_manifest(remote: Remote, dest: str) -> tuple[dict, dict]:
    state = device_state(remote, dest)
    if not state["current"]:
        raise RemoteError(f"{remote.spec}: no active release under '{dest}'", "push a bundle first: edgepack push BUNDLE HOST")
    return state, read_remote_json(remote, dest, "current/bundle.json")


def remote_status(remote: Remote, dest: str = DEFAULT_DEST, verify: bool = False) -> dict:
    """Active release, releases on the device, and (verify=True) every file of the active release against its sha256."""
    state = device_state(remote, dest)
    out = {"host": remote.spec, "dest": dest, **state, "bundle": None, "verified": None, "mismatched": []}
    if state["current"]:
        m = read_remote_json(remote, dest, "current/bundle.json")
        out["bundle"] = {k: m.get(k) for k in ("bundle_id", "runtime", "precision", "created_at", "edgepack_version")}
        out["bundle"]["target"] = (m.get("target") or {}).get("name")
        if verify:
            out["mismatched"] = verify_on_device(remote, dest, f"releases/{state['current']}", m["files"])
            out["verified"] = not out["mismatched"]
    return out


# target ISA / device type -> what `uname -m` says on such a device
_MACHINES = {"x86-64": ("x86_64", "amd64"), "arm64": ("aarch64", "arm64")}


def check_device_matches(remote: Remote, target: dict) -> list[str]:
    """Refuse a device that is not the kind of machine the bundle was made for (CPU architecture; a Jetson bundle
    on a board without L4T). Returns a report row."""
    r = remote.run("uname -m; [ -f /etc/nv_tegra_release ] && echo tegra || true")
    lines = r.stdout.decode(errors="replace").split()
    machine, tegra = (lines[0] if lines else "?"), "tegra" in lines
    want = _MACHINES.get(target.get("isa") or "") or (_MACHINES["arm64"] if target.get("device_type") == "jetson" else None)
    if want and machine not in want:
        raise RemoteError(f"{remote.spec}: the bundle was made for target '{target.get('name')}' ({want[0]}), but the "
                          f"device is {machine}", "bundle the model for this device's target and push that")
    if target.get("device_type") == "jetson" and not tegra:
        raise RemoteError(f"{remote.spec}: the bundle is for Jetson target '{target.get('name')}', but the device has "
                          "no /etc/nv_tegra_release (not an L4T / JetPack system)", "push a bundle made for this device")
    return ["device", "matches", f"{machine}{' (Jetson L4T)' if tegra else ''} for target {target.get('name')}"]


def remote_prepare(remote: Remote, dest: str = DEFAULT_DEST, *, remote_python: str | None = None,
                   remote_edgepack: str | None = None, install: bool = True) -> dict:
    """Make the device ready to run the active bundle: a Python environment (DEST/venv, with the system's
    site-packages so JetPack's TensorRT / CUDA torch stay visible) unless --remote-python names one, the bundle's
    requirements.txt installed, edgepack's version checked, and the TensorRT engine built on the device when the
    bundle's target builds engines there. Returns a report of each step."""
    state, m = _active_manifest(remote, dest)
    d = dest_sh(dest)
    steps = [check_device_matches(remote, m.get("target") or {})]
    if remote_python is None:
        py = f"{d}/venv/bin/python"
        r = remote.run(f"[ -x {py} ] && echo exists || python3 -m venv --system-site-packages {d}/venv", timeout=600)
        steps.append(["python environment", "kept" if b"exists" in r.stdout else "created", f"{dest}/venv"])
    else:
        py = _cmd(remote_python)
        steps.append(["python environment", "given", remote_python])
    if install:
        r = remote.run(f"{py} -m pip install --disable-pip-version-check -r {d}/current/requirements.txt", check=False,
                       timeout=3600)
        text = (r.stdout + r.stderr).decode(errors="replace")
        if r.returncode != 0:
            raise RemoteError(f"{remote.spec}: installing the bundle's requirements failed ({text.strip().splitlines()[-1:]})",
                              "see the pip output by running the same command with ssh; on Jetson install torch / "
                              "onnxruntime from NVIDIA's wheels first")
        new = re.findall(r"Successfully installed (.+)", text)
        steps.append(["requirements", "installed" if new else "already satisfied",
                      new[0] if new else f"{len(m.get('requirements', []))} requirement(s)"])
    ep = _cmd(remote_edgepack or default_remote_edgepack(dest))
    r = remote.run(f"{ep} --version", check=False)
    got = r.stdout.decode(errors="replace").strip().split()[-1:] if r.returncode == 0 else []
    if not got:
        raise RemoteError(f"{remote.spec}: no working edgepack at '{remote_edgepack or default_remote_edgepack(dest)}'",
                          "install the same edgepack version on the device (pip install edgepack-*.whl into "
                          f"{dest}/venv), or pass --remote-edgepack PATH")
    want = m.get("edgepack_version")
    steps.append(["edgepack", "ok" if got[0] == want else "VERSION DIFFERS", f"device {got[0]}, bundle made by {want}"])
    target = m.get("target") or {}
    prebuilt = ((m.get("artifact") or {}).get("extra") or {}).get("engine_sm") is not None
    needs_engine = m.get("runtime") == "tensorrt" and (target.get("engine_build") == "device" or not prebuilt)
    if needs_engine:
        # the engine is built by the device's own edgepack from the bundle's ONNX + build spec, cached by
        # (TensorRT version, SM) in the release's engine-cache/ so a rollback keeps its own engine
        rel = f"releases/{state['current']}"
        r = remote.run(f"{ep} device prepare {d}/{rel} --json", check=False, timeout=3600)
        if r.returncode != 0:
            raise RemoteError(f"{remote.spec}: building the TensorRT engine on the device failed "
                              f"({' '.join(r.stderr.decode(errors='replace').strip().splitlines()[-1:])})",
                              "check that JetPack's TensorRT Python bindings are visible to the device's edgepack "
                              "(the error names the trtexec command that builds the same engine by hand)")
        lines = [ln for ln in r.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
        built = json.loads(lines[-1])["steps"][-1] if lines else ["tensorrt engine", "built", ""]
        steps.append([built[0], f"{built[1]} on the device", f"{dest}/{rel}/{built[2]}"])
    else:
        steps.append(["engine build", "not needed", f"runtime {m.get('runtime')} runs the artifact as shipped"])
    return {"host": remote.spec, "bundle_id": state["current"], "steps": steps}


def remote_bench(remote: Remote, dest: str = DEFAULT_DEST, *, remote_edgepack: str | None = None,
                 bench_args: str = "", results_dir: Path | None = None, timeout: float = 3600) -> dict:
    """Run `edgepack bench` on the device against the active release and bring its JSON record back; saved under
    results_dir as <host>-<bundle id>-<UTC time>.json when given. The record gains a "remote" section."""
    state, m = _active_manifest(remote, dest)
    d = dest_sh(dest)
    ep = _cmd(remote_edgepack or default_remote_edgepack(dest))
    extra = " ".join(shlex.quote(a) for a in shlex.split(bench_args))
    cmd = f"{ep} bench {d}/current/artifact --json {extra}".strip()
    r = remote.run(cmd, check=False, timeout=timeout)
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    if r.returncode != 0:
        raise RemoteError(f"{remote.spec}: edgepack bench failed on the device ({' '.join(err.strip().splitlines()[-1:])})",
                          "run 'edgepack remote prepare HOST' first, or run the bench command there by hand")
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    try:
        record = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise ValidationFailed(f"{remote.spec}: edgepack bench printed no JSON record as its last line",
                               "check that the device's edgepack has the bench command (edgepack bench --help)") from None
    record["remote"] = {"host": remote.spec, "bundle_id": state["current"], "target": (m.get("target") or {}).get("name"),
                        "command": cmd, "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if results_dir is not None:
        results_dir = Path(results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        safe_host = re.sub(r"[^A-Za-z0-9_.-]+", "_", remote.spec)
        path = results_dir / f"{safe_host}-{state['current']}-{stamp}.json"
        path.write_text(json.dumps(record) + "\n")  # one line: what `edgepack bench compare` reads
        record["remote"]["saved_to"] = str(path)
    return record
