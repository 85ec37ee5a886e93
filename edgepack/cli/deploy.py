"""Commands `export onnx`, `compile` and `generate`. No torch / onnx import at module level (`edgepack --help`
stays light); the library does the work and these print a table or --json."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgepack.cli.common import config_from, config_option, force_opt, json_opt, open_model, report_artifact, trust_opt
from edgepack.deploy.compile import CompileConfig
from edgepack.deploy.generation import GenerationConfig
from edgepack.deploy.gguf_export import GgufConfig
from edgepack.deploy.onnx_export import ExportConfig
from edgepack.output import emit_json, fmt_bytes, print_table

C, G = CompileConfig, GenerationConfig


@click.group("export")
def export_group():
    """Export a model to a deployable format."""


@export_group.command("onnx")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@config_option(ExportConfig, "exporter", help="torch.onnx exporter (torchscript is ~10x faster to export; both are validated).")
@config_option(ExportConfig, "opset", help="ONNX opset.")
@config_option(ExportConfig, "atol", help="Max |logit diff| against PyTorch on the fixed probe.")
@config_option(ExportConfig, "greedy_tokens", help="Greedy tokens compared with PyTorch (0 = skip).")
@click.option("--target", "target_name", help="Check the target runs onnxruntime before exporting.")
@force_opt
@trust_opt
@json_opt
def export_onnx_cmd(model, output, target_name, force, trust_pickle, as_json, **settings):
    """Export MODEL (a Hugging Face checkpoint) as ONNX with KV cache, validated against PyTorch."""
    from edgepack.artifact import check_output_dir
    from edgepack.deploy.onnx_export import check_target, export_onnx
    from edgepack.targets import load_target

    cfg = config_from(ExportConfig, settings, "export onnx")
    target = load_target(target_name) if target_name else None
    check_target(target)
    check_output_dir(Path(output), force, [model])  # before loading any weights
    art = export_onnx(open_model(model, trust_pickle), cfg, target, Path(output), force=force)
    report_artifact(art, as_json)


@export_group.command("gguf")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory (model.gguf inside).")
@config_option(GgufConfig, "type", help="Float checkpoints: GGUF type of the linears (auto = f16); a torch-quant "
                                        "artifact writes its own codes (Q4_0 / Q4_1 / Q8_0, else the nearest type).")
@config_option(GgufConfig, "head_type", help="GGUF type of the embedding and lm_head.")
@force_opt
@trust_opt
@json_opt
def export_gguf_cmd(model, output, force, trust_pickle, as_json, **settings):
    """Write MODEL (a torch-quant artifact from `quantize --format torch`, or a float checkpoint) as GGUF for
    llama.cpp, read back and compared tensor by tensor with the weights it was made from."""
    from edgepack.artifact import check_output_dir, open_artifact
    from edgepack.deploy.gguf_export import export_gguf

    cfg = config_from(GgufConfig, settings, "export gguf")
    check_output_dir(Path(output), force)
    art = export_gguf(open_artifact(model, trust_pickle=trust_pickle), cfg, None, Path(output), force=force)
    m = art.history[-1]["metrics"]
    if as_json:
        emit_json({"path": str(art.path), "format": art.format, "extra": art.extra, "metrics": m})
        return
    rows = [[t, str(n)] for t, n in sorted(m["tensor_types"].items())]
    print_table(f"export gguf: wrote {art.path / art.extra['gguf_file']} ({fmt_bytes(m['bytes'])}, {m['arch']}, "
                f"mostly {m['file_type']})", ["GGUF type", "tensors"], rows,
                caption=f"read back: {m['tensors_checked']} tensors, worst {m['max_err_steps']} quantization steps "
                        "from our codes (fp16 scale rounding)")
    for source, n in sorted(m["sources"].items()):
        click.echo(f"{n:4d} tensors: {source}")


@click.command("compile")
@click.argument("model")
@click.option("--target", "target_name", required=True, help="Target name, 'local', or a TOML path.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@config_option(C, "precision", help="Weight precision [default: the fastest the target runs that this build can make; "
                                    "CUDA targets: bf16/fp16, int8/int4/fp8 on torch-cuda].")
@config_option(C, "runtime", help="Runtime [default: the target's preferred].")
@config_option(C, "int4_method", help="int4 quantizer.")
@config_option(C, "group_size", help="int4 block size (input channels per scale).")
@config_option(C, "exporter", help="torch.onnx exporter (builder edgepack).")
@config_option(C, "builder", help="edgepack: torch.onnx export (+ quantize stage); genai: onnxruntime-genai model "
                                  "builder; auto: genai for CPU int4 where it can build the model.")
@config_option(C, "measure_tokens", help="Decode this many tokens to record speed (0 = skip).")
@config_option(C, "threads", help="onnxruntime intra-op threads [default: the idle physical cores].")
@config_option(C, "max_context", help="GPU runtimes: static KV cache / TensorRT profile length in tokens (0 = the "
                                      "model's, <= 4096).")
@config_option(C, "max_batch", help="GPU runtimes: largest batch.")
@config_option(C, "torch_compile", help="torch-cuda: torch.compile the decode step before capturing it in CUDA graphs "
                                       "(off by default: it pays only where scripts/gpu_decode.py measured it to).")
@force_opt
@trust_opt
@json_opt
def compile_cmd(model, target_name, output, force, trust_pickle, as_json, **settings):
    """Compile MODEL into a runnable artifact for a target (CPU: onnxruntime, int4 MatMulNBits by default)."""
    from edgepack.artifact import check_output_dir
    from edgepack.deploy.compile import choose_path, compile_stage
    from edgepack.targets import load_target

    cfg = config_from(CompileConfig, settings, "compile")
    target = load_target(target_name)
    src = open_model(model, trust_pickle)
    choose_path(cfg, target, src.extra.get("precision", "fp32") if src.format == "onnx" else None)  # fail fast
    check_output_dir(Path(output), force, [model])
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
    if m.get("builder_fallback"):
        click.echo(f"note: {m['builder_fallback']}")
    if m.get("min_sqnr_db") is not None:
        click.echo(f"logits vs PyTorch: {m['sqnr_db']} dB SQNR (gate: >= {m['min_sqnr_db']} dB), argmax agreement "
                   f"{m.get('argmax_agreement', float('nan')):.0%}")
    for label, key in (("checked here", "checked_here"), ("only the GPU can check", "gpu_only")):
        for line in m.get(key) or []:
            click.echo(f"{label}: {line}")
    if m.get("ppl_after") is not None:
        click.echo(f"quality on the GPU kernels' exact weights (CPU emulation): perplexity {m['ppl_after']}"
                   + (f" ({m['ppl_delta_vs_quantized_pct']:+.3f}% vs the quantize stage's {m['ppl_quantized']})"
                      if m.get("ppl_quantized") is not None else ""))


@click.command("generate")
@click.argument("artifact")
@click.option("--prompt", required=True, help="Text to continue.")
@config_option(G, "max_new_tokens", help="Tokens to generate (at most).")
@config_option(G, "temperature", help="0 = greedy.")
@config_option(G, "top_k", help="0 = off.")
@config_option(G, "top_p", help="1 = off.")
@config_option(G, "seed", help="Sampling seed (same seed, same text).")
@click.option("--runtime", help="Runtime [default: the artifact's own].")
@click.option("--threads", type=click.IntRange(min=1), help="Runtime threads.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@trust_opt
@json_opt
def generate_cmd(artifact, prompt, runtime, threads, ignore_eos, trust_pickle, as_json, **settings):
    """Print a continuation of PROMPT from any runnable artifact or bundle (directory or .tar, as serve takes),
    with its speed."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgepack-generate-") as tmp:
        run_generate(artifact, prompt, runtime, threads, ignore_eos, trust_pickle, as_json, settings, tmp)


