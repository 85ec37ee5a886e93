"""Commands `export onnx`, `compile` and `generate`. No torch / onnx import at module level (`edgepack --help`
stays light); the library does the work and these print a table or --json."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgepack.commands import _report_artifact, force_opt, json_opt, trust_opt
from edgepack.output import emit_json, fmt_bytes, print_table


@click.group("export")
def export_group():
    """Export a model to a deployable format."""


@export_group.command("onnx")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@click.option("--exporter", type=click.Choice(("dynamo", "torchscript")), default="dynamo", show_default=True,
              help="torch.onnx exporter (torchscript is ~10x faster to export; both are validated).")
@click.option("--opset", default=18, show_default=True, help="ONNX opset.")
@click.option("--atol", default=1e-4, show_default=True, help="Max |logit diff| against PyTorch on the fixed probe.")
@click.option("--greedy-tokens", default=64, show_default=True, help="Greedy tokens compared with PyTorch (0 = skip).")
@click.option("--target", "target_name", help="Check the target runs onnxruntime before exporting.")
@force_opt
@trust_opt
@json_opt
def export_onnx_cmd(model, output, exporter, opset, atol, greedy_tokens, target_name, force, trust_pickle, as_json):
    """Export MODEL (a Hugging Face checkpoint) as ONNX with KV cache, validated against PyTorch."""
    from edgepack.artifact import check_output_dir, open_artifact
    from edgepack.config import build_config
    from edgepack.deploy.onnx_export import ExportConfig, check_target, export_onnx
    from edgepack.targets import load_target

    cfg = build_config(ExportConfig, {"exporter": exporter, "opset": opset, "atol": atol, "greedy_tokens": greedy_tokens},
                       "export onnx")
    target = load_target(target_name) if target_name else None
    check_target(target)
    check_output_dir(Path(output), force)  # before loading any weights
    art = export_onnx(open_artifact(model, trust_pickle=trust_pickle), cfg, target, Path(output), force=force)
    _report_artifact(art, as_json)


@click.command("compile")
@click.argument("model")
@click.option("--target", "target_name", required=True, help="Target name, 'local', or a TOML path.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@click.option("--precision", type=click.Choice(("fp32", "int8", "int4", "fp16", "bf16", "fp8")),
              help="Weight precision [default: the fastest the target runs that this build can make; CUDA targets: "
                   "bf16/fp16, int8/int4/fp8 weight-only on torch-cuda].")
@click.option("--runtime", help="Runtime [default: the target's preferred].")
@click.option("--int4-method", default="int4-rtn", show_default=True, help="int4 quantizer: int4-rtn | int4-gptq | int4-hqq | int4-awq | int4-gptq-kd.")
@click.option("--group-size", default=32, show_default=True, help="int4 block size (input channels per scale).")
@click.option("--exporter", type=click.Choice(("dynamo", "torchscript")), default="dynamo", show_default=True)
@click.option("--builder", type=click.Choice(("auto", "edgepack", "genai")), default="auto", show_default=True,
              help="edgepack: torch.onnx export (+ quantize stage); genai: onnxruntime-genai model builder; "
                   "auto: genai for CPU int4 where it can build the model.")
@click.option("--measure-tokens", default=32, show_default=True, help="Decode this many tokens to record speed (0 = skip).")
@click.option("--threads", type=int, help="onnxruntime intra-op threads [default: physical cores].")
@click.option("--max-context", default=0, show_default=True,
              help="GPU runtimes: static KV cache / TensorRT profile length in tokens (0 = the model's, <= 4096).")
@click.option("--max-batch", default=1, show_default=True, help="GPU runtimes: largest batch.")
@click.option("--torch-compile/--no-torch-compile", default=True, show_default=True,
              help="torch-cuda: torch.compile the decode step before capturing it in a CUDA graph.")
@force_opt
@trust_opt
@json_opt
def compile_cmd(model, target_name, output, precision, runtime, int4_method, group_size, exporter, builder,
                measure_tokens, threads, max_context, max_batch, torch_compile, force, trust_pickle, as_json):
    """Compile MODEL into a runnable artifact for a target (CPU: onnxruntime, int4 MatMulNBits by default)."""
    from edgepack.artifact import check_output_dir, open_artifact
    from edgepack.config import build_config
    from edgepack.deploy.compile import CompileConfig, choose_path, compile_stage
    from edgepack.targets import load_target

    cfg = build_config(CompileConfig, {"precision": precision, "runtime": runtime, "int4_method": int4_method,
                                       "group_size": group_size, "exporter": exporter, "builder": builder,
                                       "measure_tokens": measure_tokens, "threads": threads,
                                       "max_context": max_context, "max_batch": max_batch,
                                       "torch_compile": torch_compile}, "compile")
    target = load_target(target_name)
    src = open_artifact(model, trust_pickle=trust_pickle)
    choose_path(cfg, target, src.extra.get("precision", "fp32") if src.format == "onnx" else None)  # fail fast
    check_output_dir(Path(output), force)
    art = compile_stage(src, cfg, target, Path(output), force=force)
    rec = art.history[-1]
    if as_json:
        emit_json({"path": str(art.path), "format": art.format, "extra": art.extra, "metrics": rec["metrics"],
                   "seconds": rec["seconds"]})
        return
    m = rec["metrics"]
    rows = [[art.extra["runtime"], art.extra["precision"], art.extra.get("made_by", "-"), fmt_bytes(art.size_bytes()),
             f"{m['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in m else "-", f"{rec['seconds']:.1f}"]]
    print_table(f"compile for {target.name}: wrote {art.path}", ["runtime", "precision", "made by", "size",
                                                                 "decode tok/s", "seconds"], rows,
                caption=m.get("note") or m.get("speed_note") or f"run it: edgepack generate {art.path} --prompt 'Once upon a time'")


@click.command("generate")
@click.argument("artifact")
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, help="1 = off.")
@click.option("--seed", type=int, help="Sampling seed (same seed, same text).")
@click.option("--runtime", help="Runtime [default: the artifact's own].")
@click.option("--threads", type=int, help="Runtime threads.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@trust_opt
@json_opt
def generate_cmd(artifact, prompt, max_new_tokens, temperature, top_k, top_p, seed, runtime, threads, ignore_eos,
                 trust_pickle, as_json):
    """Print a continuation of PROMPT from any runnable artifact, with its speed."""
    from edgepack.artifact import open_artifact
    from edgepack.config import build_config
    from edgepack.deploy.generation import GenerationConfig, generate
    from edgepack.deploy.runtime import open_runtime
    from edgepack.hf import load_tokenizer

    art = open_artifact(artifact, trust_pickle=trust_pickle)
    tok = load_tokenizer(art.path)
    stop = () if ignore_eos or tok.eos_token_id is None else (int(tok.eos_token_id),)
    gcfg = build_config(GenerationConfig, {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                           "top_k": top_k, "top_p": top_p, "seed": seed, "stop_token_ids": stop},
                        "generate")
    rt = open_runtime(art, runtime or art.extra.get("runtime"), threads=threads)
    ids = tok(prompt)["input_ids"]
    new: list[int] = []
    shown = [0]

    def stream(next_ids):
        new.append(int(next_ids[0]))
        if not as_json:
            text = tok.decode(new, skip_special_tokens=True)
            sys.stdout.write(text[shown[0]:])
            sys.stdout.flush()
            shown[0] = len(text)

    if not as_json:
        sys.stdout.write(prompt)
    res = generate(rt, [ids], gcfg, on_token=stream)
    text = tok.decode(new, skip_special_tokens=True)
    stats = {"prompt_tokens": res.prompt_tokens, "new_tokens": len(new), "ttft_s": round(res.ttft_s, 5),
             "decode_tokens_per_s": round(res.decode_tokens_per_s, 2) if len(new) > 1 else None, "stopped": res.stopped,
             **rt.describe()}
    if as_json:
        emit_json({"prompt": prompt, "text": text, "tokens": new, **stats})
        return
    click.echo("")
    tps = f"{stats['decode_tokens_per_s']:.1f} tokens/s" if stats["decode_tokens_per_s"] else "-"
    click.echo(f"[{stats['runtime']} {stats.get('precision', '')}: {len(new)} tokens, first after "
               f"{res.ttft_s * 1000:.1f} ms, decode {tps}, stopped by {res.stopped}]".replace("  ", " "), err=True)
