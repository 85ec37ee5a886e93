"""Build frozen config dataclasses from TOML/CLI dicts: unknown keys get a did-you-mean, wrong types are named,
and every problem is reported at once in one ConfigError."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from edgepack.errors import ConfigError, did_you_mean


def _type_ok(value: Any, tp) -> tuple[bool, Any]:
    """(accepted, coerced value) for a value against a simple annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        out = []
        for item in value:
            ok, v = _type_ok(item, args[0])
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out) if origin is tuple else out
    if origin is dict:
        return isinstance(value, dict), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return True, value


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


# settings that mean the same in every config that has them: the values they may take (None = unset is always fine)
MINIMUMS = {
    "threads": (lambda v: v >= 1, ">= 1 (CPU threads)"),
    "seq_len": (lambda v: v >= 1, ">= 1 (tokens)"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1 (tokens)"),
    "task_max_new_tokens": (lambda v: v >= 1, ">= 1 (tokens)"),
    "max_minutes": (lambda v: v > 0, "> 0 (minutes)"),
    "max_seconds": (lambda v: v > 0, "> 0 (seconds)"),
}


def build_config(cls, data: dict, where: str):
    """Instantiate dataclass `cls` from `data`, checking keys and types; then run its `validate()` if any."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}", "see the docs for the keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems, kwargs = [], {}
    for key, value in data.items():
        if key not in fields:
            problems.append(f"unknown key '{key}'{did_you_mean(key, fields)}")
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            problems.append(f"'{key}' must be {_type_name(hints[key])}, got {value!r}")
        else:
            kwargs[key] = coerced
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"missing required key '{name}'")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems), "valid keys: " + ", ".join(fields))
    problems = [f"'{k}' must be {MINIMUMS[k][1]}, got {v!r}" for k, v in kwargs.items()
                if k in MINIMUMS and v is not None and not MINIMUMS[k][0](v)]
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems), "fix the values named above")
    cfg = cls(**kwargs)
    check = getattr(cfg, "validate", None)
    if check is not None:
        errs = check()
        if errs:
            raise ConfigError(f"{where}: " + "; ".join(errs), "change the values named (each says what it must be)")
    return cfg


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def path_fields(cls) -> list[str]:
    """Names of fields that hold file paths (metadata {'path': True}); a recipe resolves them against its folder
    and hashes the files' content into the stage's output name."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("path")]
