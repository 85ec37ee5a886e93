"""`edgepack quantize`: the quantize stage as a one-stage command. torch-free at import time."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.commands import _report_artifact, force_opt, json_opt, trust_opt

METHOD_NAMES = ("int8", "int4-rtn", "int4-gptq", "int4-hqq", "int4-awq", "nf4", "fp8", "int4-gptq-kd")  # = compress.quantize.METHODS


@click.command("quantize")
@click.argument("model")
@click.option("--method", "-m", required=True, type=click.Choice(METHOD_NAMES),
              help="int8 (per channel), int4-rtn, int4-gptq / int4-awq (calibrated), int4-gptq-kd (GPTQ refined by "
                   "distillation from the fp32 model, best quality, slower), int4-hqq, nf4 (bitsandbytes), fp8.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@click.option("--target", "target_name", help="Target name or TOML: decides what is legal and the default format.")
@click.option("--format", "fmt", type=click.Choice(("onnx", "torch")),
              help="onnx (onnxruntime MatMulNBits / dynamic int8) or torch [default: the target's preferred runtime; "
                   "torch without a target].")
@click.option("--group-size", default=32, show_default=True, help="INT4 input channels per scale (power of two >= 16).")
@click.option("--symmetric", is_flag=True, help="INT4 symmetric grid (no zero points).")
@click.option("--accuracy-level", default=4, show_default=True,
              help="ONNX MatMulNBits compute precision: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.")
@click.option("--calib", type=click.Path(), help="Calibration text [default: the embedded TinyStories sample].")
@click.option("--calib-samples", default=64, show_default=True, help="Calibration sequences.")
@click.option("--calib-seq-len", default=256, show_default=True, help="Tokens per calibration sequence.")
@click.option("--eval-text", type=click.Path(),
              help="Evaluation text [default: the held-out last 10% of the calibration text].")
@click.option("--eval-max-tokens", type=int, help="Score at most this many tokens.")
@click.option("--max-ppl-increase", type=float, help="Fail (write nothing) when perplexity rises more than this (%).")
@click.option("--kd-steps", default=300, show_default=True, help="int4-gptq-kd: distillation steps after GPTQ.")
@click.option("--seed", default=0, show_default=True, help="int4-gptq-kd: seed of the distillation batch order.")
@force_opt
@trust_opt
@json_opt
def quantize_cmd(model, method, output, target_name, fmt, group_size, symmetric, accuracy_level, calib, calib_samples,
                 calib_seq_len, eval_text, eval_max_tokens, max_ppl_increase, kd_steps, seed, force, trust_pickle,
                 as_json):
    """Quantize MODEL's weights and prove the quality: perplexity before/after and logits SQNR in the manifest."""
    from edgepack.artifact import check_output_dir, open_artifact
    from edgepack.compress.quantize import QuantizeConfig, check_legal, quantize
    from edgepack.config import build_config
    from edgepack.targets import load_target

    raw = {"method": method, "format": fmt, "group_size": group_size, "symmetric": symmetric,
           "accuracy_level": accuracy_level, "calib": calib or "", "calib_samples": calib_samples,
           "calib_seq_len": calib_seq_len, "eval_text": eval_text or "", "eval_max_tokens": eval_max_tokens,
           "max_ppl_increase": max_ppl_increase, "kd_steps": kd_steps, "seed": seed}
    cfg = build_config(QuantizeConfig, raw, "quantize")
    target = load_target(target_name) if target_name else None
    check_legal(cfg, target)  # before any weight loads
    check_output_dir(Path(output), force)
    art = quantize(open_artifact(model, trust_pickle=trust_pickle), cfg, target, Path(output), force=force)
    _report_artifact(art, as_json)
