"""The `edgepack` command: a thin Click shell over the library.

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

# name -> (module:attribute of a click command, one-line help shown by --help). Stage folders add their commands here.
COMMANDS: dict[str, tuple[str, str]] = {
    "targets": ("edgepack.commands:targets", "List hardware targets or show one profile."),
    "fit": ("edgepack.commands:fit_cmd", "Will a model fit a target? Memory breakdown and decode roofline."),
    "eval": ("edgepack.commands:eval_cmd", "Perplexity of any artifact on a text (protocol edgepack-ppl-v1)."),
    "convert": ("edgepack.commands:convert_cmd", "Import a checkpoint as an artifact, optionally casting dtype."),
    "inspect": ("edgepack.commands:inspect_cmd", "Show an artifact's lineage, files and checksums."),
    "run": ("edgepack.commands:run_cmd", "Run a recipe of stages (resumable; --dry-run prints the plan)."),
    "demo": ("edgepack.commands:demo_cmd", "Run the embedded demo recipe end to end (offline)."),
    "quantize": ("edgepack.compress.quantize_cli:quantize_cmd", "Quantize weights (int8/int4/nf4/fp8, onnx or torch) with measured quality."),
    "export": ("edgepack.deploy.cli:export_group", "Export a model: 'export onnx' (decoder with KV cache, validated)."),
    "compile": ("edgepack.deploy.cli:compile_cmd", "Compile for a target: runtime + precision from its profile."),
    "generate": ("edgepack.deploy.cli:generate_cmd", "Generate text from any runnable artifact, with its speed."),
    "bundle": ("edgepack.deploy.ship_cli:bundle_cmd", "Package an artifact for one target: a verified device bundle."),
    "push": ("edgepack.deploy.ship_cli:push_cmd", "Ship a bundle to devices over SSH (resumable, verified, atomic)."),
    "rollback": ("edgepack.deploy.ship_cli:rollback_cmd", "Switch devices back to their previous release."),
    "remote": ("edgepack.deploy.ship_cli:remote_group", "On-device commands over SSH: status, prepare, bench."),
    "device": ("edgepack.deploy.device:device_group", "Run on the device: 'device prepare' builds TensorRT engines."),
    "serve": ("edgepack.deploy.serve_cli:serve_cmd", "OpenAI-compatible HTTP server for a bundle or artifact."),
    "bench": ("edgepack.bench.cli:bench", "Measure tokens/s, TTFT, memory and bandwidth use; 'bench compare' reports."),
    "report": ("edgepack.bench.run_report:report_cmd", "Report on a recipe run: bundles, fit, ppl per stage, measured/predicted speed."),
    "prune": ("edgepack.compress.prune_cli:prune_cmd", "Prune a model: magnitude, wanda, sparsegpt, 2:4, depth, width."),
    "distill": ("edgepack.compress.prune_cli:distill_cmd", "Distill a teacher into a (pruned) student; resumable."),
    "tune": ("edgepack.tune.cli:tune_group", "Fine-tune on your data: 'tune prepare' data, 'tune qlora' (QLoRA/LoRA + merge)."),
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
        try:
            return super().invoke(ctx)
        except EdgepackError as exc:
            if os.environ.get("EDGEPACK_DEBUG"):
                raise
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


def main() -> None:
    cli(prog_name="edgepack")


if __name__ == "__main__":
    main()
