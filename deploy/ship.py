"""Ship bundles to devices over SSH: resumable push, on-device verification, atomic activation, rollback.

We drive the system OpenSSH client (`ssh`) rather than paramiko: it is the user's own configuration exactly as
they use it by hand -- ~/.ssh/config (Host aliases, ProxyJump, per-host keys), the ssh-agent, known_hosts with
hashed entries and @cert-authority lines, hardware keys -- none of which paramiko honours fully. BatchMode=yes means
it never stops to ask for a password or a host key, and StrictHostKeyChecking=yes (accept-new only when the user
opts in) refuses hosts whose key is not known. The device side needs only a POSIX shell, sha256sum and tar.

Layout on the device, under DEST (default ~/edgepack):

    releases/<bundle id>/            one directory per release, never modified once activated
    releases/.incoming-<bundle id>/  a push in progress; survives an interruption so the next push resumes
    current -> releases/<bundle id>  switched atomically (ln -s to a temporary name, then mv -T over `current`)
    .history                         activated bundle ids, oldest first (rollback walks it backwards)
    .lock/owner                      held by one push or rollback at a time (see DeviceLock)
"""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import ConfigError, EdgepackError, ValidationFailed

DEFAULT_DEST = "edgepack"
DEFAULT_KEEP = 3  # releases kept on the device (the active one always is)
LOCK_WAIT_S = 120  # how long a push or rollback waits for another one's device lock before giving up
LOCK_STALE_S = 90  # a lock whose holder has not touched it for this long is dead (its client was killed): taken over
LOCK_HEARTBEAT_S = 15  # while a transfer runs, the device side touches the lock this often
interrupted = threading.Event()  # set on Ctrl-C (for_each_host): pushes stop before activating anything


class RemoteError(EdgepackError):
    """An SSH connection, authentication, host key or remote command failed."""


@dataclass(frozen=True)
class SSHOptions:
    ssh_config: str | None = None  # ssh -F: replaces ~/.ssh/config (None: the user's own)
    identity: str | None = None  # ssh -i: an extra private key (the agent and config keys still apply)
    accept_new_host_key: bool = False  # add an unknown host's key to known_hosts (never a *changed* key)
    connect_timeout: int = 10  # seconds
    ssh_binary: str = "ssh"


