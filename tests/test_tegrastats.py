"""tegrastats line parsing against real Orin output (JetPack 5 and JetPack 6 differ), /proc/meminfo and nvpmodel.

Where the sample lines come from (public GitHub files found with the project's code search, `find_string`; the
index ids are given so the exact file can be re-read; lines copied verbatim, only wrapped here):
- JP6_NANO_USER: an Orin Nano 8GB system report (nvidia-smi "Driver Version: 540.4.0 CUDA Version: 12.6", kernel
  5.15.148-tegra = JetPack 6.1/6.2), tegrastats run as a normal user: no EMC_FREQ, no GPU clock. Index id 47647917996;
  its /proc/meminfo from the same report is MEMINFO_NANO below.
- JP6_NANO_ROOT: `sudo tegrastats` on an Orin Nano 4GB (JetPack 6), pasted from a console in a robot's hardware
  audit (the line wraps and stops after VDD_CPU_GPU_CV). Index id 68514065915.
- JP6_NX_16GB: Orin NX 16GB under memory pressure (swap almost full, lfb 60x1MB), JetPack 6 lowercase sensors,
  eight cores. Index id 60371000082.
- JP5_AGX_64GB: AGX Orin 64GB: uppercase sensors (CPU@, SOC2@, Tboard@, Tdiode@) as printed by L4T 35 / JetPack 5,
  the AGX rail names (VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, VDDQ_VDD2_1V8AO, NC), absent CV/GPU sensors at -256C,
  two GPCs "GR3D_FREQ 0%@[0,0]". From a Go test fixture of a Jetson exporter. Index id 13663309883.
- JP5_AGX_32GB_NO_UNIT: AGX Orin 32GB, JetPack 5.0 era: rails without the mW unit, GPU clock without brackets
  ("GR3D_FREQ 0%@1300"). From a comment in a NixOS tegrastats exporter. Index id 65714659448.
Field meanings: NVIDIA Jetson Linux Developer Guide, "Jetson Orin ... Platform Power and Performance", tegrastats
section (docs.nvidia.com/jetson/archives/r36.3/DeveloperGuide/SD/PlatformPowerAndPerformance/...).
"""

from __future__ import annotations

import sys

import pytest

from edgepack.bench.tegrastats import TegrastatsSampler, parse_line

MIB = 1024**2

JP6_NANO_USER = (
    "01-04-2025 16:02:59 RAM 1273/7620MB (lfb 1x4MB) SWAP 286/3810MB (cached 1MB) "
    "CPU [0%@1036,0%@1036,1%@1036,0%@1036,0%@729,0%@729] GR3D_FREQ 0% cpu@45.875C soc2@45.843C soc0@44.843C "
    "gpu@45.437C tj@46.312C soc1@46.312C VDD_IN 4968mW/4968mW VDD_CPU_GPU_CV 436mW/436mW VDD_SOC 1708mW/1708mW")
JP6_NANO_ROOT = (
    "09-12-2026 02:14:33 RAM 1484/3602MB (lfb 21x4MB) SWAP 436/14089MB (cached 7MB)\n"
    "  CPU [3%@729,2%@729,1%@729,0%@729,1%@729,1%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305]\n"
    "  NVDEC off NVJPG off NVJPG1 off VIC off OFA off APE 200 cpu@56.281C soc2@55.843C soc0@54.093C\n"
    "  gpu@55.843C tj@56.281C soc1@56.187C VDD_IN 4428mW/4428mW VDD_CPU_GPU_CV 562mW/562mW")
JP6_NX_16GB = (
    "08-21-2026 18:23:36 RAM 15451/15656MB (lfb 60x1MB) SWAP 7822/7828MB (cached 3MB) "
    "CPU [13%@1984,32%@1984,75%@1984,22%@1984,68%@1420,7%@1420,3%@1420,36%@1420] GR3D_FREQ 43% cv0@54.093C "
    "cpu@55.937C soc2@53.406C soc0@54.562C cv1@53.562C gpu@53.468C tj@55.937C soc1@55.656C cv2@53.843C "
    "VDD_IN 8438mW/8240mW VDD_CPU_GPU_CV 3316mW/3134mW VDD_SOC 1977mW/1938mW")
