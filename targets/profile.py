"""Load target profiles: the packaged TOML files, a user's own TOML path, or `local` (this machine, measured)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import tomllib

from edgepack.errors import ConfigError, did_you_mean
from edgepack.formats import PRECISIONS, PROFILE_RUNTIMES

GIB = 1024**3
DEVICE_TYPES = ("gpu", "jetson", "cpu")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    device_type: str  # gpu | jetson | cpu
    arch: str
    memory_bytes: int
    usable_memory_bytes: int  # what a model may use: Jetson memory is shared with the OS and the CPU side
    bandwidth_bytes_per_s: float  # DRAM/HBM bandwidth, the decode roofline's denominator
    precisions: tuple[str, ...]
    runtimes: tuple[str, ...]  # in order of preference
    engine_build: str = "host"  # host | device: where TensorRT engines must be built
    sm: int | None = None  # CUDA compute capability x10 (90 = sm_90); None for CPUs
    isa: str | None = None
    unified_memory: bool = False
    features: tuple[str, ...] = ()
    power_modes: tuple[str, ...] = ()
    peak_tflops: dict = field(default_factory=dict, hash=False)
    sources: dict = field(default_factory=dict, hash=False)
    measured: dict = field(default_factory=dict, hash=False)  # for `local`: what was measured, how
    path: str | None = None
    device_names: tuple[str, ...] = ()  # CUDA device names (torch.cuda.get_device_name) this profile describes
    software: dict = field(default_factory=dict, hash=False)  # Jetson: jetpack / l4t / tensorrt / cuda versions
    bandwidth_modes: dict = field(default_factory=dict, hash=False)  # power mode -> GB/s where it changes bandwidth

    def supports(self, precision: str | None = None, runtime: str | None = None, feature: str | None = None) -> bool:
        return ((precision is None or precision in self.precisions)
                and (runtime is None or runtime in self.runtimes)
                and (feature is None or feature in self.features))

    @property
    def has_cuda(self) -> bool:
        return self.sm is not None

    def preferred_runtime(self, available: set[str] | None = None) -> str:
        """The first runtime in the profile's order that is `available` (all, if None)."""
        for rt in self.runtimes:
            if available is None or rt in available:
                return rt
        raise ConfigError(f"target '{self.name}' has none of its runtimes ({', '.join(self.runtimes)}) available",
                          "install one of them, e.g. pip install 'edgepack[onnx]'")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


_KEYS = {"name", "description", "device_type", "arch", "sm", "isa", "memory_gib", "usable_memory_gib",
         "bandwidth_gb_s", "unified_memory", "precisions", "runtimes", "engine_build", "features", "power_modes",
         "peak_tflops", "sources", "device_names", "software", "bandwidth_modes"}
_REQUIRED = ("name", "device_type", "arch", "memory_gib", "usable_memory_gib", "bandwidth_gb_s", "precisions",
             "runtimes")


def _profiles_dir():
    return resources.files("edgepack.targets").joinpath("profiles")


def list_targets() -> list[str]:
    """Names of the packaged profiles, sorted, plus 'local'."""
    names = sorted(p.name[:-5] for p in _profiles_dir().iterdir() if p.name.endswith(".toml"))
    return names + ["local"]


