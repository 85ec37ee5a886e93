"""Click commands: bundle, push, rollback, remote (prepare | bench | status). No torch at import time."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgepack.cli.common import config_from, config_option, force_opt, json_opt
from edgepack.deploy.bundle import BundleConfig
from edgepack.output import emit_json, fmt_bytes, print_table


def ssh_options(f):
    """SSH options shared by every command that talks to a device."""
    opts = [
        click.option("--dest", default="edgepack", show_default=True,
                     help="Install directory on the device (relative paths are under the login user's home)."),
        click.option("--ssh-config", type=click.Path(dir_okay=False),
                     help="Use this SSH config file instead of ~/.ssh/config (ssh -F)."),
        click.option("-i", "--identity", type=click.Path(dir_okay=False),
                     help="Private key to offer in addition to the agent's and the config's (ssh -i)."),
        click.option("--accept-new-host-key", is_flag=True,
                     help="Trust a host whose key is not yet in known_hosts and record it (never a changed key)."),
        click.option("--connect-timeout", default=10, show_default=True, help="Seconds to wait for a connection."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _ssh(ssh_config, identity, accept_new_host_key, connect_timeout):
    from edgepack.deploy.ship import SSHOptions

    return SSHOptions(ssh_config=ssh_config, identity=identity, accept_new_host_key=accept_new_host_key,
                      connect_timeout=connect_timeout)


# ------------------------------------------------------------------------------------------------------ bundle
@click.command("bundle")
@click.argument("artifact", type=click.Path())
@click.option("--target", "target_name", required=True, help="Target the bundle is for (name, 'local' or TOML path).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Bundle directory, or a file ending in .tar.")
@config_option(BundleConfig, "runtime", help="Runtime to run it with [default: the artifact's own].")
@config_option(BundleConfig, "tokenizer", type=click.Path(file_okay=False), help="Tokenizer directory when the artifact has none.")
@config_option(BundleConfig, "device_dir", help="Where the bundle will live on the device.")
@config_option(BundleConfig, "port", help="Port of the serve service unit (binds 127.0.0.1).")
@config_option(BundleConfig, "max_tokens_cap", help="Largest max_tokens the server accepts.")
@force_opt
@json_opt
def bundle_cmd(artifact, target_name, output, force, as_json, **settings):
    """Package ARTIFACT for one target: model, tokenizer, runtime config, manifest, requirements, README, service."""
    import json
    import tarfile

    from edgepack.deploy.bundle import make_bundle, verify_bundle
    from edgepack.targets import load_target

    cfg = config_from(BundleConfig, settings, "bundle")
    out = make_bundle(artifact, load_target(target_name), Path(output), cfg, force=force)
    if out.is_dir():
        m = verify_bundle(out)
    else:
        with tarfile.open(out) as tf:
            m = json.load(tf.extractfile("bundle.json"))
    size = sum(f["bytes"] for f in m["files"].values())
    if as_json:
        emit_json({"path": str(out), "bundle_id": m["bundle_id"], "target": m["target"]["name"], "runtime": m["runtime"],
                   "precision": m["precision"], "bytes": size, "files": len(m["files"]), "requirements": m["requirements"]})
        return
    print_table(f"bundle {m['bundle_id']} -> {out}", ["target", "runtime", "precision", "files", "size", "lineage"],
                [[m["target"]["name"], m["runtime"], m["precision"] or "-", str(len(m["files"])), fmt_bytes(size),
                  " -> ".join(r["stage"] for r in m["artifact"]["lineage"]) or "(checkpoint)"]],
                caption="push it with: edgepack push " + str(out) + " HOST")


# -------------------------------------------------------------------------------------------------------- push
@click.command("push")
@click.argument("bundle", type=click.Path())
@click.argument("hosts", nargs=-1, required=True)
@ssh_options
@click.option("--keep", default=3, show_default=True, help="Releases kept on each device (the active one always is).")
@json_opt
def push_cmd(bundle, hosts, dest, ssh_config, identity, accept_new_host_key, connect_timeout, keep, as_json):
    """Send BUNDLE to one or more HOSTS ([user@]host[:port] or ~/.ssh/config aliases), in parallel.

    Files a device already has (same sha256) are not sent again, so an interrupted push resumes. Each release is
    verified on the device before `current` switches to it; one failing host does not stop the others."""
    import tempfile

    from edgepack.deploy.bundle import open_bundle, read_bundle_manifest
    from edgepack.deploy.ship import Remote, for_each_host, push_bundle

    opts = _ssh(ssh_config, identity, accept_new_host_key, connect_timeout)
    with tempfile.TemporaryDirectory(prefix="edgepack-push-") as tmp:
        root = open_bundle(bundle, tmp)  # verified (and safely unpacked, for a .tar) before anything is sent
        manifest = read_bundle_manifest(root)

        def push_one(h):
            def progress(name, nbytes):
                if not as_json:
                    click.echo(f"  {h}: sent {name} ({fmt_bytes(nbytes)})", err=True)

            with Remote(h, opts) as r:
                return push_bundle(root, r, dest, keep, on_file=progress, manifest=manifest)

        rows = for_each_host(list(hosts), push_one)
    _summary("push", rows, as_json, lambda r: [r.bundle_id, str(r.files_sent), fmt_bytes(r.bytes_sent),
                                               str(r.files_reused), "(already active)" if r.already_active
                                               else r.previous or "-", f"{r.seconds:.1f}"],
             ["bundle", "sent", "bytes", "reused", "previous", "seconds"])


@click.command("rollback")
@click.argument("hosts", nargs=-1, required=True)
@click.option("--to", "to", help="Release id to switch to [default: the one active before the current one].")
@ssh_options
@json_opt
def rollback_cmd(hosts, to, dest, ssh_config, identity, accept_new_host_key, connect_timeout, as_json):
    """Switch each HOST's `current` back to its previous release (atomically)."""
    from edgepack.deploy.ship import Remote, for_each_host, rollback

    opts = _ssh(ssh_config, identity, accept_new_host_key, connect_timeout)

    def one(h):
        with Remote(h, opts) as r:
            return rollback(r, dest, to)

    _summary("rollback", for_each_host(list(hosts), one), as_json, lambda r: [r["from"] or "-", r["to"]], ["from", "to"])


