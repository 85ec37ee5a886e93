"""Jetson telemetry: parse `tegrastats` lines (JetPack 4, 5 and 6 formats) and sample them in the background.

NVML does not work on Jetson and CPU and GPU share one DRAM, so the memory that matters is the system's: tegrastats'
`RAM used/total` (or /proc/meminfo, see edgepack.bench.memory). Formats differ between releases, e.g.

    JetPack 5 (L4T 35), AGX Orin, uppercase sensors, one GPU clock, rails with or without the mW unit:
      RAM 5123/31906MB (lfb 7510x4MB) SWAP 0/15953MB (cached 0MB) CPU [13%@2265,...] EMC_FREQ 0%@2133
      GR3D_FREQ 0%@1300 VIC_FREQ 115 APE 25 CV0@-256C CPU@52.5C Tboard@42C ... VDD_IN 8039/8039 ...
    JetPack 6 (L4T 36), Orin Nano / NX, timestamp first, lowercase sensors, GPC clocks in brackets (root only):
      09-12-2026 02:14:33 RAM 1484/3602MB (lfb 21x4MB) ... EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] NVDEC off
      ... APE 200 cpu@56.281C ... VDD_IN 4428mW/4428mW VDD_CPU_GPU_CV 562mW/562mW

Run as a normal user, tegrastats omits EMC_FREQ and the GPU clock. A sensor reading -256C means "not present" and is
dropped. "MB" in tegrastats is MiB (it divides /proc/meminfo kB by 1024).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

_UNIT = {"kB": 1024, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
_TS = re.compile(r"^\s*(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)(kB|MB|GB)(?: \(lfb (\d+)x(\d+)(kB|MB)\))?")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)(kB|MB|GB)(?: \(cached (\d+)(kB|MB|GB)\))?")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?", re.IGNORECASE)
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"(?<![\w%])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
# A power rail: NAME current/average, in mW (JetPack 5.1+ prints the unit, older releases do not). The lookahead
# keeps "RAM 1273/7620MB" and "SWAP 0/3810MB" out.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")
_ENGINE = re.compile(r"\b(APE|VIC_FREQ|VIC|OFA|NVENC\d?|NVDEC\d?|NVJPG\d?|NVDLA\d(?:_FREQ)?|PVA\d_FREQ) (off|\d+)")
_NOT_RAILS = {"RAM", "SWAP", "IRAM", "NC"}  # NC: an unconnected INA3221 channel on AGX Orin
ABSENT_SENSOR_C = -256.0


@dataclass
class TegraSample:
    timestamp: str | None = None
    ram_used_bytes: int | None = None
    ram_total_bytes: int | None = None
    lfb_blocks: int | None = None  # largest free block: count x size
    lfb_block_bytes: int | None = None
    swap_used_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_cached_bytes: int | None = None
    cpu_load_pct: list = field(default_factory=list)  # per core; None = core off
    cpu_freq_mhz: list = field(default_factory=list)
    emc_load_pct: int | None = None  # memory controller load (root only)
    emc_freq_mhz: int | None = None
    gpu_load_pct: int | None = None
    gpu_freq_mhz: list = field(default_factory=list)  # one per GPC on JetPack 6 ("@[305]", "@[0,0]")
    temps_c: dict = field(default_factory=dict)
    power_mw: dict = field(default_factory=dict)  # current reading per rail
    power_avg_mw: dict = field(default_factory=dict)  # tegrastats' own running average per rail
    engines: dict = field(default_factory=dict)  # APE/VIC/NVDEC...: MHz or "off"

    def to_dict(self) -> dict:
        return asdict(self)


def _bytes(n: str, unit: str) -> int:
    return int(n) * _UNIT[unit]


def parse_line(line: str) -> TegraSample | None:
    """One tegrastats line -> TegraSample, or None when the line carries no RAM field (not tegrastats output)."""
    ram = _RAM.search(line)
    if ram is None:
        return None
    s = TegraSample()
    if m := _TS.search(line):
        s.timestamp = m.group(1)
    s.ram_used_bytes, s.ram_total_bytes = _bytes(ram.group(1), ram.group(3)), _bytes(ram.group(2), ram.group(3))
    if ram.group(4):
        s.lfb_blocks, s.lfb_block_bytes = int(ram.group(4)), _bytes(ram.group(5), ram.group(6))
    if m := _SWAP.search(line):
        s.swap_used_bytes, s.swap_total_bytes = _bytes(m.group(1), m.group(3)), _bytes(m.group(2), m.group(3))
        if m.group(4):
            s.swap_cached_bytes = _bytes(m.group(4), m.group(5))
    if m := _CPU.search(line):
        shared_freq = int(m.group(2)) if m.group(2) else None  # JetPack 4 TX1/TX2: "cpu [17%,13%]@408"
        for entry in m.group(1).split(","):
            entry = entry.strip()
            if not entry or entry == "off":
                s.cpu_load_pct.append(None)
                s.cpu_freq_mhz.append(None)
                continue
            load, _, freq = entry.partition("@")
            s.cpu_load_pct.append(int(load.rstrip("%")))
            s.cpu_freq_mhz.append(int(freq) if freq else shared_freq)
    if m := _EMC.search(line):
        s.emc_load_pct = int(m.group(1))
        s.emc_freq_mhz = int(m.group(2)) if m.group(2) else None
    if m := _GR3D.search(line):
        s.gpu_load_pct = int(m.group(1))
        s.gpu_freq_mhz = [int(f) for f in m.group(2).split(",") if f] if m.group(2) else []
    for name, value in _TEMP.findall(line):
        if float(value) != ABSENT_SENSOR_C:
            s.temps_c[name] = float(value)
    for name, cur, avg in _RAIL.findall(line):
        if name not in _NOT_RAILS:
            s.power_mw[name], s.power_avg_mw[name] = int(cur), int(avg)
    for name, value in _ENGINE.findall(line):
        s.engines[name] = value if value == "off" else int(value)
    return s


def find_tegrastats() -> str | None:
    """Path of the tegrastats binary (on PATH or where JetPack installs it), or None off Jetson."""
    exe = shutil.which("tegrastats")
    if exe is None and Path("/usr/bin/tegrastats").is_file():  # not on a non-root user's PATH on some images
        exe = "/usr/bin/tegrastats"
    return exe


class TegrastatsSampler:
    """Run `tegrastats --interval MS` in the background and keep the peak system RAM and the last sample.

        with TegrastatsSampler() as ts:      # or TegrastatsSampler(command=[...]) to read another line source
            ...work...
        ts.peak_ram_used_bytes, ts.samples

    `command` defaults to the tegrastats binary; it must print one tegrastats line per sample on stdout."""

    def __init__(self, interval_ms: int = 100, command: list[str] | None = None):
        if command is None:
            exe = find_tegrastats()
            if exe is None:
                from edgepack.errors import MissingDependency

                raise MissingDependency("tegrastats", "jetson", "Jetson telemetry; it ships with JetPack")
            command = [exe, "--interval", str(interval_ms)]
        self.command = command
        self.samples: list[TegraSample] = []
        self.peak_ram_used_bytes: int | None = None
        self._proc = None
        self._thread = None

    def _read(self) -> None:
        for line in self._proc.stdout:
            s = parse_line(line)
            if s is None:
                continue
            self.samples.append(s)
            if self.peak_ram_used_bytes is None or s.ram_used_bytes > self.peak_ram_used_bytes:
                self.peak_ram_used_bytes = s.ram_used_bytes

    def __enter__(self) -> TegrastatsSampler:
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._thread.join(timeout=5)
