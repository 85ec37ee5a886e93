"""Peak memory over a measurement window, as each kind of device sees it.

- CPU: the process's peak resident set. Linux keeps a high-water mark (VmHWM in /proc/self/status); writing "5" to
  /proc/self/clear_refs resets it to the current RSS (Linux >= 4.0), so the peak covers exactly the window. We do
  not use resource.getrusage().ru_maxrss: it is a process-lifetime maximum that cannot be reset, so it would report
  model loading or an earlier sweep point. Where clear_refs is refused, a background thread samples psutil RSS
  every `interval_s` instead (and says so: a sampled peak can miss spikes shorter than the interval).
- CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated / reserved, reset at the start) and the
  device-level used memory from NVML (all processes and the CUDA context), sampled by the thread.
- Jetson: CPU and GPU share DRAM and NVML does not work, so the system view: peak "RAM used" from tegrastats when
  it runs, else MemTotal - MemAvailable from /proc/meminfo sampled by the thread.

`headline_bytes()` picks the one figure reported as `peak_memory_bytes`: process RSS on CPU, device-level used memory
on a discrete GPU (allocator reserved peak if NVML is missing), system used memory on Jetson.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from edgepack.deploy.runtime import process_rss_bytes

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS. False where the kernel refuses."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def rss_peak_bytes() -> int | None:
    """Kernel high-water mark of this process's RSS since start or the last reset_rss_peak(), bytes."""
    return _status_kib("VmHWM")


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo text -> {field: bytes} (values there are kB = KiB)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w[\w()]*):\s+(\d+)(?: kB)?$", line.strip())
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if line.strip().endswith("kB") else 1)
    return out


def system_used_bytes(meminfo_text: str | None = None) -> int:
    """Memory the system is using, MemTotal - MemAvailable: what a Jetson has left for a model is MemAvailable."""
    info = parse_meminfo(meminfo_text if meminfo_text is not None else Path("/proc/meminfo").read_text())
    return info["MemTotal"] - info["MemAvailable"]


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def _nvml_handle(index: int):
    try:
        import pynvml
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # NVML missing or unsupported (Jetson): fall back to the allocator view
        return None, None


class PeakMemory:
    """Context manager measuring peak memory over its block. `device` is the runtime's device string
    ("cpu", "cuda", "cuda:0")."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.005):
        self.device = device
        self.interval_s = interval_s
        self.cuda = device.startswith("cuda")
        self.jetson = is_jetson()
        self.result: dict = {}
        self._stop = threading.Event()
        self._thread = None
        self._tegra = None
        self._sampled = {"rss": 0, "nvml": None, "system": None}

    def _sample(self) -> None:
        s = self._sampled
        s["rss"] = max(s["rss"], process_rss_bytes()) if not self._hwm else 0
        if self._nvml is not None:
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_dev).used)
            s["nvml"] = max(s["nvml"] or 0, used)
        if self.jetson and self._tegra is None:
            s["system"] = max(s["system"] or 0, system_used_bytes())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._hwm = reset_rss_peak() and rss_peak_bytes() is not None
        self._nvml, self._nvml_dev = (None, None)
        if self.cuda:
            import torch

            idx = torch.device(self.device).index or 0
            torch.cuda.synchronize(idx)
            torch.cuda.reset_peak_memory_stats(idx)
            if not self.jetson:
                self._nvml, self._nvml_dev = _nvml_handle(idx)
        if self.jetson:
            from edgepack.bench.tegrastats import TegrastatsSampler, find_tegrastats

            if find_tegrastats():
                self._tegra = TegrastatsSampler(interval_ms=100).__enter__()
        self._sample()
        if not self._hwm or self._nvml is not None or (self.jetson and self._tegra is None):
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._sample()
        r = {"rss_peak_bytes": rss_peak_bytes() if self._hwm else self._sampled["rss"],
             "rss_method": ("kernel high-water mark VmHWM, reset via /proc/self/clear_refs at window start"
                            if self._hwm else f"psutil RSS sampled every {self.interval_s * 1e3:g} ms")}
        if self.cuda:
            import torch

            idx = torch.device(self.device).index or 0
            torch.cuda.synchronize(idx)
            r["cuda_allocated_peak_bytes"] = int(torch.cuda.max_memory_allocated(idx))
            r["cuda_reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved(idx))
            if self._sampled["nvml"] is not None:
                r["device_used_peak_bytes"] = self._sampled["nvml"]
                r["device_method"] = f"NVML device memory used (all processes), sampled every {self.interval_s * 1e3:g} ms"
        if self.jetson:
            if self._tegra is not None:
                self._tegra.__exit__(None, None, None)
                r["system_used_peak_bytes"] = self._tegra.peak_ram_used_bytes
                r["system_method"] = "tegrastats RAM used, 100 ms interval"
            else:
                r["system_used_peak_bytes"] = self._sampled["system"]
                r["system_method"] = f"/proc/meminfo MemTotal - MemAvailable, sampled every {self.interval_s * 1e3:g} ms"
        self.result = r

    def headline_bytes(self) -> tuple[int | None, str]:
        """(bytes, what they are) for `peak_memory_bytes`."""
        r = self.result
        if self.jetson and r.get("system_used_peak_bytes"):
            return r["system_used_peak_bytes"], "system memory used (Jetson: CPU and GPU share DRAM)"
        if self.cuda:
            if "device_used_peak_bytes" in r:
                return r["device_used_peak_bytes"], "GPU memory used, device level (NVML)"
            return r["cuda_reserved_peak_bytes"], "CUDA caching allocator reserved peak (NVML unavailable)"
        return r["rss_peak_bytes"], "process peak RSS"
