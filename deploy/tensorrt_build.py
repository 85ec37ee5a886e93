"""Build a TensorRT engine from an exported decoder (ONNX + trt_build.json) with the TensorRT 10 Python API, and
keep it in an engine cache.

Engines only run with the TensorRT version and on the GPU architecture that built them, so the cache file name is
`trt<version>-sm<SM>-<module>-<16 hex of the ONNX digest>.engine` (module: SM count and memory of this device), with a JSON sidecar saying what built it. Loading an
engine whose sidecar names another TensorRT version or SM is refused with the way out (`edgepack device prepare`),
never attempted: deserializing a foreign plan fails deep inside TensorRT or, worse, runs the wrong kernels.

On Jetson the builder shares DRAM with the OS: the build refuses to start when /proc/meminfo's MemAvailable is
below the spec's build memory (workspace + parsed weights, builder copies and plan), and a thread samples MemAvailable during the build to record the
peak memory used (the figure to size `usable_memory_gib` against).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from edgepack.deploy import trt_spec
from edgepack.errors import ArtifactError, MissingDependency, UnsupportedOnTarget, ValidationFailed
from edgepack.targets.fit import BUILD_WEIGHT_COPIES

MEMINFO = Path("/proc/meminfo")


def install_hint(spec: dict, onnx_path: Path, engine_path: Path) -> str:
    return ("pip install tensorrt (x86-64 with CUDA 12), or on Jetson install JetPack's TensorRT (sudo apt install "
            "python3-libnvinfer; create the venv with --system-site-packages). Without the Python bindings, build "
            f"the same engine with: {trt_spec.trtexec_command(spec, onnx_path, engine_path)}")


def require_tensorrt(spec: dict, onnx_path: Path, engine_path: Path):
    try:
        import tensorrt as trt
    except ImportError:
        err = MissingDependency("tensorrt", "tensorrt", "building the TensorRT engine")
        err.hint = install_hint(spec, onnx_path, engine_path)
        raise err from None
    check_trt_version(trt.__version__)
    return trt


def check_trt_version(version: str) -> None:
    """Strongly typed networks and INT4 blocked DequantizeLinear need TensorRT 10; JetPack 6.0 ships 8.6.2."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = 0
    if major < trt_spec.MIN_TRT_MAJOR:
        raise UnsupportedOnTarget(
            f"TensorRT {version} is too old: edgepack builds strongly typed networks (INT4 / INT8 weights as "
            f"DequantizeLinear), which need TensorRT {trt_spec.MIN_TRT_MAJOR} or later (JetPack 6.0 ships TensorRT "
            "8.6.2)", "upgrade the device to JetPack 6.1 or later (TensorRT 10.3; JetPack 7 has TensorRT 10.x)")


def local_sm() -> int:
    from edgepack.targets.profile import local_cuda_sm

    sm = local_cuda_sm()
    if sm is None:
        raise UnsupportedOnTarget("building or running a TensorRT engine needs a CUDA GPU, and torch sees none here",
                                  "run this on the device (the engine is built for the GPU it runs on)")
    return sm


# ------------------------------------------------------------------------------------------------ engine cache
def engine_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return Path(cache_dir) / f"{key}.engine", Path(cache_dir) / f"{key}.json"