JP5_AGX_64GB = (
    "04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB) "
    "CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 "
    "GR3D_FREQ 0%@[0,0] VIC_FREQ 729 APE 174 CV0@-256C CPU@44.562C Tboard@32C SOC2@40.093C Tdiode@33C SOC0@41.093C "
    "CV1@-256C GPU@-256C tj@44.343C SOC1@41.25C CV2@-256C VDD_GPU_SOC 2340mW/2340mW VDD_CPU_CV 390mW/390mW "
    "VIN_SYS_5V0 4025mW/4025mW NC 0mW/0mW VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW")
JP5_AGX_32GB_NO_UNIT = (
    "RAM 5123/31906MB (lfb 7510x4MB) SWAP 0/15953MB (cached 0MB) CPU [13%@2265,5%@2265,7%@2265,7%@2265,6%@2265,"
    "6%@2265,7%@2265,6%@2265,11%@2265,7%@2265,6%@2265,7%@2265] EMC_FREQ 0%@2133 GR3D_FREQ 0%@1300 VIC_FREQ 115 "
    "APE 25 CV0@-256C CPU@52.5C Tboard@42C SOC2@50.437C Tdiode@43.75C SOC0@52.062C CV1@-256C GPU@-256C tj@52.5C "
    "SOC1@49.812C CV2@-256C VDD_IN 8039/8039 VDD_CPU_GPU_CV 3231/3231 VDD_SOC 1623/1623")
# Orin Nano 8GB /proc/meminfo from the same report as JP6_NANO_USER (first lines).
MEMINFO_NANO = "MemTotal:        7802736 kB\nMemFree:         3668508 kB\nMemAvailable:    6245596 kB\nHugePages_Total:       0\n"


def test_jetpack6_user_line_without_emc_or_gpu_clock():
    s = parse_line(JP6_NANO_USER)
    assert s.timestamp == "01-04-2025 16:02:59"
    assert (s.ram_used_bytes, s.ram_total_bytes) == (1273 * MIB, 7620 * MIB)
    assert (s.lfb_blocks, s.lfb_block_bytes) == (1, 4 * MIB)
    assert (s.swap_used_bytes, s.swap_total_bytes, s.swap_cached_bytes) == (286 * MIB, 3810 * MIB, 1 * MIB)
    assert s.cpu_load_pct == [0, 0, 1, 0, 0, 0] and s.cpu_freq_mhz == [1036] * 4 + [729] * 2
    assert s.emc_load_pct is None and s.emc_freq_mhz is None  # non-root: not printed
    assert s.gpu_load_pct == 0 and s.gpu_freq_mhz == []
    assert s.temps_c == {"cpu": 45.875, "soc2": 45.843, "soc0": 44.843, "gpu": 45.437, "tj": 46.312, "soc1": 46.312}
    assert s.power_mw == {"VDD_IN": 4968, "VDD_CPU_GPU_CV": 436, "VDD_SOC": 1708}


def test_jetpack6_root_line_has_bracketed_gpc_clock_and_engines():
    s = parse_line(JP6_NANO_ROOT)
    assert (s.ram_used_bytes, s.ram_total_bytes) == (1484 * MIB, 3602 * MIB)
    assert (s.emc_load_pct, s.emc_freq_mhz) == (0, 2133)
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [305])
    assert s.engines == {"NVDEC": "off", "NVJPG": "off", "NVJPG1": "off", "VIC": "off", "OFA": "off", "APE": 200}
    assert s.power_mw == {"VDD_IN": 4428, "VDD_CPU_GPU_CV": 562}  # the pasted line stops there
    assert s.temps_c["tj"] == 56.281 and len(s.temps_c) == 6