def _summary(what, rows, as_json, cells, columns):
    """One row per host, errors included; exit status 1 when any host failed (after printing every host)."""
    from dataclasses import asdict, is_dataclass

    failed = [h for h, _, err in rows if err]
    if as_json:
        emit_json({"command": what, "ok": not failed, "hosts": [
            {"host": h, "ok": err is None, "error": err,
             "result": asdict(res) if is_dataclass(res) else res} for h, res, err in rows]})
    else:
        table = [[h, "ok" if err is None else "FAILED", *(cells(res) if err is None else ["-"] * len(columns)),
                  err or ""] for h, res, err in rows]
        print_table(f"{what}: {len(rows) - len(failed)} of {len(rows)} host(s) ok", ["host", "status", *columns, "error"],
                    table)
    if failed:
        sys.exit(1)


# ------------------------------------------------------------------------------------------------------ remote
@click.group("remote")
def remote_group():
    """Run commands on devices over SSH: status, prepare (install, build engines), bench."""


@remote_group.command("status")
@click.argument("hosts", nargs=-1, required=True)
@click.option("--verify", is_flag=True, help="Check every file of the active release against its sha256.")
@ssh_options
@json_opt
def status_cmd(hosts, verify, dest, ssh_config, identity, accept_new_host_key, connect_timeout, as_json):
    """Active release, releases kept, and (--verify) whether the active files are intact."""
    from edgepack.deploy.remote import remote_status
    from edgepack.deploy.ship import Remote, for_each_host

    opts = _ssh(ssh_config, identity, accept_new_host_key, connect_timeout)

    def one(h):
        with Remote(h, opts) as r:
            return remote_status(r, dest, verify)

    rows = for_each_host(list(hosts), one)
    bad = [(h, res) for h, res, err in rows if err is None and res["verified"] is False]
    if as_json:
        emit_json({"command": "status", "hosts": [{"host": h, "error": err, "status": res} for h, res, err in rows]})
    else:
        print_table(f"remote status ({dest})", ["host", "active", "target", "runtime", "releases", "verified", "error"],
                    [[h, res["current"] or "-", (res["bundle"] or {}).get("target") or "-",
                      (res["bundle"] or {}).get("runtime") or "-", str(len(res["releases"])),
                      {None: "-", True: "ok"}.get(res["verified"], "DAMAGED: " + ", ".join(res["mismatched"][:3])), ""]
                     if err is None else [h, "-", "-", "-", "-", "-", err] for h, res, err in rows])
    if bad or any(err for _, _, err in rows):
        sys.exit(1)


