"""The README's command examples cannot drift from the CLI: every `edgepack ...` command line in its code blocks and
inline code names a real command and only options that command has; the cheap ones run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgepack.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    """Every `edgepack ...` command in README.md: code-block lines (an indented line that starts with '[' or '--'
    continues the one above) and inline code spans, without the `.venv/bin/` prefix and trailing comments."""
    text = README.read_text()
    cmds: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].rstrip()
            stripped = line.strip()
            if cmds and line[:1].isspace() and stripped[:1] in ("[", "-") and cmds[-1] is not None:
                cmds[-1] += " " + stripped
                continue
            stripped = stripped.removeprefix(".venv/bin/")
            cmds.append(stripped if stripped.startswith("edgepack ") else None)
    cmds = [c for c in cmds if c]
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        span = span.removeprefix(".venv/bin/")
        if span.startswith("edgepack ") and " " in span:
            cmds.append(span)
    return cmds


def _resolve(tokens: list[str]) -> tuple[click.Command, list[str]]:
    """(command, the tokens after its name) for `edgepack a b ...`."""
    cmd, rest = cli, tokens
    ctx = click.Context(cli)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            if cmd.name == "bench":  # `bench ARTIFACT` is `bench run ARTIFACT`
                sub = cmd.get_command(ctx, "run")
                cmd = sub
                break
            return None, rest
        cmd, rest = sub, rest[1:]
    return cmd, rest


def _flags(cmd_line: str) -> list[str]:
    line = cmd_line.replace("\\|", " ").replace("|", " ").replace("[", " ").replace("]", " ")
    try:
        tokens = shlex.split(line)
    except ValueError:
        tokens = line.split()
    return tokens


def test_every_readme_command_names_real_commands_and_options():
    cmds = readme_commands()
    assert len(cmds) >= 30, cmds  # the examples were found
    problems = []
    for c in cmds:
        tokens = _flags(c)[1:]
        cmd, rest = _resolve(tokens)
        if cmd is None and (rest[0].isupper() or rest[0] == "..."):  # a placeholder: `edgepack COMMAND --help`
            continue
        if cmd is None:
            problems.append(f"{c}: no command '{rest[0]}'")
            continue
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
        for t in rest:
            if " " in t:  # a quoted value, e.g. --bench-args "--prompt-len 64"
                continue
            flag = t.split("=")[0]
            if flag.startswith("-") and flag not in ("-", "--") and not re.fullmatch(r"-\d.*", flag) \
                    and flag not in known:
                problems.append(f"{c}: '{cmd.name}' has no option {flag}")
    assert not problems, "\n".join(problems)


def _required_part(cmd_line: str) -> str:
    """The command without its [optional] parts."""
    while re.search(r"\[[^\[\]]*\]", cmd_line):
        cmd_line = re.sub(r"\s*\[[^\[\]]*\]", "", cmd_line)
    return cmd_line


@pytest.mark.parametrize("command", ["targets", "fit", "inspect"])
def test_cheap_readme_examples_run(command, stories):
    """The README's own lines for the cheap commands, placeholders filled in, run and succeed."""
    fill = {"MODEL": str(stories), "PATH": str(stories), "T": "cpu-x86-64", "NAME": "cpu-x86-64"}
    lines = [c for c in readme_commands() if c.split()[1] == command and len(c.split()) > 2]
    assert lines, command
    for line in lines:
        tokens = [fill.get(t, t) for t in shlex.split(_required_part(line))[1:]]
        if any(t.isupper() for t in tokens):
            continue
        res = CliRunner().invoke(cli, tokens)
        assert res.exit_code == 0, (line, res.output)