def test_jetpack6_nx_current_and_average_power_differ():
    s = parse_line(JP6_NX_16GB)
    assert s.ram_used_bytes == 15451 * MIB and s.lfb_block_bytes == 1 * MIB and s.lfb_blocks == 60
    assert s.swap_used_bytes == 7822 * MIB
    assert len(s.cpu_load_pct) == 8 and s.cpu_load_pct[2] == 75 and s.cpu_freq_mhz[4] == 1420
    assert s.gpu_load_pct == 43
    assert s.power_mw["VDD_IN"] == 8438 and s.power_avg_mw["VDD_IN"] == 8240
    assert s.temps_c["cv0"] == 54.093 and s.temps_c["cv2"] == 53.843


def test_jetpack5_agx_uppercase_sensors_two_gpcs_and_absent_sensors():
    s = parse_line(JP5_AGX_64GB)
    assert s.ram_total_bytes == 62801 * MIB and len(s.cpu_load_pct) == 12
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [0, 0])
    assert s.engines == {"VIC_FREQ": 729, "APE": 174}
    # -256C = sensor not present (CV0/CV1/CV2/GPU): dropped, the rest kept with their own spelling
    assert s.temps_c == {"CPU": 44.562, "Tboard": 32.0, "SOC2": 40.093, "Tdiode": 33.0, "SOC0": 41.093,
                         "tj": 44.343, "SOC1": 41.25}
    # AGX rails; the unconnected "NC" channels are not rails
    assert s.power_mw == {"VDD_GPU_SOC": 2340, "VDD_CPU_CV": 390, "VIN_SYS_5V0": 4025, "VDDQ_VDD2_1V8AO": 301}


def test_jetpack5_rails_without_unit_and_unbracketed_gpu_clock():
    s = parse_line(JP5_AGX_32GB_NO_UNIT)
    assert s.timestamp is None
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, [1300])
    assert s.power_mw == {"VDD_IN": 8039, "VDD_CPU_GPU_CV": 3231, "VDD_SOC": 1623}
    assert "RAM" not in s.power_mw and "SWAP" not in s.power_mw  # "RAM 5123/31906MB" is not a rail
    assert s.ram_used_bytes == 5123 * MIB and s.temps_c["CPU"] == 52.5


def test_non_tegrastats_line_is_none():
    assert parse_line("NVIDIA-SMI 540.4.0  Driver Version: 540.4.0") is None
    assert parse_line("") is None


def test_sampler_tracks_peak_ram_from_a_line_source():
    lines = [JP6_NANO_USER, JP6_NANO_ROOT, JP6_NX_16GB, "garbage"]
    script = "import sys\n" + "".join(f"print({ln.replace(chr(10), ' ')!r}, flush=True)\n" for ln in lines)
    with TegrastatsSampler(command=[sys.executable, "-c", script]) as ts:
        ts._proc.wait(timeout=30)
    assert len(ts.samples) == 3
    assert ts.peak_ram_used_bytes == 15451 * MIB


def test_meminfo_system_view_and_nvpmodel():
    from edgepack.bench.memory import parse_meminfo, system_used_bytes
    from edgepack.bench.run import parse_nvpmodel

    info = parse_meminfo(MEMINFO_NANO)
    assert info["MemTotal"] == 7802736 * 1024 and info["HugePages_Total"] == 0
    assert system_used_bytes(MEMINFO_NANO) == (7802736 - 6245596) * 1024
    assert parse_nvpmodel("NV Power Mode: MAXN\n0\n") == "MAXN"
    assert parse_nvpmodel("NV Power Mode: 15W\n0\n") == "15W"
    assert parse_nvpmodel("") is None


def test_sampler_without_tegrastats_names_what_is_missing(monkeypatch):
    from edgepack.bench import tegrastats
    from edgepack.errors import MissingDependency

    monkeypatch.setattr(tegrastats, "find_tegrastats", lambda: None)
    with pytest.raises(MissingDependency, match="tegrastats"):
        TegrastatsSampler()