def local_module() -> str:
    """The device module as the engine cache key names it: SM count and memory, which tell apart the modules that
    share an SM (Orin Nano 4GB / 8GB, Orin NX 8GB / 16GB, AGX Orin 32GB / 64GB)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return f"{props.multi_processor_count}sms-{round(props.total_memory / 2**30)}gib"


def find_engine(cache_dir: Path, onnx_sha256: str, trt_version: str, sm: int, module: str) -> Path | None:
    """The cached engine for this graph, TensorRT version, SM and device module; None when there is none for this
    graph at all. Raises UnsupportedOnTarget when engines for this graph exist but were built by another TensorRT,
    for another GPU architecture or on another module."""
    engine, meta = engine_paths(cache_dir, trt_spec.engine_key(trt_version, sm, onnx_sha256, module))
    if engine.is_file() and meta.is_file():
        check_engine_meta(json.loads(meta.read_text()), trt_version, sm, onnx_sha256, engine, module)
        return engine
    others = []
    for p in sorted(Path(cache_dir).glob("*.json")) if Path(cache_dir).is_dir() else []:
        try:
            m = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if m.get("onnx_sha256") == onnx_sha256:
            others.append(m)
    if others:
        m = others[0]
        raise UnsupportedOnTarget(
            f"the cached TensorRT engine in '{cache_dir}' was built with TensorRT {m.get('trt_version')} for "
            f"sm_{m.get('sm')} ({m.get('module')}); this machine has TensorRT {trt_version} and an sm_{sm} GPU "
            f"({module}), and engines only run where they were built", "rebuild it here: edgepack device prepare BUNDLE")
    return None


def check_engine_meta(meta: dict, trt_version: str, sm: int, onnx_sha256: str, engine: Path, module: str) -> None:
    if meta.get("trt_version") != trt_version or int(meta.get("sm", -1)) != sm or meta.get("module") != module:
        raise UnsupportedOnTarget(
            f"engine '{engine.name}' was built with TensorRT {meta.get('trt_version')} for sm_{meta.get('sm')} "
            f"({meta.get('module')}), but this machine has TensorRT {trt_version} and an sm_{sm} GPU ({module})",
            "rebuild it: edgepack device prepare BUNDLE")
    if meta.get("onnx_sha256") != onnx_sha256:
        raise ArtifactError(f"engine '{engine.name}' was built from another ONNX graph", "rebuild it")
    size = engine.stat().st_size
    if meta.get("engine_bytes") is not None and int(meta["engine_bytes"]) != size:
        raise ArtifactError(f"engine '{engine.name}' is {size} bytes, its record says {meta['engine_bytes']} "
                            "(a partial write?)", "delete it and rebuild: edgepack device prepare BUNDLE")


# ------------------------------------------------------------------------------------------------ memory watch
def mem_available_bytes(text: str | None = None) -> int | None:
    from edgepack.bench.memory import parse_meminfo

    if text is None:
        if not MEMINFO.is_file():
            return None
        text = MEMINFO.read_text()
    return parse_meminfo(text).get("MemAvailable")


def check_memory(spec: dict, available: int | None) -> None:
    """Refuse a build that cannot fit: the builder holds the parsed weights, its own copies (on Jetson in the same
    DRAM), the plan being written and its workspace (trt_spec: build_memory_bytes)."""
    need = int(spec["build_memory_bytes"])
    if available is not None and available < need:
        raise UnsupportedOnTarget(
            f"only {available / 2**20:.0f} MiB of memory is available (MemAvailable) and the engine build needs about "
            f"{need / 2**20:.0f} MiB (workspace {spec['workspace_bytes'] / 2**20:.0f} MiB + "
            f"{BUILD_WEIGHT_COPIES} x the graph's {spec['engine_estimate_bytes'] / 2**20:.0f} MiB: parsed "
            "network, builder copies, plan)",
            "stop other services (serve, desktop), or lower workspace_bytes in trt_build.json")


class MemWatch:
    """Samples MemAvailable every interval_s in a thread; `peak_used_bytes` = start - lowest available."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.start, self.lowest = interval_s, mem_available_bytes(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            a = mem_available_bytes()
            if a is not None:
                self.lowest = a if self.lowest is None else min(self.lowest, a)

    def __enter__(self) -> MemWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_used_bytes(self) -> int | None:
        return None if self.start is None or self.lowest is None else max(0, self.start - self.lowest)


# ------------------------------------------------------------------------------------------------ build
def build_engine(onnx_dir: Path, spec: dict, cache_dir: Path) -> dict:
    """Build (or find cached) the engine for `spec` in cache_dir. Returns the engine record."""
    onnx_path = Path(onnx_dir) / spec["onnx"]
    cache_dir = Path(cache_dir)
    trt = require_tensorrt(spec, onnx_path, cache_dir / "model.engine")
    sm = local_sm()
    if spec.get("sm") is not None and int(spec["sm"]) != sm:
        raise UnsupportedOnTarget(f"the build spec is for sm_{spec['sm']} (target {spec.get('target')}), this GPU is "
                                  f"sm_{sm}", "compile and bundle the model for this device's target")
    digest = trt_spec.onnx_digest(onnx_path)
    if digest != spec["onnx_sha256"]:
        raise ArtifactError(f"'{onnx_path}' does not match its build spec (sha256 {digest[:12]} vs "
                            f"{spec['onnx_sha256'][:12]})", "re-bundle the compiled artifact; do not edit it")
    module = local_module()
    found = find_engine(cache_dir, digest, trt.__version__, sm, module)
    if found is not None:
        return {**json.loads(engine_paths(cache_dir, found.stem)[1].read_text()), "cached": True}
    check_memory(spec, mem_available_bytes())
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: every tensor's type comes from the graph (fp16, INT4 / INT8 DequantizeLinear weights, the fp32
    # RMSNorm / softmax islands); TensorRT 11 has no other mode, and explicit batch is the only one since 10
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads the external data file next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValidationFailed(f"TensorRT's ONNX parser rejected '{onnx_path.name}': {errors}",
                               "check the TensorRT version supports the export's opset (JetPack 6.1 / 6.2: 10.3)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec["workspace_bytes"]))
    for prof in spec["profiles"]:
        profile = builder.create_optimization_profile()
        for name, s in prof["shapes"].items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    timing_path = cache_dir / f"{spec['timing_cache']}.trt{trt.__version__}-sm{sm}"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, False)
    t0 = time.perf_counter()
    with MemWatch() as watch:
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ValidationFailed("TensorRT could not build the engine (see its log above)",
                               "try --precision fp32, a smaller --max-context, or a larger workspace")
    key = trt_spec.engine_key(trt.__version__, sm, digest, module)
    engine, meta = engine_paths(cache_dir, key)
    _atomic_write(engine, memoryview(plan))
    _atomic_write(timing_path, memoryview(config.get_timing_cache().serialize()))
    record = {"trt_version": trt.__version__, "sm": sm, "module": module, "onnx_sha256": digest, "engine": engine.name,
              "engine_bytes": engine.stat().st_size, "precision": spec["precision"], "strongly_typed": True,
              "build_seconds": round(time.perf_counter() - t0, 1), "peak_host_mem_used_bytes": watch.peak_used_bytes,
              "mem_available_at_start_bytes": watch.start, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _atomic_write(meta, (json.dumps(record, indent=1) + "\n").encode())
    return {**record, "cached": False}


def _atomic_write(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
