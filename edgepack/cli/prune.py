"""`edgepack prune` and `edgepack distill`. Torch-free at import time: the library is imported inside the commands.
Options that are PruneConfig / DistillConfig settings take their defaults and choices from the dataclasses."""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.common import config_from, config_option, force_opt, json_opt, open_model, trust_opt
from edgepack.compress.distill import DistillConfig
from edgepack.compress.prune import PruneConfig
from edgepack.output import emit_json, fmt_bytes, fmt_num, print_table

P, D = PruneConfig, DistillConfig


def _layers(value: str | None) -> tuple[int, ...]:
    from edgepack.errors import ConfigError

    if not value:
        return ()
    try:
        return tuple(int(x) for x in str(value).split(","))
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated layer numbers, got '{value}'", "e.g. --layers 2,3") from None


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@click.command("prune")
@click.argument("model")
@config_option(P, "method", required=True, help="What to remove.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@config_option(P, "sparsity",
               help="Fraction removed: of weights (magnitude/wanda/sparsegpt), of layers (depth: 0.2 of 5 removes 1), "
                    "of MLP channels (width). 2:4 is always half.")
@config_option(P, "calib", type=click.Path(),
               help="UTF-8 calibration text; its last --holdout fraction scores perplexity [default: embedded TinyStories].")
@config_option(P, "criterion", help="2:4 only: which weights of each 4 to zero.")
@config_option(P, "kv_sparsity", help="width only: fraction of KV groups removed too.")
@config_option(P, "layers", type=str, help="depth only: remove exactly these layers, e.g. 2 or 1,3.")
@config_option(P, "holdout", help="Held-out fraction of the calibration text.")
@config_option(P, "calib_tokens", help="Calibration tokens used.")
@config_option(P, "eval_max_tokens", help="Score at most this many held-out tokens.")
@config_option(P, "max_ppl_ratio", help="Fail when perplexity after/before exceeds this.")
@config_option(P, "task", type=click.Path(), help="Task file (held-out instruction / choice items): task metrics before/after.")
@config_option(P, "task_samples", help="Task items scored.")
@config_option(P, "max_task_drop", help="Fail (write nothing) when the task metric falls more than this (points).")
@click.option("--target", "target_name", default=None, help="Target profile (records whether it runs 2:4 kernels).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (1 avoids oversubscription on a busy CPU).")
@force_opt
@trust_opt
@json_opt
def prune_cmd(model, output, target_name, threads, force, trust_pickle, as_json, **settings):
    """Prune MODEL: unstructured (magnitude, wanda, sparsegpt), 2:4, or structured depth / width (smaller model)."""
    from edgepack.artifact import check_output_dir
    from edgepack.compress.prune import prune
    from edgepack.targets import load_target

    cfg = config_from(PruneConfig, settings, "prune", layers=list(_layers(settings.get("layers"))))
    check_output_dir(Path(output), force, [model])
    target = load_target(target_name) if target_name else None
    _set_threads(threads)
    art = prune(open_model(model, trust_pickle), cfg, target, Path(output), force=force)
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
@config_option(D, "data", type=click.Path(), required=True,
               help="UTF-8 training text (last --holdout fraction held out).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output artifact directory.")
@config_option(D, "steps", help="Optimizer steps.")
@config_option(D, "max_seconds", help="Also stop after this much training time.")
@config_option(D, "alpha", help="Weight of cross-entropy (1 = plain fine-tuning).")
@config_option(D, "alpha_end", help="Schedule alpha linearly to this value.")
@config_option(D, "temperature", help="Softmax temperature of the KL term.")
@config_option(D, "lr", help="Peak learning rate.")
@config_option(D, "warmup_steps", help="Linear warm-up steps (then cosine decay).")
@config_option(D, "batch_size", help="Sequences per micro-batch.")
@config_option(D, "grad_accum", help="Micro-batches per optimizer step.")
@config_option(D, "seq_len", help="Tokens per sequence.")
@config_option(D, "eval_every", help="Steps between held-out evaluations.")
@config_option(D, "patience", help="Evaluations without improvement before stopping.")
@config_option(D, "holdout", help="Held-out fraction of --data.")
@config_option(D, "teacher_cache", help="memory: float16 teacher logits cached per chunk; none: recompute.")
@config_option(D, "threads", help="torch CPU threads.")
@config_option(D, "task", type=click.Path(), help="Task file (held-out instruction / choice items): task metrics before/after.")
@config_option(D, "task_samples", help="Task items scored.")
@config_option(D, "max_task_drop", help="Fail (write nothing) when the task metric falls more than this (points).")
@force_opt
@json_opt
def distill_cmd(teacher, student, from_prune, output, force, as_json, **settings):
    """Distill TEACHER into a student; re-running after an interruption resumes from the last checkpoint."""
    from edgepack.artifact import check_output_dir, open_artifact
    from edgepack.compress.distill import checkpoint_dir, distill
    from edgepack.compress.prune import prune
    from edgepack.config import build_config
    from edgepack.errors import ConfigError

    if (student is None) == (from_prune is None):
        raise ConfigError("give exactly one of --student and --student-from-prune",
                          "e.g. --student-from-prune depth:0.2")
    out = Path(output)
    check_output_dir(out, force, [teacher, student])
    cfg = config_from(DistillConfig, settings, "distill", data=str(settings["data"]), teacher=str(teacher))
    teacher_art = open_model(teacher)
    _set_threads(cfg.threads)  # the pruning below runs before the distill stage sets its threads
    if from_prune:
        pcfg = build_config(PruneConfig, {**_parse_from_prune(from_prune), "calib": cfg.data, "holdout": cfg.holdout},
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
