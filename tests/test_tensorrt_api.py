"""Every TensorRT name the build and runtime code uses exists in TensorRT 10.3 (JetPack 6.1 / 6.2), 10.16 (JetPack 7,
x86) and 11.4 (issue 14). tensorrt cannot be installed here: the code is parsed (ast, nothing imported) and each
`trt.X`, `trt.X.Y` and method / attribute on a TensorRT object is looked up in the real API listings of the
bindings wheels in ../shared/data/tensorrt-api/. Dynamic lookups (getattr on a TensorRT object) cannot be checked
this way and are refused: TensorRT 11 removed BuilderFlag.FP16 / INT8 / INT4, which such a lookup once built."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT.parent / "shared" / "data" / "tensorrt-api"
VERSIONS = ("10.3.0", "10.16.1.11", "11.4.0.106")
# file -> the variables that hold TensorRT objects there -> their class in the listings
FILES = {"deploy/tensorrt_build.py": {"builder": "Builder", "config": "IBuilderConfig", "network": "INetworkDefinition",
                                     "parser": "OnnxParser", "profile": "IOptimizationProfile", "timing": "ITimingCache",
                                     "plan": "IHostMemory"},
         "deploy/tensorrt_runtime.py": {"engine": "ICudaEngine", "ctx": "IExecutionContext", "_rt": "Runtime"}}


def _api(version: str) -> dict:
    p = API_DIR / f"api-{version}.json"
    if not p.is_file():
        pytest.skip(f"{p} is not here (../shared/data/tensorrt-api)")
    return json.loads(p.read_text())


def _owner(node: ast.expr) -> str | None:
    """'trt' / an OBJECTS variable for `trt`, `x`, `self.x`; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def uses(source: str, objects: dict) -> tuple[set[tuple[str, ...]], list[str]]:
    """({('module', X) | (Class, member)}, [dynamic lookups]) for TensorRT names used in `source`; `objects` maps
    variable names to TensorRT classes."""
    found, dynamic = set(), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            owner = _owner(node.value)
            if owner in ("trt", "self.trt") or (isinstance(node.value, ast.Attribute) and node.value.attr == "trt"):
                found.add(("module", node.attr))
            elif owner in objects:
                found.add((objects[owner], node.attr))
            elif isinstance(node.value, ast.Attribute) and _owner(node.value.value) in ("trt",):
                found.add((node.value.attr, node.attr))  # trt.X.Y
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and node.args:
            target = node.args[0]
            base = target.value if isinstance(target, ast.Attribute) else target
            if _owner(base) == "trt" or _owner(target) in objects:
                dynamic.append(ast.unparse(node))
    return found, dynamic


def test_parser_sees_chains_objects_and_dynamic_lookups():
    src = ("net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))\n"
           "self.ctx.set_input_shape('x', (1,))\nconfig.set_flag(getattr(trt.BuilderFlag, flag))\n")
    found, dynamic = uses(src, {**FILES["deploy/tensorrt_build.py"], **FILES["deploy/tensorrt_runtime.py"]})
    assert {("module", "NetworkDefinitionCreationFlag"), ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED"),
            ("Builder", "create_network"), ("IExecutionContext", "set_input_shape")} <= found
    assert dynamic == ["getattr(trt.BuilderFlag, flag)"]
    api = _api("11.4.0.106")
    assert "FP16" not in api["BuilderFlag"] and "STRONGLY_TYPED" in api["NetworkDefinitionCreationFlag"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_tensorrt_name_the_code_uses_exists(version):
    api = _api(version)
    missing, dynamic, seen = [], [], 0
    for rel, objects in FILES.items():
        found, dyn = uses((ROOT / rel).read_text(), objects)
        dynamic += [f"{rel}: {d}" for d in dyn]
        for cls, name in sorted(found):
            if cls == "module":
                ok = name in api["module"] or name in api or name == "__version__"
            elif cls in api:
                ok = name in api[cls] or (name in ("WARNING", "ERROR") and cls == "Logger")
            else:  # a nested enum (trt.Logger.WARNING is Logger.Severity's)
                ok = False
            seen += 1
            if not ok:
                missing.append(f"{rel}: {cls}.{name}")
    assert seen > 25  # the parser really read the build and runtime code
    assert not dynamic, "dynamic TensorRT lookups cannot be checked against the API listings:\n" + "\n".join(dynamic)
    assert not missing, f"not in TensorRT {version}:\n" + "\n".join(missing)


def test_tensorrt_older_than_10_is_refused_naming_the_jetpack_upgrade():
    from edgepack.deploy.tensorrt_build import check_trt_version
    from edgepack.errors import UnsupportedOnTarget

    with pytest.raises(UnsupportedOnTarget, match=r"TensorRT 8\.6\.2 is too old.*JetPack 6\.0 ships") as e:
        check_trt_version("8.6.2")  # JetPack 6.0 GA
    assert "JetPack 6.1 or later" in e.value.hint
    for ok in VERSIONS:
        check_trt_version(ok)
