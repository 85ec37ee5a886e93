"""Benchmark one artifact on this machine: the sweep (bench.measure), peak memory (bench.memory), the roofline
context (targets.fit) and an optional plain-transformers baseline, assembled into one JSON record (bench.report).

Order matters for honest numbers: the target check happens before any weights load; ours is measured first on its
own (its memory peak excludes the baseline's weights); then the baseline loads and its runs alternate with runs of
ours, so the speedup compares the two in the same seconds of a noisy machine.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepack.deploy.runtime import resolve_runtime
from edgepack.errors import ConfigError, UnsupportedOnTarget
from edgepack.facts import artifact_precision, group_size, read_model_config, weight_bytes
from edgepack.formats import PROFILE_RUNTIMES

BASELINES = ("hf",)


@dataclass(frozen=True)
class BenchConfig:
    runtime: str | None = None  # None: the artifact's own (deploy.runtime.resolve_runtime)
    prompt_lens: tuple[int, ...] = (64,)  # prompt tokens per row
    gen_lens: tuple[int, ...] = (64,)  # generated tokens per row (the first comes from prefill)
    batches: tuple[int, ...] = (1,)  # rows generated together
    runs: int = 5  # measured runs per point (at least)
    min_seconds: float = 2.0  # more runs until this much wall time was measured per point (0 = exactly `runs`)
    warmup: int = 2  # discarded runs per point
    threads: int | None = None  # CPU threads for the runtime (None: its default)
    baseline: str | None = field(default=None, metadata={"choices": BASELINES})  # "hf": plain transformers generate on the same model, same process
    baseline_model: str = ""  # HF checkpoint for the baseline when the artifact is not one (e.g. ONNX)
    seed: int = 0  # prompt token ids
    realtime: bool = False  # run the timed sections under SCHED_FIFO (a dedicated core on a shared machine; root)

    def validate(self) -> list[str]:
        errs = []
        for name in ("prompt_lens", "gen_lens", "batches"):
            vals = getattr(self, name)
            if not vals or any(v < 1 for v in vals):
                errs.append(f"{name} must be a non-empty list of integers >= 1")
        if self.runs < 1:
            errs.append("runs must be >= 1")
        if self.min_seconds < 0:
            errs.append("min_seconds must be >= 0")
        if self.warmup < 0:
            errs.append("warmup must be >= 0")
        if self.threads is not None and self.threads < 1:
            errs.append("threads must be >= 1")
        if self.baseline is not None and self.baseline not in BASELINES:
            errs.append(f"baseline must be one of {', '.join(BASELINES)}")
        if self.baseline and any(g < 2 for g in self.gen_lens):
            errs.append("a baseline needs every gen_len >= 2 (decode is timed from generate(n) - generate(1))")
        return errs

    def points(self) -> list[tuple[int, int, int]]:
        return [(p, g, b) for b in self.batches for p in self.prompt_lens for g in self.gen_lens]


def check_target(target, runtime: str) -> None:
    """Ask the target whether it runs this runtime (only runtimes targets know about: 'hf' is a baseline)."""
    if runtime in PROFILE_RUNTIMES and not target.supports(runtime=runtime):
        raise UnsupportedOnTarget(f"target '{target.name}' does not run the '{runtime}' runtime",
                                  f"its runtimes: {', '.join(target.runtimes)}; pass --runtime or another --target")


def find_baseline_model(art, explicit: str = "") -> Path:
    """The HF checkpoint the baseline runs: --baseline-model, the artifact itself if it is one, else the lineage
    (paths recorded in stage configs, newest first, then base_model)."""
    from edgepack.artifact import open_artifact
    from edgepack.errors import EdgepackError

    if explicit:
        p = Path(explicit)
        if open_artifact(p).format != "hf":
            raise ConfigError(f"--baseline-model '{p}' is not a Hugging Face checkpoint", "pass the HF model directory")
        return p
    if art.format == "hf":
        return art.path
    candidates = [v for rec in reversed(art.history) for k, v in (rec.get("config") or {}).items()
                  if isinstance(v, str) and k in ("source", "parent_path", "model", "base_model", "checkpoint")]
    candidates.append(art.base_model)
    for c in candidates:
        try:
            if Path(c).is_dir() and open_artifact(Path(c)).format == "hf":
                return Path(c)
        except EdgepackError:
            continue
    raise ConfigError(f"cannot find the Hugging Face checkpoint that '{art.path}' was made from (lineage: "
                      f"{', '.join(candidates) or 'none recorded'})", "pass --baseline-model PATH")


def device_info(describe: dict) -> dict:
    """What was measured on: CPU/GPU name, cores, kernel, runtime description (threads, versions), library
    versions, and on Jetson the L4T release and power mode."""
    from edgepack.artifact import library_versions

    info = {"name": _cpu_name(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "kernel": platform.release(), "runtime": describe, "threads": describe.get("threads"),
            "versions": library_versions()}
    dev = str(describe.get("device", "cpu"))
    if dev.startswith("cuda"):
        import torch

        idx = torch.device(dev).index or 0
        info["name"] = torch.cuda.get_device_name(idx)
        info["cuda_runtime"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
        info["host_cpu"] = _cpu_name()
    tegra = Path("/etc/nv_tegra_release")
    if tegra.exists():
        info["l4t"] = tegra.read_text().splitlines()[0].strip("# ").strip()
        info["power_mode"] = _nvpmodel_mode()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run_quiet(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def _nvidia_driver() -> str | None:
    out = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.strip().splitlines()[0] if out and out.strip() else None


def parse_nvpmodel(text: str) -> str | None:
    """`nvpmodel -q` prints 'NV Power Mode: MAXN' then the mode number."""
    for line in (text or "").splitlines():
        if line.startswith("NV Power Mode:"):
            return line.split(":", 1)[1].strip()
    return None


def _nvpmodel_mode() -> str | None:
    return parse_nvpmodel(_run_quiet(["nvpmodel", "-q"]) or "")


def roofline(art, target, precision: str | None, prompt_len: int, gen_len: int, batch: int,
             runtime: str | None = None) -> dict:
    """Bytes read per generated token and what they imply: the bandwidth-bound decode limit (a prediction) and,
    from targets.fit, the predicted peak memory. Context for the KV cache: the mean during decode."""
    cfg = read_model_config(art.path, missing_ok=True)
    mean_ctx = prompt_len + max(gen_len - 1, 0) // 2
    bw = target.bandwidth_bytes_per_s
    out = {}
    if cfg is not None and precision is not None:
        from edgepack.targets.fit import fit

        group = {"group_size": group_size(art)} if group_size(art) else {}
        r = fit(cfg, target, precision, context=mean_ctx, batch=batch, check_support=False, runtime=runtime, **group)
        out["bytes_per_token"] = r.bytes_per_token
        out["bytes_per_token_source"] = f"targets.fit: model config at {precision}, KV at mean context {mean_ctx}"
        peak = fit(cfg, target, precision, context=prompt_len + gen_len, batch=batch, check_support=False,
                   runtime=runtime, **group)
        out.update({"predicted_peak_memory_bytes": peak.required_bytes, "fits": peak.fits,
                    "usable_bytes": peak.usable_bytes})
    else:
        kv = 0
        if cfg is not None:
            from edgepack.targets.fit import model_shape

            s = model_shape(cfg)
            kv = s.kv_elements_per_token * mean_ctx * batch * 4
        out["bytes_per_token"] = int((weight_bytes(art) + kv) / batch)  # weights are read once per step
        out["bytes_per_token_source"] = "artifact weight files on disk" + (" + fp32 KV cache" if kv else "")
    out["roofline_decode_tokens_per_s"] = bw / out["bytes_per_token"]  # all rows together
    return out


@contextlib.contextmanager
def scheduling(realtime: bool):
    """SCHED_FIFO (priority 1) for every thread of this process while timing, restored after: other tenants of a
    shared machine can no longer preempt the benchmark, so it measures what a dedicated core would give. Linux
    throttles real-time tasks to 95% of each second (sched_rt_runtime_us), so the machine stays usable."""
    if not realtime:
        yield "SCHED_OTHER (shared with other processes)"
        return
    if not hasattr(os, "sched_setscheduler"):
        raise ConfigError("--realtime needs Linux scheduling controls", "drop --realtime")
    tids = [int(t) for t in os.listdir("/proc/self/task")]
    old = {t: (os.sched_getscheduler(t), os.sched_getparam(t)) for t in tids}
    try:
        for t in tids:
            os.sched_setscheduler(t, os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        for t, (pol, prm) in old.items():
            with contextlib.suppress(OSError):
                os.sched_setscheduler(t, pol, prm)
        raise ConfigError("--realtime needs permission to use SCHED_FIFO (root or CAP_SYS_NICE)", "drop --realtime") from None
    try:
        yield "SCHED_FIFO priority 1 (real-time: not preempted by other processes)"
    finally:
        for t, (pol, prm) in old.items():
            with contextlib.suppress(OSError):  # a thread may have exited
                os.sched_setscheduler(t, pol, prm)


def run_bench(art, cfg: BenchConfig, target, *, progress=None) -> dict:
    """Measure `art` per cfg on this machine; bandwidth utilisation is against `target`'s bandwidth (for the
    `local` target, the measured one). Returns the record (see bench.report.validate_record)."""
    from edgepack.bench.measure import (
        PROTOCOL,
        measure_hf_generate,
        measure_point,
        percentile,
        probe_vocab,
        token_agreement,
    )
    from edgepack.bench.memory import PeakMemory, reset_rss_peak, rss_peak_bytes
    from edgepack.bench.record import finish_record
    from edgepack.deploy.runtime import open_runtime

    errs = cfg.validate()
    if errs:
        raise ConfigError("bench settings: " + "; ".join(errs), "change the values named (each says what it must be)")
    say = progress or (lambda msg: None)
    runtime = resolve_runtime(art, cfg.runtime)
    check_target(target, runtime)
    mcfg = read_model_config(art.path, missing_ok=True) or {}
    max_pos = mcfg.get("max_position_embeddings")
    too_long = [(p, g) for p, g, _ in cfg.points() if max_pos and p + g > max_pos]
    if too_long:
        raise ConfigError(f"prompt_len + gen_len = {too_long[0][0] + too_long[0][1]} exceeds the model's "
                          f"max_position_embeddings ({max_pos})", "use shorter --prompt-len / --gen-len")
    baseline_path = find_baseline_model(art, cfg.baseline_model) if cfg.baseline else None

    say(f"loading {art.path} with runtime {runtime}")
    reset_rss_peak()
    t0 = time.perf_counter()
    rt = open_runtime(art, runtime, threads=cfg.threads)
    load_s = time.perf_counter() - t0
    load_peak = rss_peak_bytes()
    desc = rt.describe()
    device = str(desc.get("device", "cpu"))
    sync = None
    if device.startswith("cuda"):
        import torch

        sync = torch.cuda.synchronize
    vocab = probe_vocab(rt)
    precision = artifact_precision(art)
    # What the runtime holds in memory decides bytes read per token: a runtime may say so in describe()
    # ("weight_precision", e.g. int4 weights dequantized to fp32 where no int4 kernel exists); torch-cpu computes an
    # fp16/bf16 checkpoint in fp32 (edgepack.hf.compute_dtype_for)
    mem_precision = desc.get("weight_precision") or ("fp32" if (art.format == "hf" and device == "cpu") else precision)
    points = []
    load_before = os.getloadavg()[0]
    for p, g, b in cfg.points():
        say(f"prompt {p}, generate {g}, batch {b}: {cfg.warmup} warm-up + {cfg.runs} runs (more until {cfg.min_seconds} s)")
        with scheduling(cfg.realtime) as sched:
            pt = measure_point(rt, p, g, b, runs=cfg.runs, warmup=cfg.warmup, vocab=vocab, seed=cfg.seed, sync=sync,
                               min_seconds=cfg.min_seconds,
                               memory=lambda: PeakMemory(device))
        pt.update(roofline(art, target, mem_precision, p, g, b, runtime=runtime))
        points.append(pt)
    load_after = os.getloadavg()[0]
    base_points = None
    if cfg.baseline:
        say(f"baseline: plain transformers generate on {baseline_path}, interleaved run by run with ours")
        from edgepack.artifact import open_artifact
        from edgepack.deploy.generation import GenerationConfig, generate

        brt = open_runtime(open_artifact(baseline_path), cfg.baseline, threads=cfg.threads)
        base_points = []
        for pt in points:
            paired: list[float] = []
            gcfg = GenerationConfig(max_new_tokens=pt["gen_len"], temperature=0.0)

            def ours(ids, gcfg=gcfg, paired=paired, rt=rt):
                paired.extend(generate(rt, ids, gcfg, sync=sync).token_latencies_s)

            with scheduling(cfg.realtime):
                bp = measure_hf_generate(brt, pt["prompt_len"], pt["gen_len"], pt["batch"], runs=cfg.runs,
                                         warmup=cfg.warmup, vocab=vocab, seed=cfg.seed,
                                         memory=lambda: PeakMemory(device), between=ours)
            bp["peak_memory_kind"] = "process peak RSS with both runtimes resident"
            bp["token_agreement"] = token_agreement(pt["_tokens"], bp["_tokens"])
            # ours again, in the same seconds as the baseline (warm-up runs excluded): the fair numerator
            pt["decode_tokens_per_s_paired"] = pt["batch"] / percentile(paired[-cfg.runs * (pt["gen_len"] - 1):], 50)
            base_points.append(bp)
        del brt
    del rt
    gc.collect()
    record = {
        "protocol": PROTOCOL, "artifact": str(art.path), "artifact_format": art.format,
        "artifact_bytes": art.size_bytes(), "weight_bytes": weight_bytes(art), "precision": precision,
        "runtime": runtime, "weight_precision_in_memory": mem_precision, "load_seconds": load_s, "load_peak_rss_bytes": load_peak,
        "target": {"name": target.name, "bandwidth_bytes_per_s": target.bandwidth_bytes_per_s,
                   "bandwidth_source": target.sources.get("bandwidth", "")},
        "device": device_info(desc) | {"scheduling": sched, "load_average_1m": [load_before, load_after]},
        "settings": asdict(cfg),
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return finish_record(record, points, base_points)
