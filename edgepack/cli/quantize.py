"""`edgepack quantize`: the quantize stage as a one-stage command. torch-free at import time. Every option that is a
QuantizeConfig setting takes its default and choices from the dataclass (compress/quantize.py)."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.common import config_from, config_option, force_opt, json_opt, open_model, report_artifact, trust_opt
from edgepack.compress.quantize import QuantizeConfig

Q = QuantizeConfig


@click.command("quantize")
@click.argument("model")
@config_option(Q, "method", "--method", "-m",
               help="int8 (per channel), int4-rtn, int4-gptq / int4-awq (calibrated), int4-gptq-kd (GPTQ refined by "
                    "distillation from the fp32 model, best quality, slower), int4-hqq, nf4 (bitsandbytes), fp8, or "
                    "auto (the best the target runs).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@click.option("--target", "target_name", help="Target name or TOML: decides what is legal and the default format.")
@config_option(Q, "format", help="onnx (onnxruntime MatMulNBits / dynamic int8) or torch [default: the target's "
                                 "preferred runtime; torch without a target].")
@config_option(Q, "group_size", help="INT4 input channels per scale (power of two >= 16).")
@config_option(Q, "symmetric", help="INT4 symmetric grid (no zero points).")
@config_option(Q, "quantize_embeddings", help="TensorRT (Jetson) Q/DQ graphs: token embedding and lm_head in "
                                              "INT8 too (per row / per output channel).")
@config_option(Q, "accuracy_level",
               help="ONNX MatMulNBits compute precision: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.")
@config_option(Q, "calib", type=click.Path(), help="Calibration text [default: the embedded TinyStories sample].")
@config_option(Q, "calib_samples", help="Calibration sequences.")
@config_option(Q, "calib_seq_len", help="Tokens per calibration sequence.")
@config_option(Q, "eval_text", type=click.Path(),
               help="Evaluation text [default: the held-out last 10% of the calibration text].")
@config_option(Q, "eval_max_tokens", help="Score at most this many tokens.")
@config_option(Q, "max_ppl_increase", help="Fail (write nothing) when perplexity rises more than this (%).")
@config_option(Q, "kd_steps", help="int4-gptq-kd: distillation steps after GPTQ.")
@config_option(Q, "seed", help="int4-gptq-kd: seed of the distillation batch order.")
@config_option(Q, "threads", help="torch CPU threads (1 avoids oversubscription on a busy CPU) [default: torch's].")
@config_option(Q, "task", type=click.Path(), help="Task file (held-out instruction / choice items): task metrics before/after.")
@config_option(Q, "task_samples", help="Task items scored.")
@config_option(Q, "max_task_drop", help="Fail (write nothing) when the task metric falls more than this (points).")
@force_opt
@trust_opt
@json_opt
def quantize_cmd(model, output, target_name, force, trust_pickle, as_json, **settings):
    """Quantize MODEL's weights and prove the quality: perplexity before/after and logits SQNR in the manifest."""
    from edgepack.artifact import check_output_dir
    from edgepack.compress.quantize import check_legal, quantize
    from edgepack.targets import load_target

    cfg = config_from(QuantizeConfig, settings, "quantize", task=str(settings["task"] or ""))
    target = load_target(target_name) if target_name else None
    check_legal(cfg, target)  # before any weight loads
    check_output_dir(Path(output), force, [model])
    art = quantize(open_model(model, trust_pickle), cfg, target, Path(output), force=force)
    report_artifact(art, as_json)