def target_from_dict(data: dict, where: str) -> Target:
    problems = [f"unknown key '{k}'{did_you_mean(k, _KEYS)}" for k in data if k not in _KEYS]
    problems += [f"missing key '{k}'" for k in _REQUIRED if k not in data]
    if not problems:
        if data["device_type"] not in DEVICE_TYPES:
            problems.append(f"device_type must be one of {', '.join(DEVICE_TYPES)}")
        problems += [f"unknown precision '{p}'{did_you_mean(p, PRECISIONS)}" for p in data["precisions"] if p not in PRECISIONS]
        problems += [f"unknown runtime '{r}'{did_you_mean(r, PROFILE_RUNTIMES)}" for r in data["runtimes"]
                     if r not in PROFILE_RUNTIMES]
        if data.get("engine_build", "host") not in ("host", "device"):
            problems.append("engine_build must be 'host' or 'device'")
        if not 0 < data["usable_memory_gib"] <= data["memory_gib"]:
            problems.append("usable_memory_gib must be > 0 and <= memory_gib")
        if data["device_type"] != "cpu" and "sm" not in data:
            problems.append("GPU and Jetson targets need 'sm' (compute capability x10, e.g. 87)")
        sources = data.get("sources", {})
        problems += [f"[sources] has no '{k}': every number needs its source"
                     for k in ("memory", "usable_memory", "bandwidth") if k not in sources]
        if data.get("software") and "software" not in sources:
            problems.append("[sources] has no 'software': every version needs its source")
        if data.get("bandwidth_modes") and "bandwidth_modes" not in sources:
            problems.append("[sources] has no 'bandwidth_modes': every number needs its source")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems), "fix the target TOML (see 'edgepack targets show h100-sxm' for a full example)")
    return Target(
        name=data["name"], description=data.get("description", ""), device_type=data["device_type"],
        arch=data["arch"], sm=data.get("sm"), isa=data.get("isa"),
        memory_bytes=int(data["memory_gib"] * GIB), usable_memory_bytes=int(data["usable_memory_gib"] * GIB),
        bandwidth_bytes_per_s=float(data["bandwidth_gb_s"]) * 1e9, unified_memory=bool(data.get("unified_memory", False)),
        precisions=tuple(data["precisions"]), runtimes=tuple(data["runtimes"]),
        engine_build=data.get("engine_build", "host"), features=tuple(data.get("features", ())),
        power_modes=tuple(data.get("power_modes", ())), peak_tflops=dict(data.get("peak_tflops", {})),
        sources=dict(data.get("sources", {})), device_names=tuple(data.get("device_names", ())),
        software=dict(data.get("software", {})), bandwidth_modes=dict(data.get("bandwidth_modes", {})),
    )


def _parse_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML ({exc})", "fix the TOML syntax") from None


def load_target(name_or_path: str) -> Target:
    """A packaged profile by name, 'local', or a path to the user's own TOML file."""
    if name_or_path == "local":
        return local_target()
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        p = Path(name_or_path)
        if not p.is_file():
            raise ConfigError(f"target file '{p}' does not exist", "check the path, or use a name from 'edgepack targets list'")
        t = target_from_dict(_parse_toml(p.read_text(), str(p)), str(p))
        return _with_path(t, str(p))
    res = _profiles_dir().joinpath(f"{name_or_path}.toml")
    if not res.is_file():
        raise ConfigError(f"unknown target '{name_or_path}'{did_you_mean(name_or_path, list_targets())}",
                          "see 'edgepack targets list', or pass a path to your own TOML")
    return target_from_dict(_parse_toml(res.read_text(), f"{name_or_path}.toml"), f"{name_or_path}.toml")


def _with_path(t: Target, path: str) -> Target:
    from dataclasses import replace

    return replace(t, path=path)