remote_edgepack_opt = click.option("--remote-edgepack", help="edgepack on the device [default: DEST/venv/bin/edgepack].")


@remote_group.command("prepare")
@click.argument("hosts", nargs=-1, required=True)
@click.option("--remote-python", help="Python on the device to install into [default: create DEST/venv].")
@remote_edgepack_opt
@click.option("--no-install", is_flag=True, help="Do not pip install the bundle's requirements.")
@ssh_options
@json_opt
def prepare_cmd(hosts, remote_python, remote_edgepack, no_install, dest, ssh_config, identity, accept_new_host_key,
                connect_timeout, as_json):
    """Make each device ready for its active bundle: environment, requirements, engine build where needed."""
    from edgepack.deploy.remote import remote_prepare
    from edgepack.deploy.ship import Remote, for_each_host

    opts = _ssh(ssh_config, identity, accept_new_host_key, connect_timeout)

    def one(h):
        with Remote(h, opts) as r:
            return remote_prepare(r, dest, remote_python=remote_python, remote_edgepack=remote_edgepack,
                                  install=not no_install)

    _summary("prepare", for_each_host(list(hosts), one), as_json,
             lambda r: [r["bundle_id"], "; ".join(f"{s[0]}: {s[1]}" for s in r["steps"])], ["bundle", "steps"])


@remote_group.command("bench")
@click.argument("hosts", nargs=-1, required=True)
@remote_edgepack_opt
@click.option("--bench-args", default="", help="Extra arguments for the device's 'edgepack bench' (one quoted string).")
@click.option("--results", "results_dir", default="edgepack-results/remote", show_default=True, type=click.Path(),
              help="Local directory the JSON records are saved to.")
@ssh_options
@json_opt
def bench_cmd(hosts, remote_edgepack, bench_args, results_dir, dest, ssh_config, identity, accept_new_host_key,
              connect_timeout, as_json):
    """Run 'edgepack bench' on each device against its active bundle and bring the JSON records back."""
    from edgepack.deploy.remote import remote_bench
    from edgepack.deploy.ship import Remote, for_each_host

    opts = _ssh(ssh_config, identity, accept_new_host_key, connect_timeout)

    def one(h):
        with Remote(h, opts) as r:
            return remote_bench(r, dest, remote_edgepack=remote_edgepack, bench_args=bench_args,
                                results_dir=Path(results_dir))

    _summary("remote bench", for_each_host(list(hosts), one), as_json,
             lambda r: [r["remote"]["bundle_id"], _bench_headline(r), r["remote"].get("saved_to", "-")],
             ["bundle", "result", "saved to"])


def _bench_headline(record: dict) -> str:
    """The decode / TTFT numbers of a bench record, wherever its schema keeps them."""
    found = {}

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if isinstance(v, (int, float)) and any(s in k for s in ("tokens_per_s", "ttft")) and k not in found:
                    found[k] = v
                walk(v)
        elif isinstance(x, list):
            for v in x[:1]:
                walk(v)

    walk({k: v for k, v in record.items() if k != "remote"})
    return ", ".join(f"{k} {v:.4g}" for k, v in list(found.items())[:3]) or "(see JSON)"
