"""`edgepack prune` and `edgepack distill`. Torch-free at import time: the library is imported inside the commands."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.commands import force_opt, json_opt, trust_opt
from edgepack.output import emit_json, fmt_bytes, fmt_num, print_table

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "2:4", "depth", "width")


def _layers(value: str | None) -> tuple[int, ...]:
    from edgepack.errors import ConfigError

    if not value:
        return ()
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated layer numbers, got '{value}'", "e.g. --layers 2,3") from None


@click.command("prune")
@click.argument("model")
@click.option("--method", required=True, type=click.Choice(PRUNE_METHODS), help="What to remove.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@click.option("--sparsity", default=0.5, show_default=True,
              help="Fraction removed: of weights (magnitude/wanda/sparsegpt), of layers (depth: 0.2 of 5 removes 1), "
                   "of MLP channels (width). 2:4 is always half.")
@click.option("--calib", type=click.Path(), default="",
              help="UTF-8 calibration text; its last --holdout fraction scores perplexity [default: embedded TinyStories].")
@click.option("--criterion", type=click.Choice(("magnitude", "wanda", "sparsegpt")), default="wanda", show_default=True,
              help="2:4 only: which weights of each 4 to zero.")
@click.option("--kv-sparsity", default=0.0, show_default=True, help="width only: fraction of KV groups removed too.")
@click.option("--layers", default=None, help="depth only: remove exactly these layers, e.g. 2 or 1,3.")
@click.option("--holdout", default=0.1, show_default=True, help="Held-out fraction of the calibration text.")
@click.option("--calib-tokens", default=16384, show_default=True, help="Calibration tokens used.")
@click.option("--eval-max-tokens", type=int, default=None, help="Score at most this many held-out tokens.")
@click.option("--max-ppl-ratio", type=float, default=None, help="Fail when perplexity after/before exceeds this.")
@click.option("--target", "target_name", default=None, help="Target profile (records whether it runs 2:4 kernels).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (1 avoids oversubscription on a busy CPU).")
@force_opt
@trust_opt
@json_opt
def prune_cmd(model, method, output, sparsity, calib, criterion, kv_sparsity, layers, holdout, calib_tokens,
              eval_max_tokens, max_ppl_ratio, target_name, threads, force, trust_pickle, as_json):
    """Prune MODEL: unstructured (magnitude, wanda, sparsegpt), 2:4, or structured depth / width (smaller model)."""
    from edgepack.artifact import check_output_dir, open_artifact
    from edgepack.compress.prune import PruneConfig, prune
    from edgepack.config import build_config
    from edgepack.targets import load_target

    raw = {"method": method, "sparsity": sparsity, "calib": calib or "", "criterion": criterion,
           "kv_sparsity": kv_sparsity, "layers": list(_layers(layers)), "holdout": holdout,
           "calib_tokens": calib_tokens, "eval_max_tokens": eval_max_tokens, "max_ppl_ratio": max_ppl_ratio}
    cfg = build_config(PruneConfig, raw, "prune")
    check_output_dir(Path(output), force)
    target = load_target(target_name) if target_name else None
    if threads:
        import torch

        torch.set_num_threads(threads)
    art = prune(open_artifact(model, trust_pickle=trust_pickle), cfg, target, Path(output), force=force)
    _report(art, as_json)


def _parse_from_prune(spec: str) -> dict:
    """'depth', 'depth:0.2', 'width:0.25' -> prune config keys."""
    from edgepack.errors import ConfigError

    method, _, frac = spec.partition(":") if not spec.startswith("2:4") else ("2:4", "", "")
    raw = {"method": method}
    if frac:
        try:
            raw["sparsity"] = float(frac)
        except ValueError:
            raise ConfigError(f"--student-from-prune '{spec}': '{frac}' is not a fraction",
                              "use METHOD or METHOD:SPARSITY, e.g. depth:0.2 or width:0.25") from None
    return raw


@click.command("distill")
@click.argument("teacher")
@click.option("--student", default=None, type=click.Path(), help="Student checkpoint (same tokenizer as TEACHER).")
@click.option("--student-from-prune", "from_prune", default=None,
              help="Make the student by pruning TEACHER: METHOD[:SPARSITY], e.g. depth:0.2 or width:0.25.")
@click.option("--data", required=True, type=click.Path(), help="UTF-8 training text (last --holdout fraction held out).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@click.option("--steps", default=400, show_default=True, help="Optimizer steps.")
@click.option("--max-seconds", type=float, default=None, help="Also stop after this much training time.")
@click.option("--alpha", default=0.7, show_default=True, help="Weight of cross-entropy (1 = plain fine-tuning).")
@click.option("--alpha-end", type=float, default=None, help="Schedule alpha linearly to this value.")
@click.option("--temperature", default=2.0, show_default=True, help="Softmax temperature of the KL term.")
@click.option("--lr", default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--warmup", default=20, show_default=True, help="Warmup steps.")
@click.option("--batch-size", default=16, show_default=True, help="Sequences per micro-batch.")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seq-len", default=256, show_default=True, help="Tokens per sequence.")
@click.option("--eval-every", default=50, show_default=True, help="Steps between held-out evaluations.")
@click.option("--patience", default=4, show_default=True, help="Evaluations without improvement before stopping.")
@click.option("--holdout", default=0.1, show_default=True, help="Held-out fraction of --data.")
@click.option("--teacher-cache", type=click.Choice(("memory", "none")), default="memory", show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@force_opt
@json_opt
def distill_cmd(teacher, student, from_prune, data, output, steps, max_seconds, alpha, alpha_end, temperature, lr,
                warmup, batch_size, grad_accum, seq_len, eval_every, patience, holdout, teacher_cache, threads, force,
                as_json):
    """Distill TEACHER into a student; re-running after an interruption resumes from the last checkpoint."""
    from edgepack.artifact import check_output_dir, open_artifact
    from edgepack.compress.distill import DistillConfig, checkpoint_dir, distill
    from edgepack.compress.prune import PruneConfig, prune
    from edgepack.config import build_config
    from edgepack.errors import ConfigError

    if (student is None) == (from_prune is None):
        raise ConfigError("give exactly one of --student and --student-from-prune",
                          "e.g. --student-from-prune depth:0.2")
    out = Path(output)
    check_output_dir(out, force)
    cfg = build_config(DistillConfig, {
        "data": str(data), "teacher": str(teacher), "holdout": holdout, "seq_len": seq_len, "batch_size": batch_size,
        "grad_accum": grad_accum, "max_steps": steps, "max_seconds": max_seconds, "lr": lr, "warmup_steps": warmup,
        "alpha": alpha, "alpha_end": alpha_end, "temperature": temperature, "eval_every": eval_every,
        "patience": patience, "teacher_cache": teacher_cache, "threads": threads}, "distill")
    teacher_art = open_artifact(teacher)
    if threads:  # the pruning below runs before the distill stage sets its threads
        import torch

        torch.set_num_threads(threads)
    if from_prune:
        pcfg = build_config(PruneConfig, {**_parse_from_prune(from_prune), "calib": str(data), "holdout": holdout},
                            "--student-from-prune")
        import hashlib
        import json
        from dataclasses import asdict

        key = hashlib.sha256(json.dumps([teacher_art.digest(), asdict(pcfg)], sort_keys=True).encode()).hexdigest()
        student_dir = checkpoint_dir(out) / f"student-{key[:12]}"
        if (student_dir / "edgepack.json").is_file():  # made by an interrupted earlier run: resume from it
            src = open_artifact(student_dir)
        else:
            src = prune(teacher_art, pcfg, None, student_dir, force=True)
    else:
        src = open_artifact(student)
    art = distill(src, cfg, None, out, force=force, show_progress=not as_json)
    _report(art, as_json)


def _report(art, as_json: bool) -> None:
    rec = art.history[-1]
    m = rec["metrics"]
    if as_json:
        emit_json({"path": str(art.path), "stage": rec["stage"], "seconds": rec["seconds"], "metrics": m})
        return
    keys = ("method", "teacher_ppl", "ppl_before", "ppl_after", "ppl_ratio", "ratio_to_teacher", "kl_to_teacher",
            "params_before", "params_after", "params_removed", "weights_zeroed", "sparsity", "bytes_before", "bytes",
            "removed_layers", "intermediate_size", "num_key_value_heads", "steps", "best_step", "stopped",
            "train_seconds", "storage")
    rows = [[k, fmt_bytes(m[k]) if k.startswith("bytes") else (fmt_num(m[k]) if not isinstance(m[k], list) else str(m[k]))]
            for k in keys if k in m]
    print_table(f"{rec['stage']}: wrote {art.path} in {rec['seconds']:.1f} s", ["metric", "value"], rows,
                caption=f"perplexity: {m['ppl_protocol']['name']} on the {m['ppl_protocol']['split']} of "
                        f"{m['ppl_protocol']['text']}")
