"""What `edgepack device prepare BUNDLE` does: run ON the device (by hand, or by `edgepack remote prepare` over SSH).

For a bundle whose runtime is tensorrt and whose target builds engines on the device (Jetson), it builds the engine
from the bundle's ONNX + trt_build.json into BUNDLE/engine-cache (keyed by TensorRT version and SM; a cached one is
reused). For every other bundle it checks that what the runtime imports is importable here and that the GPU is
what the bundle was made for, so a missing package shows up now rather than at the first request.
No torch import at module import time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgepack.errors import MissingDependency, UnsupportedOnTarget
from edgepack.formats import RUNTIMES


def prepare_bundle(bundle: Path) -> dict:
    """Make this machine ready to run `bundle` (a bundle directory: a release on the device). Returns a report."""
    from edgepack.deploy.bundle import read_bundle_manifest

    bundle = Path(bundle).absolute()
    m = read_bundle_manifest(bundle)
    runtime, target = m.get("runtime"), m.get("target") or {}
    steps = []
    needs = list(RUNTIMES[runtime].modules if runtime in RUNTIMES else ())
    if runtime == "tensorrt":  # the build checks tensorrt (naming the install and the trtexec line) and the SM
        return {"bundle": str(bundle), "bundle_id": m["bundle_id"], "runtime": runtime,
                "steps": [build_bundle_engine(bundle)]}
    for module, extra in needs:
        if importlib.util.find_spec(module) is None:
            raise MissingDependency(module, extra or "serve", f"runtime '{runtime}' of bundle {m['bundle_id']}")
        steps.append(["import", module, "ok"])
    if target.get("sm") is not None and runtime == "torch-cuda":
        from edgepack.targets.profile import local_cuda_sm

        sm = local_cuda_sm()
        if sm is None:
            raise UnsupportedOnTarget(f"bundle {m['bundle_id']} runs on CUDA ({runtime}), but torch sees no CUDA GPU "
                                      "here", "install a CUDA build of torch (on Jetson: NVIDIA's JetPack wheel)")
        if sm != target["sm"]:
            raise UnsupportedOnTarget(f"bundle {m['bundle_id']} was made for sm_{target['sm']} "
                                      f"({target.get('name')}), this GPU is sm_{sm}", "bundle for this device's target")
        steps.append(["gpu", f"sm_{sm}", "matches the target"])
    return {"bundle": str(bundle), "bundle_id": m["bundle_id"], "runtime": runtime, "steps": steps}


def build_bundle_engine(bundle: Path) -> list:
    from edgepack.deploy import trt_spec
    from edgepack.deploy.tensorrt_build import build_engine
    from edgepack.deploy.tensorrt_runtime import ENGINE_CACHE_DIR

    art = bundle / "artifact"
    spec = trt_spec.read_spec(art)
    info = build_engine(art, spec, bundle / ENGINE_CACHE_DIR)
    what = "cached" if info["cached"] else f"built in {info['build_seconds']} s"
    peak = info.get("peak_host_mem_used_bytes")
    return ["tensorrt engine", what, f"{ENGINE_CACHE_DIR}/{info['engine']} (TensorRT {info['trt_version']}, "
            f"sm_{info['sm']}" + (f", build used {peak / 2**20:.0f} MiB" if peak else "") + ")"]
