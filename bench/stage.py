"""Stage `bench`: measure the artifact on this machine (edgepack.bench.run) and record the whole bench record as the
stage's metrics, so a bundle carries its own evidence. The model files are hard-linked from the parent (no disk
cost, parent untouched); the config is edgepack.bench.run.BenchConfig.

Where the target's hardware is not this machine (an H100 target on a CPU box, a Jetson target on an x86 server) the
stage measures nothing: it records the roofline prediction instead (targets.fit: bytes read per decode step against
the target's bandwidth -> an upper bound on decode tokens/s, predicted peak memory, the fit verdict) under
`"measured": false, "prediction": {...}`, with every measured key present and null, so the recipe goes on and a
report labels the numbers "predicted". Measured records carry `"measured": true`.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict
from pathlib import Path

from edgepack.artifact import Artifact, ArtifactWriter, check_output_dir, link_files, stage_record
from edgepack.bench.run import BenchConfig, run_bench

PREDICTION_LABEL = "predicted (roofline: target bandwidth / bytes read per decode step; not measured)"


def hardware_present(target) -> tuple[bool, str]:
    """(is this machine the target's hardware, why). CPUs match by architecture; CUDA targets need a visible CUDA
    device with the target's SM (an H200 is sm_90 like an H100: same kernels, measured as such); Jetson targets also
    need a Jetson (/etc/nv_tegra_release)."""
    from edgepack.targets.profile import cuda_device, machine_arch

    if target.name == "local":
        return True, "the 'local' target is this machine"
    here = machine_arch()
    if target.device_type == "cpu":
        if target.arch == here:
            return True, f"this machine is {here}, like the target"
        return False, f"target '{target.name}' is {target.arch}; this machine is {here}"
    cuda = cuda_device()  # imports torch only when an NVIDIA driver is visible
    jetson = Path("/etc/nv_tegra_release").exists()
    if cuda is None:
        return False, f"target '{target.name}' is a CUDA {target.device_type} (sm_{target.sm}); this machine has no CUDA device"
    if (target.device_type == "jetson") != jetson:
        return False, f"target '{target.name}' is a {target.device_type}; this machine's {cuda['name']} is not"
    if target.sm is not None and cuda["sm"] != target.sm:
        return False, f"target '{target.name}' is sm_{target.sm}; this machine's {cuda['name']} is sm_{cuda['sm']}"
    from edgepack.targets.profile import profile_for_device

    own = profile_for_device(cuda["name"])
    if own is not None and own.name != target.name:  # e.g. an H200 measuring an h100-sxm branch
        return True, (f"this machine's {cuda['name']} (sm_{cuda['sm']}) runs the target's kernels; it is profile "
                      f"'{own.name}' ({own.bandwidth_bytes_per_s / 1e9:.0f} GB/s), not '{target.name}' "
                      f"({target.bandwidth_bytes_per_s / 1e9:.0f} GB/s)")
    return True, f"this machine's {cuda['name']} (sm_{cuda['sm']}) matches the target"


def predict_bench(art: Artifact, cfg: BenchConfig, target, reason: str) -> dict:
    """A bench record without measurement: per sweep point the roofline (bench.run.roofline) and the fit verdict at
    that point's context, headline keys null. Reads only config.json and the manifest."""
    from edgepack.bench.record import FIGURES
    from edgepack.bench.run import roofline
    from edgepack.facts import artifact_precision, weight_bytes

    errs = cfg.validate()
    if errs:
        from edgepack.errors import ConfigError

        raise ConfigError("bench settings: " + "; ".join(errs), "change the values named (each says what it must be)")
    precision = artifact_precision(art)
    runtime = art.extra.get("runtime")  # refines fit's runtime overhead where it is measured per runtime
    points = []
    for p, g, b in cfg.points():
        pt = {"prompt_len": p, "gen_len": g, "batch": b, "decode_tokens_per_s": None, "prefill_tokens_per_s": None,
              "ttft_ms": None, "peak_memory_bytes": None, "bandwidth_utilization": None}
        pt.update(roofline(art, target, precision, p, g, b, runtime=runtime))  # with fit's verdict at p + g
        points.append(pt)
    verdicts = [pt["fits"] for pt in points if "fits" in pt]
    first = points[0]
    prediction = {
        "label": PREDICTION_LABEL, "reason": reason, "precision": precision,
        "decode_tokens_per_s_upper_bound": first["roofline_decode_tokens_per_s"],
        "bytes_per_token": first["bytes_per_token"], "bytes_per_token_source": first["bytes_per_token_source"],
        "predicted_peak_memory_bytes": first.get("predicted_peak_memory_bytes"),
        "fits": all(verdicts) if verdicts else None, "usable_memory_bytes": target.usable_memory_bytes,
        "bandwidth_bytes_per_s": target.bandwidth_bytes_per_s,
        "bandwidth_source": target.sources.get("bandwidth", ""),
    }
    return {
        "protocol": "edgepack-bench-v1", "measured": False, "prediction": prediction,
        "artifact": str(art.path), "artifact_format": art.format, "artifact_bytes": art.size_bytes(),
        "weight_bytes": weight_bytes(art), "precision": precision, "runtime": runtime,
        "decode_tokens_per_s": None, "prefill_tokens_per_s": None, "ttft_ms": None, "peak_memory_bytes": None,
        "bandwidth_utilization": None,
        "target": {"name": target.name, "bandwidth_bytes_per_s": target.bandwidth_bytes_per_s,
                   "bandwidth_source": target.sources.get("bandwidth", "")},
        "device": {"name": f"not measured ({target.name} hardware absent)", "reason": reason},
        "settings": asdict(cfg), "points": points,
        "figures": {k: ("not measured (null)" if v == "measured" else v) for k, v in FIGURES.items()},
        "predicted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _bench_child(path: str, cfg: BenchConfig, target) -> dict:
    from edgepack.artifact import open_artifact

    return run_bench(open_artifact(path), cfg, target)


def measure_in_fresh_process(path: Path, cfg: BenchConfig, target) -> dict:
    """run_bench in a new Python process (spawned, not forked): a recipe's process already holds torch, the models
    of earlier stages and their allocator caches, which would count in the peak RSS and steal cache. The child
    imports only what the runtime needs, as a device would; errors come back as the same typed exceptions."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_bench_child, (str(path), cfg, target))


def bench_stage(src: Artifact, cfg: BenchConfig, target, out: Path, *, force: bool = False, progress=None) -> Artifact:
    from edgepack.targets import load_target

    check_output_dir(Path(out), force, [src.path])
    target = target if target is not None else load_target("local")
    t0 = time.perf_counter()
    present, reason = hardware_present(target)
    if present:
        if progress:
            progress(f"bench: measuring {src.path.name} in a fresh process")
        rec = {**measure_in_fresh_process(src.path, cfg, target), "measured": True}  # checks the target first
    else:
        rec = predict_bench(src, cfg, target, reason)
    with ArtifactWriter(out, force=force, inputs=[src.path]) as w:
        link_files(src, w.path)
        record = stage_record("bench", asdict(cfg), time.perf_counter() - t0, rec, target=target.name,
                              parent=src.digest())
        return w.commit(format=src.format, record=record, parent=src, extra=src.extra)
