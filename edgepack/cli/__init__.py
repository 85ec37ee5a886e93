"""The `edgepack` command: a thin Click shell over the library. This package is the whole CLI: one module per
command group (targets, model, run, quantize, prune, tune, deploy, ship, serve, device, bench, report) and `common`
for what they share; the library never imports from here.

Commands are listed in COMMANDS as "module:attribute" and imported only when invoked, so `edgepack --help` imports
neither torch nor transformers. Library errors (EdgepackError) print as one line, problem then fix, exit code 1;
set EDGEPACK_DEBUG=1 to see the traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from edgepack.errors import EdgepackError

# name -> (module:attribute of a click command, one-line help shown by --help).
COMMANDS: dict[str, tuple[str, str]] = {
    "targets": ("edgepack.cli.targets:targets", "List hardware targets or show one profile."),
    "fit": ("edgepack.cli.targets:fit_cmd", "Will a model fit a target? Memory breakdown and decode roofline."),
    "eval": ("edgepack.cli.model:eval_cmd", "Perplexity of any artifact on a text (protocol edgepack-ppl-v1)."),
    "convert": ("edgepack.cli.model:convert_cmd", "Import a checkpoint as an artifact, optionally casting dtype."),
    "inspect": ("edgepack.cli.model:inspect_cmd", "Show an artifact's lineage, files and checksums."),
    "run": ("edgepack.cli.run:run_cmd", "Run a recipe of stages (resumable; --dry-run prints the plan)."),
    "demo": ("edgepack.cli.run:demo_cmd", "Run the embedded demo recipe end to end (offline)."),
    "quantize": ("edgepack.cli.quantize:quantize_cmd", "Quantize weights (int8/int4/nf4/fp8, onnx or torch) with measured quality."),
    "export": ("edgepack.cli.deploy:export_group", "Export a model: 'export onnx' (decoder with KV cache, validated), 'export gguf' (llama.cpp)."),
    "compile": ("edgepack.cli.deploy:compile_cmd", "Compile for a target: runtime + precision from its profile."),
    "generate": ("edgepack.cli.deploy:generate_cmd", "Generate text from any runnable artifact, with its speed."),
    "bundle": ("edgepack.cli.ship:bundle_cmd", "Package an artifact for one target: a verified device bundle."),
    "push": ("edgepack.cli.ship:push_cmd", "Ship a bundle to devices over SSH (resumable, verified, atomic)."),
    "rollback": ("edgepack.cli.ship:rollback_cmd", "Switch devices back to their previous release."),
    "remote": ("edgepack.cli.ship:remote_group", "On-device commands over SSH: status, prepare, bench."),
    "device": ("edgepack.cli.device:device_group", "Run on the device: 'device prepare' builds TensorRT engines."),
    "serve": ("edgepack.cli.serve:serve_cmd", "OpenAI-compatible HTTP server for a bundle or artifact."),
    "bench": ("edgepack.cli.bench:bench", "Measure tokens/s, TTFT, memory and bandwidth use; 'bench compare' reports."),
    "report": ("edgepack.cli.report:report_cmd", "Report on a recipe run: bundles, fit, ppl per stage, measured/predicted speed."),
    "prune": ("edgepack.cli.prune:prune_cmd", "Prune a model: magnitude, wanda, sparsegpt, 2:4, depth, width."),
    "distill": ("edgepack.cli.prune:distill_cmd", "Distill a teacher into a (pruned) student; resumable."),
    "tune": ("edgepack.cli.tune:tune_group", "Fine-tune on your data: 'tune prepare' data, 'tune qlora' (QLoRA/LoRA + merge)."),
}


class UserError(click.ClickException):
    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        mod, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(mod), attr)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(n, COMMANDS[n][1]) for n in sorted(COMMANDS)])

    def invoke(self, ctx):
        args = [*getattr(ctx, "_protected_args", ()), *ctx.args]
        try:
            return super().invoke(ctx)
        except EdgepackError as exc:
            if os.environ.get("EDGEPACK_DEBUG"):
                raise
            if "--json" in args:  # a script asked for JSON: the error is one JSON object too (stdout's last line)
                from edgepack.output import emit_json

                emit_json({"error": {"type": type(exc).__name__, "problem": " ".join(exc.problem.split()),
                                     "hint": " ".join(exc.hint.split()), "message": exc.one_line()}})
            raise UserError(exc.one_line()) from None
        except KeyboardInterrupt:
            click.echo("interrupted: nothing half-written was left behind; re-run to resume", err=True)
            sys.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgepack")
def cli():
    """edgepack: take a causal LM from a Hugging Face checkpoint to a measured, device-specific bundle.

    Every command that reports something takes --json (one JSON object, last line of stdout).
    Set EDGEPACK_DEBUG=1 to see tracebacks for errors.
    """
    quiet_libraries()


def quiet_libraries() -> None:
    """Hide what libraries print on import and use that a user can do nothing about (transformers / torch
    FutureWarnings and deprecations, torch's _pytree registration warnings, bitsandbytes' and torchao's failed optional
    kernel loads). EDGEPACK_DEBUG=1 shows all of it; edgepack's own warnings are printed by edgepack, not through
    the warnings module, so none of them is hidden."""
    if os.environ.get("EDGEPACK_DEBUG"):
        return
    import logging
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", module=r"torch\.utils\._pytree")
    for name in ("bitsandbytes", "torchao", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    cli(prog_name="edgepack")