def measure_bandwidth(n_bytes: int = 256 * 1024**2, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from the best of `repeats` single-threaded numpy copies of a buffer well above
    cache size (a copy reads and writes n_bytes each). A floor for what one decode thread can stream."""
    import time

    import numpy as np

    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def machine_arch() -> str:
    """This machine's CPU architecture in target-profile spelling (x86-64, arm64)."""
    m = platform.machine().lower()
    return {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "arm64"}.get(m, m)


def cuda_device() -> dict | None:
    """Name, memory and SM of CUDA device 0, importing torch only when an NVIDIA driver is visible."""
    import shutil

    if not (shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists() or Path("/etc/nv_tegra_release").exists()):
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    return {"name": p.name, "sm": p.major * 10 + p.minor, "memory_bytes": int(total), "free_bytes": int(free),
            "multiprocessors": p.multi_processor_count}


def local_cuda_sm() -> int | None:
    """SM x10 of CUDA device 0, or None (no NVIDIA driver, no torch CUDA build or no device)."""
    cuda = cuda_device()
    return cuda["sm"] if cuda else None


def profile_for_device(name: str) -> Target | None:
    """The packaged profile whose `device_names` lists this CUDA device name (exactly, as torch reports it)."""
    for n in list_targets():
        if n == "local":
            continue
        t = load_target(n)
        if name in t.device_names:
            return t
    return None


def local_target() -> Target:
    """This machine: cores, RAM, measured bandwidth; the CUDA device if any. A GPU a packaged profile names (its
    `device_names`, e.g. 'NVIDIA H200' -> h200) takes that profile's facts (datasheet bandwidth, peak rates, SM,
    precisions) with what is free now as usable memory; other GPUs get what torch can read off them. Jetsons
    (unified memory) are recognised by /etc/nv_tegra_release."""
    import psutil

    vm = psutil.virtual_memory()
    cuda = cuda_device()
    jetson = Path("/etc/nv_tegra_release").exists()
    arch = machine_arch()
    measured = {"cpu_cores": os.cpu_count(), "ram_bytes": int(vm.total), "ram_available_bytes": int(vm.available),
                "cuda": cuda}
    if cuda and not jetson:
        from dataclasses import replace

        known = profile_for_device(cuda["name"])
        if known is not None:
            measured["profile"] = known.name
            return replace(known, name="local", description=f"this machine: {cuda['name']} (profile {known.name})",
                           memory_bytes=cuda["memory_bytes"], measured=measured,
                           usable_memory_bytes=min(known.usable_memory_bytes, cuda["free_bytes"], cuda["memory_bytes"]),
                           sources={**known.sources, "profile": f"{known.name}: CUDA device '{cuda['name']}'",
                                    "memory": "measured: CUDA total memory",
                                    "usable_memory": f"measured: CUDA free memory now, at most {known.name}'s "
                                                     f"{known.usable_memory_bytes / GIB:.1f} GiB"})
    bw = measure_bandwidth()
    measured["bandwidth_method"] = "best of 5 single-threaded numpy copies of 256 MiB"
    if cuda and not jetson:
        sm = cuda["sm"]
        precisions = ["fp32", "fp16", "int8", "int4", "nf4"] + (["bf16"] if sm >= 80 else []) + (["fp8"] if sm >= 89 else [])
        return Target(name="local", description=f"this machine: {cuda['name']} (CUDA)", device_type="gpu", arch=arch,
                      sm=sm, memory_bytes=cuda["memory_bytes"], usable_memory_bytes=cuda["free_bytes"],
                      bandwidth_bytes_per_s=bw, precisions=tuple(precisions),
                      runtimes=("torch-cuda", "tensorrt", "onnxruntime"), measured=measured,
                      sources={"usable_memory": "measured: CUDA free memory now", "bandwidth":
                               "measured host-memory copy; GPU bandwidth is higher, use a packaged profile for the roofline"})
    return Target(
        name="local", description=f"this machine: {platform.processor() or arch}, {os.cpu_count()} cores"
        + (" (Jetson, unified memory)" if jetson else ""),
        device_type="jetson" if jetson else "cpu", arch=arch, isa=None if jetson else arch,
        sm=cuda["sm"] if cuda else None, memory_bytes=int(vm.total), usable_memory_bytes=int(vm.available),
        bandwidth_bytes_per_s=bw, unified_memory=True,
        precisions=("fp32", "fp16", "bf16", "int8", "int4") if jetson else ("fp32", "int8", "int4"),
        runtimes=("tensorrt", "torch-cuda", "onnxruntime", "llama.cpp") if jetson else ("onnxruntime", "torch-cpu", "llama.cpp"),
        engine_build="device" if jetson else "host", measured=measured,
        sources={"memory": "measured: psutil total RAM", "usable_memory": "measured: psutil available RAM now",
                 "bandwidth": measured["bandwidth_method"]},
    )