def run_generate(artifact, prompt, runtime, threads, ignore_eos, trust_pickle, as_json, settings, workdir,
              show_speed: bool = True) -> str:
    """Stream the continuation to stdout (or one JSON object); returns the generated text."""
    from edgepack.deploy.bundle import open_runnable
    from edgepack.deploy.generation import generate
    from edgepack.deploy.runtime import open_runtime
    from edgepack.facts import check_fits_context
    from edgepack.hf import load_tokenizer

    art, tok_dir, manifest, _ = open_runnable(artifact, workdir, trust_pickle=trust_pickle)
    tok = load_tokenizer(tok_dir)
    stop = () if ignore_eos or tok.eos_token_id is None else (int(tok.eos_token_id),)
    gcfg = config_from(GenerationConfig, settings, "generate", stop_token_ids=stop)
    rt = open_runtime(art, runtime or (manifest or {}).get("runtime") or art.extra.get("runtime"), threads=threads)
    ids = tok(prompt)["input_ids"]
    check_fits_context(art, len(ids) + gcfg.max_new_tokens, f"the prompt ({len(ids)} tokens) + --max-new-tokens")
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
    if not stats.get("precision"):
        from edgepack.facts import artifact_precision

        stats["precision"] = artifact_precision(art) or "fp32"
    if as_json:
        emit_json({"prompt": prompt, "text": text, "tokens": new, **stats})
        return text
    click.echo("")
    if not show_speed:
        return text
    tps = f"{stats['decode_tokens_per_s']:.1f} tokens/s" if stats["decode_tokens_per_s"] else "-"
    threads = (f", {stats['threads']} thread{'s' if stats['threads'] != 1 else ''} ({stats['threads_why']})"
               if stats.get("threads_why") else "")
    click.echo(f"[{stats['runtime']} {stats['precision']}: {len(new)} tokens, first after {res.ttft_s * 1000:.1f} ms "
               f"(cold: the first call), decode {tps} over this one run{threads}, stopped by {res.stopped}]", err=True)
    return text