@dataclass
class Remote:
    """One device, as `[user@]host[:port]` or a Host alias from the SSH config."""

    spec: str
    opts: SSHOptions = field(default_factory=SSHOptions)

    def __post_init__(self):
        spec = self.spec.strip()
        if not spec or spec.startswith("-") or any(c.isspace() for c in spec):
            raise ConfigError(f"'{self.spec}' is not a host", "give [user@]host[:port] or a Host alias from ~/.ssh/config")
        self.port = None
        m = re.match(r"^(.*?)(?::(\d+))?$", spec) if spec.count(":") <= 1 else None
        self.dest = m.group(1) if m else spec
        if m and m.group(2):
            self.port = int(m.group(2))

    control_dir: str | None = field(default=None, init=False, repr=False)

    def _base_argv(self) -> list[str]:
        o = self.opts
        argv = [o.ssh_binary, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={o.connect_timeout}",
                "-o", f"StrictHostKeyChecking={'accept-new' if o.accept_new_host_key else 'yes'}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if o.ssh_config:
            argv += ["-F", o.ssh_config]
        if o.identity:
            argv += ["-i", o.identity]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.control_dir:
            argv += ["-o", "ControlMaster=no", "-o", f"ControlPath={self.control_dir}/m"]
        return argv

    def _argv(self, command: str) -> list[str]:
        return self._base_argv() + ["--", self.dest, command]

    def __enter__(self) -> Remote:
        """Open one authenticated master connection that every later command reuses (OpenSSH ControlMaster): a
        handshake costs ~0.1-1 s, and a push runs about ten commands. ControlPersist=120 s makes the master exit on
        its own if we die without closing it."""
        self.control_dir = tempfile.mkdtemp(prefix="ep-ssh-", dir="/tmp")  # short: socket paths max ~104 bytes
        argv = self._base_argv()
        argv[argv.index("ControlMaster=no")] = "ControlMaster=yes"
        # stderr to a file, not a pipe: the backgrounded master keeps its stderr open for its whole life
        with tempfile.TemporaryFile() as err:
            try:
                rc = subprocess.run(argv + ["-o", "ControlPersist=120", "-f", "-N", "--", self.dest],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    timeout=self.opts.connect_timeout + 30).returncode
            except FileNotFoundError:
                self._cleanup()
                raise RemoteError(f"the ssh client '{self.opts.ssh_binary}' is not installed",
                                  "install OpenSSH (apt-get install openssh-client)") from None
            except subprocess.TimeoutExpired:
                rc = 255
            err.seek(0)
            text = err.read().decode(errors="replace")
        if rc != 0:
            self._cleanup()
            raise ssh_error(self.spec, rc, text)
        return self

    def __exit__(self, *exc) -> None:
        if self.control_dir:
            subprocess.run(self._base_argv() + ["-O", "exit", "--", self.dest], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30)
            self._cleanup()

    def _cleanup(self) -> None:
        import shutil

        if self.control_dir:
            shutil.rmtree(self.control_dir, ignore_errors=True)
        self.control_dir = None

    def run(self, script: str, *, check: bool = True, timeout: float | None = 600) -> subprocess.CompletedProcess:
        """Run a POSIX sh script on the device (passed as `sh -c`, so the login shell only sees one quoted word)."""
        try:
            proc = subprocess.run(self._argv("sh -c " + shlex.quote(script)), capture_output=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise RemoteError(f"the ssh client '{self.opts.ssh_binary}' is not installed",
                              "install OpenSSH (apt-get install openssh-client)") from None
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.spec}: the command did not finish in {timeout:.0f} s", "check the device") from None
        if check and proc.returncode != 0:
            raise ssh_error(self.spec, proc.returncode, proc.stderr.decode(errors="replace"))
        return proc

    def popen(self, script: str, stderr) -> subprocess.Popen:
        """A remote command fed through stdin. stderr goes to a file: an unread pipe could fill and stall it."""
        return subprocess.Popen(self._argv("sh -c " + shlex.quote(script)), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=stderr)


def ssh_error(host: str, rc: int, stderr: str) -> RemoteError:
    """Turn ssh's exit status and stderr into a one-line problem with a fix."""
    last = " ".join(stderr.strip().splitlines()[-1:]) if stderr.strip() else f"exit status {rc}"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return RemoteError(f"{host}: the host key CHANGED since it was recorded in known_hosts (a reinstalled device, "
                           "or someone in between)", "confirm the new fingerprint out of band, then remove the old "
                           "entry with ssh-keygen -R HOST; edgepack never accepts a changed key")
    if "Host key verification failed" in stderr or "No ED25519 host key is known" in stderr \
            or re.search(r"No \S+ host key is known", stderr):
        return RemoteError(f"{host}: its host key is not in known_hosts, so the device cannot be authenticated",
                           "check the fingerprint (ssh-keyscan HOST | ssh-keygen -lf -) and connect once with ssh, "
                           "or pass --accept-new-host-key to trust it on first use")
    if "Permission denied" in stderr:
        return RemoteError(f"{host}: SSH authentication failed ({last})",
                           "load your key into ssh-agent (ssh-add), pass --identity, or set IdentityFile in ~/.ssh/config")
    if rc == 255:
        return RemoteError(f"{host}: cannot connect over SSH ({last})",
                           "check the host name, port and network (try: ssh HOST true)")
    return RemoteError(f"{host}: remote command failed with status {rc} ({last})", "see the message; run it by hand with ssh")


def dest_sh(dest: str) -> str:
    """DEST as a shell word: `~/x` and relative paths are under the login user's home (where ssh starts)."""
    if dest.startswith("~/"):
        dest = dest[2:]
    if not dest or ".." in Path(dest).parts:
        raise ConfigError(f"--dest '{dest}' is not a usable directory", "give a path such as edgepack or /opt/edgepack")
    return shlex.quote(dest)


def _check_id(bundle_id: str) -> str:
    from edgepack.deploy.bundle import check_bundle_id

    return check_bundle_id(bundle_id)


# ------------------------------------------------------------------------------------------------ device state
def device_state(remote: Remote, dest: str = DEFAULT_DEST) -> dict:
    """{"current": id or None, "history": [ids, oldest first], "releases": [ids], "incoming": [ids]}."""
    d = dest_sh(dest)
    out = remote.run(f"""cd {d} 2>/dev/null || exit 0
echo "current=$(readlink current 2>/dev/null || true)"
[ -f .history ] && sed 's/^/history=/' .history
[ -d releases ] && ls -1A releases | sed 's/^/release=/'
exit 0""").stdout.decode()
    return _parse_state(out)


def _parse_state(out: str) -> dict:
    state = {"current": None, "history": [], "releases": [], "incoming": []}
    for line in out.splitlines():
        key, _, val = line.partition("=")
        if key == "current" and val:
            state["current"] = val.rsplit("/", 1)[-1]
        elif key == "history" and val:
            state["history"].append(val)
        elif key == "release" and val.startswith(".incoming-"):
            state["incoming"].append(val[len(".incoming-"):])
        elif key == "release" and not val.startswith("."):
            state["releases"].append(val)
    return state


def remote_hashes(remote: Remote, dest: str, rel_dir: str, names) -> dict[str, str]:
    """{name: sha256} for the files among `names` that exist under DEST/rel_dir on the device."""
    names = list(names)
    if not names:
        return {}
    quoted = " ".join(shlex.quote(n) for n in names)
    out = remote.run(f"cd {dest_sh(dest)}/{shlex.quote(rel_dir)} 2>/dev/null || exit 0\n"
                     f"for f in {quoted}; do [ -f \"$f\" ] && [ ! -L \"$f\" ] && sha256sum -- \"$f\"; done; exit 0").stdout
    hashes = {}
    for line in out.decode(errors="replace").splitlines():
        h, _, name = line.partition("  ")
        if len(h) == 64:
            hashes[name] = h
    return hashes


def verify_on_device(remote: Remote, dest: str, rel_dir: str, files: dict) -> list[str]:
    """Names whose sha256 on the device differs from `files` (or that are missing). Empty = verified."""
    got = remote_hashes(remote, dest, rel_dir, files)
    return sorted(n for n, meta in files.items() if got.get(n) != meta["sha256"])


# ------------------------------------------------------------------------------------------------- device lock
class DeviceLock:
    """One push or rollback at a time on a device: `mkdir DEST/.lock` (atomic on every POSIX filesystem, and needs
    no flock binary), with the holder's token in .lock/owner. Every later command of the holder checks the token
    (`self.held`, a shell prefix) and touches the lock; a lock untouched for LOCK_STALE_S seconds belongs to a client
    that died (kill -9, lost link) and is taken over. Released on exit, also after an error."""

    def __init__(self, remote: Remote, dest: str, wait_s: float | None = None):
        self.remote, self.d, self.wait_s = remote, dest_sh(dest), LOCK_WAIT_S if wait_s is None else wait_s
        self.token = f"{uuid.uuid4().hex} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        q = shlex.quote(self.token)
        self.held = (f'cd {self.d} || exit 3\n[ "$(cat .lock/owner 2>/dev/null)" = {q} ] || '
                     '{ echo "edgepack: lost the device lock (.lock) to another push" >&2; exit 76; }\ntouch .lock\n')

    def __enter__(self) -> DeviceLock:
        tries = max(1, int(self.wait_s * 5))
        r = self.remote.run(f"""mkdir -p {self.d} && cd {self.d} || exit 3
i=0
while ! mkdir .lock 2>/dev/null; do
  now=$(date +%s); seen=$(stat -c %Y .lock 2>/dev/null || echo "$now")
  if [ $((now - seen)) -gt {LOCK_STALE_S} ]; then
    mv .lock .lock.stale.$$ 2>/dev/null && rm -rf .lock.stale.$$ && echo "took over a stale lock" >&2
    continue
  fi
  i=$((i + 1)); [ $i -ge {tries} ] && {{ echo "held by: $(cat .lock/owner 2>/dev/null)" >&2; exit 75; }}
  sleep 0.2
done
printf '%s\n' {shlex.quote(self.token)} > .lock/owner""", check=False, timeout=self.wait_s + 60)
        if r.returncode == 75:
            raise RemoteError(f"{self.remote.spec}: another push or rollback holds the device lock ({_last(r)}) and did "
                              f"not finish within {self.wait_s:.0f} s", "wait for it and retry; a lock whose client "
                              f"died is taken over after {LOCK_STALE_S} s")
        if r.returncode != 0:
            raise ssh_error(self.remote.spec, r.returncode, r.stderr.decode(errors="replace"))
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.remote.run(f'cd {self.d} && [ "$(cat .lock/owner 2>/dev/null)" = {shlex.quote(self.token)} ] && '
                            "rm -rf .lock; exit 0", check=False, timeout=60)
        except RemoteError:
            pass  # the link is gone: the lock goes stale and is taken over after LOCK_STALE_S


def _last(r: subprocess.CompletedProcess) -> str:
    return " ".join(r.stderr.decode(errors="replace").strip().splitlines()[-1:]).removeprefix("held by: ")


def _check_stop(res: PushResult) -> None:
    if interrupted.is_set():
        raise RemoteError(f"{res.host}: interrupted after {res.files_sent} file(s); the release was NOT activated",
                          "push again to resume: files that arrived whole are not sent again")


# ------------------------------------------------------------------------------------------------------- push
@dataclass
class PushResult:
    host: str
    ok: bool
    bundle_id: str
    files_sent: int = 0
    bytes_sent: int = 0
    files_reused: int = 0  # already on the device with the right sha256 (resumed push, or unchanged files)
    seconds: float = 0.0
    previous: str | None = None
    removed: list = field(default_factory=list)
    error: str | None = None
    already_active: bool = False  # the device was already running this exact bundle (every file verified)


def push_bundle(bundle_dir, remote: Remote, dest: str = DEFAULT_DEST, keep: int = DEFAULT_KEEP,
                on_file=None, manifest: dict | None = None) -> PushResult:
    """Push a bundle directory to one device and activate it. `on_file(name, bytes)` is called after each file is
    streamed (progress; raising from it interrupts the push exactly as a dropped connection would). `manifest`:
    the bundle's, when the caller has just verified it (pushing to many hosts hashes the bundle once)."""
    from edgepack.deploy.bundle import BUNDLE_MANIFEST, verify_bundle

    if keep < 1:
        raise ConfigError("--keep must be >= 1", "keep at least the active release")
    t0 = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    manifest = manifest or verify_bundle(bundle_dir)
    bid = _check_id(manifest["bundle_id"])
    files = dict(manifest["files"])
    files[BUNDLE_MANIFEST] = {"sha256": _sha(bundle_dir / BUNDLE_MANIFEST), "bytes": (bundle_dir / BUNDLE_MANIFEST).stat().st_size}
    with DeviceLock(remote, dest) as lock:
        return _push_locked(bundle_dir, remote, dest, keep, on_file, files, bid, lock, t0)


def _push_locked(bundle_dir, remote, dest, keep, on_file, files, bid, lock, t0) -> PushResult:
    staging = f"releases/.incoming-{bid}"
    # 1. one probe: device state, and for each file the sha256 of the copy the device already has -- in the staging
    #    dir of an interrupted push, else in the same release (a repair), else in the active release (unchanged files)
    quoted = " ".join(shlex.quote(n) for n in files)
    out = remote.run(f"""{lock.held}set -e
mkdir -p {staging}
echo "current=$(readlink current 2>/dev/null || true)"
[ -f .history ] && sed 's/^/history=/' .history
ls -1A releases | sed 's/^/release=/'
echo "free_kib=$(df -Pk . | awk 'NR==2 {{print $4}}')"
cur=$(readlink current 2>/dev/null || echo /nonexistent)
for f in {quoted}; do
  for src in {staging} releases/{bid} "$cur"; do
    if [ -f "$src/$f" ] && [ ! -L "$src/$f" ]; then printf 'hash=%s ' "$src"; sha256sum -- "$src/$f"; break; fi
  done
done
exit 0""").stdout.decode(errors="replace")
    state = _parse_state(out)
    res = PushResult(remote.spec, False, bid, previous=state["current"])
    have, seeds = set(), {}
    for line in out.splitlines():
        if not line.startswith("hash="):
            continue
        src, _, rest = line[5:].partition(" ")
        h, _, path = rest.partition("  ")
        name = path[len(src) + 1:]
        if name in files and h == files[name]["sha256"]:
            if src == staging:
                have.add(name)
            else:
                seeds[name] = src
    if state["current"] == bid and not have and seeds == {n: f"releases/{bid}" for n in files}:
        remote.run(f"{lock.held}rm -rf {staging}")  # already running exactly this bundle, every file verified
        res.ok, res.already_active, res.files_reused = True, True, len(files)
        res.seconds = time.perf_counter() - t0
        return res
    if seeds:  # hard links: releases are never written into, so sharing inodes is safe and costs no space
        cmds = [f"mkdir -p {shlex.quote(str(Path(staging, n).parent))} && rm -f {shlex.quote(f'{staging}/{n}')} && "
                f"(ln {shlex.quote(f'{src}/{n}')} {shlex.quote(f'{staging}/{n}')} 2>/dev/null || "
                f"cp -p {shlex.quote(f'{src}/{n}')} {shlex.quote(f'{staging}/{n}')})" for n, src in seeds.items()]
        remote.run(f"{lock.held}set -e\n" + "\n".join(cmds))
    to_send = sorted(n for n in files if n not in have and n not in seeds)
    res.files_reused = len(files) - len(to_send)
    need = sum(files[n]["bytes"] for n in to_send)
    free = re.search(r"^free_kib=(\d+)$", out, re.M)
    if free and need > int(free.group(1)) * 1024:
        raise RemoteError(f"{remote.spec}: not enough disk space under '{dest}': the push needs {need / 1e6:,.1f} MB, "
                          f"the device has {int(free.group(1)) / 1e3:,.1f} MB free",
                          "free space there, or lower --keep so older releases are removed")

    # 2. stream the rest as one tar, flushed file by file: when the push is interrupted, every file already handed
    #    to ssh arrives whole (a dropped connection may leave one partial file, which the sha256 check re-sends)
    if to_send:
        err = tempfile.TemporaryFile()
        proc = remote.popen(f"{lock.held}(while sleep {LOCK_HEARTBEAT_S}; do touch .lock || exit; done) </dev/null >/dev/null 2>&1 &\n"
                            # (its own fds: a background job holding ssh's stderr would keep the session open)
                            "hb=$!\n"
                            f"cd {staging} && tar xf - --no-same-owner; rc=$?; kill $hb; exit $rc", stderr=err)
        try:
            for n in to_send:
                _check_stop(res)
                ti = tarfile.TarInfo(n)
                ti.size, ti.mode, ti.mtime = (bundle_dir / n).stat().st_size, 0o644, int(time.time())
                proc.stdin.write(ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
                with open(bundle_dir / n, "rb") as f:
                    while chunk := f.read(1 << 20):
                        _check_stop(res)  # Ctrl-C mid-file: the partial file is never activated
                        proc.stdin.write(chunk)
                proc.stdin.write(b"\0" * (-ti.size % tarfile.BLOCKSIZE))
                proc.stdin.flush()
                res.files_sent += 1
                res.bytes_sent += ti.size
                if on_file:
                    on_file(n, ti.size)
            proc.stdin.write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end of archive
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):  # the device end went away (lost link, disk full, ...)
            _close_quietly(proc)
            raise RemoteError(f"{remote.spec}: the transfer broke off after {res.files_sent} file(s) "
                              f"({_tail(err) or 'connection lost'}); the release was NOT activated",
                              "push again: files that arrived whole are not sent again") from None
        except BaseException:
            _close_quietly(proc)  # EOF: the device keeps the whole files it got; the release stays inactive
            err.close()
            raise
        if proc.wait() != 0:
            raise ssh_error(remote.spec, proc.returncode, _tail(err, all_lines=True))
        err.close()

    # 3. verify every file on the device, and 4. only then activate: release dir into place, `current` switched
    #    atomically, history appended, old releases pruned -- one script, so nothing runs between check and switch
    _check_stop(res)
    history = [h for h in state["history"] if h != bid] + [bid]
    keep_ids = set(history[-keep:]) | {bid}
    removed = sorted(r for r in state["releases"] if r not in keep_ids and r in state["history"])
    sums = "".join(f"{m['sha256']}  {n}\n" for n, m in sorted(files.items()))
    prune = "".join(f"rm -rf releases/{shlex.quote(r)}\n" for r in removed)
    r = remote.run(f"""{lock.held}cd {staging} || exit 3
printf %s {shlex.quote(sums)} | sha256sum -c --quiet - 2>/dev/null && ok=1 || ok=0
[ "$ok" = 1 ] || exit 42
set -e
cd ../..
if [ -d releases/{bid} ]; then mv releases/{bid} releases/.old-{bid}-$$; fi
mv {staging} releases/{bid}
rm -rf releases/.old-{bid}-$$
ln -sfn releases/{bid} .current.tmp.$$
mv -T .current.tmp.$$ current
printf '%s\\n' {" ".join(shlex.quote(h) for h in history)} > .history.tmp.$$ && mv .history.tmp.$$ .history
{prune}""", check=False)
    if r.returncode == 42:
        bad = sorted(ln.rsplit(":", 1)[0] for ln in r.stdout.decode(errors="replace").splitlines() if ln.endswith("FAILED")
                     or "FAILED open" in ln)
        raise ValidationFailed(f"{remote.spec}: {len(bad) or 'some'} file(s) of {bid} do not match their sha256 on the "
                               f"device after the transfer ({', '.join(bad[:3])}); the release was NOT activated",
                               "push again: only the damaged files are sent again")
    if r.returncode != 0:
        raise ssh_error(remote.spec, r.returncode, r.stderr.decode(errors="replace"))
    res.removed = removed
    res.ok = True
    res.seconds = time.perf_counter() - t0
    return res


def _tail(f, all_lines: bool = False) -> str:
    f.seek(0)
    text = f.read().decode(errors="replace").strip()
    return text if all_lines else " ".join(text.splitlines()[-1:])


def _close_quietly(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
        proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def rollback(remote: Remote, dest: str = DEFAULT_DEST, to: str | None = None) -> dict:
    """Switch `current` back to the previous release in the history (or to release `to`). Returns
    {"host", "from", "to"}. Successive rollbacks walk further back."""
    with DeviceLock(remote, dest) as lock:
        return _rollback_locked(remote, dest, to, lock)


def _rollback_locked(remote: Remote, dest: str, to: str | None, lock: DeviceLock) -> dict:
    state = device_state(remote, dest)
    cur = state["current"]
    if to is not None:
        _check_id(to)
        if to not in state["releases"]:
            raise RemoteError(f"{remote.spec}: release '{to}' is not on the device",
                              f"releases there: {', '.join(state['releases']) or 'none'}")
        history = [h for h in state["history"] if h != to] + [to]
    else:
        history = list(state["history"])
        while history and history[-1] == cur:
            history.pop()
        history = [h for h in history if h in state["releases"]]
        if not history:
            raise RemoteError(f"{remote.spec}: no earlier release to roll back to (active: {cur or 'none'})",
                              "push the release you want, or pass --to ID")
        to = history[-1]
    # verify the release before switching to it: a rollback onto damaged weights is worse than none
    r = remote.run(f"""{lock.held}cd releases/{to} 2>/dev/null && [ -f SHA256SUMS ] || exit 43
sha256sum -c --quiet SHA256SUMS >/dev/null 2>&1 || exit 43
cd ../..
set -e
ln -sfn releases/{to} .current.tmp.$$
mv -T .current.tmp.$$ current
printf '%s\\n' {" ".join(shlex.quote(h) for h in history)} > .history.tmp.$$ && mv .history.tmp.$$ .history""",
                   check=False)
    if r.returncode == 43:
        raise ValidationFailed(f"{remote.spec}: release {to} on the device does not match its SHA256SUMS (damaged); "
                               "`current` was NOT switched", f"push that bundle again, or roll back to another "
                               f"release with --to (there: {', '.join(state['releases'])})")
    if r.returncode != 0:
        raise ssh_error(remote.spec, r.returncode, r.stderr.decode(errors="replace"))
    return {"host": remote.spec, "from": cur, "to": to}


def for_each_host(hosts, fn, max_workers: int = 8) -> list:
    """Run fn(host) for every host in parallel; one host's failure becomes its (host, None, error) row and the
    others carry on. Returns [(host, result, error_text)] in the order given."""
    def one(h):
        try:
            return h, fn(h), None
        except EdgepackError as exc:
            return h, None, exc.one_line()
        except Exception as exc:  # a bug or an OS error on one host must not stop the others
            return h, None, f"{type(exc).__name__}: {exc}"

    interrupted.clear()
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(hosts)))) as ex:
        futures = [ex.submit(one, h) for h in hosts]
        try:
            while not all(f.done() for f in futures):  # a timed wait: Ctrl-C is seen here within 0.2 s
                wait(futures, timeout=0.2)
        except KeyboardInterrupt:
            interrupted.set()  # running pushes stop before activation; the pool then waits for them to wind down
            for f in futures:
                f.cancel()
            raise
        return [f.result() for f in futures]


def _sha(path: Path) -> str:
    from edgepack.artifact import sha256_file

    return sha256_file(path)


def read_remote_json(remote: Remote, dest: str, rel_path: str) -> dict:
    out = remote.run(f"cat {dest_sh(dest)}/{shlex.quote(rel_path)}").stdout
    try:
        return json.load(io.BytesIO(out))
    except json.JSONDecodeError as exc:
        raise RemoteError(f"{remote.spec}: {rel_path} on the device is not valid JSON ({exc})",
                          "push the bundle again") from None
