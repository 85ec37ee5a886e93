"""Packaging guards: every sub-package ships in the wheel, and nothing heavy loads on import or --help."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib
from conftest import ROOT

STAGE_DIRS = {"edgepack": "edgepack", "tune": "edgepack.tune", "compress": "edgepack.compress",
              "deploy": "edgepack.deploy", "targets": "edgepack.targets", "bench": "edgepack.bench"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_on_disk() -> set[str]:
    found = set()
    for folder, pkg in STAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([pkg, *rel.parts]))
    return found


def test_every_subpackage_is_listed_for_the_wheel():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    missing = _packages_on_disk() - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_stage_folders_are_mapped_into_the_package():
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    for folder, pkg in STAGE_DIRS.items():
        assert mapping[pkg] == folder


def test_wheel_contains_modules_profiles_and_demo_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("edgepack-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pkg in STAGE_DIRS.items():
        for py in (ROOT / folder).rglob("*.py"):
            rel = py.relative_to(ROOT / folder)
            assert "/".join([*pkg.split("."), *rel.parts]) in names, f"{py} missing from the wheel"
    for toml in (ROOT / "targets" / "profiles").glob("*.toml"):
        assert f"edgepack/targets/profiles/{toml.name}" in names
    assert "edgepack/data/stories260K/model.safetensors" in names
    assert "edgepack/data/demo.toml" in names


LEAN_CHECK = r"""
import sys
from click.testing import CliRunner
import edgepack
assert "torch" not in sys.modules, "import edgepack imported torch"
from edgepack.cli import COMMANDS, cli
r = CliRunner().invoke(cli, ["--help"])
assert r.exit_code == 0, r.output
for name in COMMANDS:
    r = CliRunner().invoke(cli, [name, "--help"])
    assert r.exit_code == 0, (name, r.output)
heavy = sorted(m for m in ("torch", "transformers", "onnx", "onnxruntime", "peft", "bitsandbytes", "torchao",
                           "fastapi", "matplotlib") if m in sys.modules)
assert not heavy, f"--help imported {heavy}"
print("lean ok")
"""


def test_import_and_help_import_no_torch():
    out = subprocess.run([sys.executable, "-c", LEAN_CHECK], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "lean ok" in out.stdout


def test_console_script_help_runs():
    exe = Path(sys.executable).parent / "edgepack"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "targets" in out.stdout and "fit" in out.stdout
