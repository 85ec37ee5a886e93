"""The quantize methods: each name registers with what it needs (precision, formats, calibration, dependencies) and
with its handler, the model-level verb that quantizes a float model's decoder linears in place and returns the
codes. The stage (compress/quantize.py) and the ONNX writer (compress/quant_onnx.py) both dispatch through this
table, so a new method is one registered function (the pattern of torchao's register_quantize_module_handler).

Light at import time (no torch): the CLI reads the names from here for its choices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgepack.errors import ConfigError


@dataclass(frozen=True)
class Method:
    precision: str  # what the target must list in `precisions`
    formats: tuple[str, ...]  # artifact paths that implement it
    calibrated: bool  # needs calibration text
    requires: tuple[str, str] | None = None  # (python module, edgepack extra) checked before any weight loads
    # handler(model, cfg, calib, info) -> {linear name: QuantizedWeight}; None: a float format written directly by
    # the torch path (nf4, fp8), which has no integer codes
    handler: Callable | None = None


# name -> Method, in the order the CLI lists them. The names are what other tools rely on.
METHODS: dict[str, Method] = {}


def register_method(name: str, *, precision: str, formats: tuple[str, ...] = ("onnx", "torch"),
                    calibrated: bool = False, requires: tuple[str, str] | None = None):
    """Decorator: `fn(model, cfg, calib, info) -> codes` becomes the handler of method `name`."""
    def deco(fn):
        if name in METHODS:
            raise ValueError(f"quantize method '{name}' is registered twice")
        METHODS[name] = Method(precision, formats, calibrated, requires, fn)
        return fn

    return deco


def register_float_method(name: str, *, precision: str, formats: tuple[str, ...], requires=None) -> None:
    METHODS[name] = Method(precision, formats, False, requires, None)


def quantize_weights_(model, cfg, calib=None, info: dict | None = None) -> dict:
    """The model-level verb for the integer methods: quantize every decoder linear of `model` in place with the
    handler of cfg.method and return the codes ({name: QuantizedWeight}). `info`, when given, receives what a
    method measured about itself (int4-gptq-kd: held-out KL before / after distillation)."""
    spec = METHODS.get(cfg.method)
    if spec is None or spec.handler is None:
        ints = [m for m, s in METHODS.items() if s.handler is not None]
        raise ConfigError(f"'{cfg.method}' is not an integer method", f"integer methods: {', '.join(ints)}")
    return spec.handler(model, cfg, calib, info if info is not None else {})


# ------------------------------------------------------------------------------------------------------ handlers
@register_method("int8", precision="int8")
def _int8(model, cfg, calib, info):
    """Per output channel, symmetric, round to nearest."""
    from edgepack.compress import quant_algos as qa

    return qa.weight_only_model_(model, "rtn", bits=8, group_size=0, symmetric=True)


@register_method("int4-rtn", precision="int4")
def _int4_rtn(model, cfg, calib, info):
    from edgepack.compress import quant_algos as qa

    return qa.weight_only_model_(model, "rtn", 4, cfg.group_size, cfg.symmetric)


@register_method("int4-gptq", precision="int4", calibrated=True)
def _int4_gptq(model, cfg, calib, info):
    from edgepack.compress import quant_algos as qa

    return qa.gptq_model_(model, calib, 4, cfg.group_size, cfg.symmetric)


@register_method("int4-hqq", precision="int4")
def _int4_hqq(model, cfg, calib, info):
    from edgepack.compress import quant_algos as qa

    return qa.weight_only_model_(model, "hqq", 4, cfg.group_size)


@register_method("int4-awq", precision="int4", calibrated=True)
def _int4_awq(model, cfg, calib, info):
    """Activation-aware scales folded into the norms, then round-to-nearest."""
    from edgepack.compress import quant_algos as qa

    qa.awq_scale_(model, calib, 4, cfg.group_size, cfg.symmetric)
    return qa.weight_only_model_(model, "rtn", 4, cfg.group_size, cfg.symmetric)


register_float_method("nf4", precision="nf4", formats=("torch",), requires=("bitsandbytes", "tune"))
register_float_method("fp8", precision="fp8", formats=("torch",))


@register_method("int4-gptq-kd", precision="int4", calibrated=True)
def _int4_gptq_kd(model, cfg, calib, info):
    """GPTQ, then codes and scales refined by distillation from the float model (compress/quant_refine.py)."""
    from edgepack.compress.quant_refine import gptq_kd_model_
    from edgepack.progress import progress

    with progress(f"int4-gptq-kd: GPTQ, then {cfg.kd_steps} distillation steps", total=cfg.kd_steps) as update:
        codes, kd = gptq_kd_model_(model, calib, 4, cfg.group_size, cfg.symmetric, gptq_samples=cfg.calib_samples,
                                   steps=cfg.kd_steps, seed=cfg.seed, progress=update)
    info.update(kd)
    return codes
