"""A setting has one default: every stage command's option that is a config field has the dataclass's default and
choices, and carries the field's name (so the CLI and recipes use one name per setting). Options that are not config
fields are listed per command; anything else is a setting that drifted from its dataclass."""

from __future__ import annotations

import pytest

from edgepack.bench.run import BenchConfig
from edgepack.cli import cli
from edgepack.cli.common import field_choices, field_default
from edgepack.compress.distill import DistillConfig
from edgepack.compress.eval_stage import EvalConfig
from edgepack.compress.prune import PruneConfig
from edgepack.compress.quantize import QuantizeConfig
from edgepack.convert import ConvertConfig
from edgepack.deploy.bundle import BundleConfig
from edgepack.deploy.compile import CompileConfig
from edgepack.deploy.generation import GenerationConfig
from edgepack.deploy.onnx_export import ExportConfig
from edgepack.deploy.serve_engine import ServeConfig
from edgepack.tune.data import PrepareConfig
from edgepack.tune.qlora import TuneConfig

COMMON = {"output", "force", "trust_pickle", "as_json", "target_name", "help"}
# command path -> (config class, options that are not settings of it)
COMMANDS = {
    ("quantize",): (QuantizeConfig, set()),
    ("prune",): (PruneConfig, {"threads"}),
    ("distill",): (DistillConfig, {"student", "from_prune"}),
    ("tune", "qlora"): (TuneConfig, {"resume", "mix"}),
    ("tune", "prepare"): (PrepareConfig, {"strict", "model", "seq_len", "mix"}),
    ("compile",): (CompileConfig, set()),
    ("export", "onnx"): (ExportConfig, set()),
    ("generate",): (GenerationConfig, {"prompt", "runtime", "threads", "ignore_eos"}),
    ("bench", "run"): (BenchConfig, {"plot_path", "save_path"}),
    ("bundle",): (BundleConfig, set()),
    ("serve",): (ServeConfig, set()),
    ("eval",): (EvalConfig, {"baseline", "save_outputs"}),
    ("convert",): (ConvertConfig, set()),
}


def _command(path):
    import click

    ctx = click.Context(cli)
    cmd = cli
    for name in path:
        cmd = cmd.get_command(ctx, name)
    return cmd


def _normal(v):
    return tuple(v) if isinstance(v, list) else v


@pytest.mark.parametrize("path", list(COMMANDS), ids=[" ".join(p) for p in COMMANDS])
def test_options_take_defaults_and_choices_from_the_config(path):
    import click

    cls, extra = COMMANDS[path]
    fields = set(cls.__dataclass_fields__)
    for p in _command(path).params:
        if not isinstance(p, click.Option):
            continue
        assert p.name in fields or p.name in extra | COMMON, (
            f"{' '.join(path)} --{p.name.replace('_', '-')} is no {cls.__name__} field: rename it to the field's name "
            "so recipes and the command line agree, or list it here as a command-only option")
        if p.name not in fields:
            continue
        want = field_default(cls, p.name)
        if p.required:
            assert p.default is None
        elif isinstance(want, (tuple, list)):  # given as text: "a,b", or repeated for a multiple option
            assert p.default == (tuple(str(x) for x in want) if p.multiple else ",".join(str(x) for x in want)), p.name
        else:
            assert _normal(p.default) == _normal(want), f"{' '.join(path)} --{p.name}: {p.default!r} != {want!r}"
        choices = field_choices(cls, p.name)
        if choices:
            assert isinstance(p.type, click.Choice) and tuple(p.type.choices) == choices, p.name


def test_quantize_choices_are_the_registered_methods():
    from edgepack.compress.quant_methods import METHODS

    m = next(p for p in _command(("quantize",)).params if p.name == "method")
    assert tuple(m.type.choices) == (*METHODS, "auto")
    c = next(p for p in _command(("compile",)).params if p.name == "int4_method")
    assert set(c.type.choices) == {n for n, s in METHODS.items() if s.precision == "int4" and s.handler}
