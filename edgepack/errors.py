"""Typed errors. The CLI prints each as one line, problem then fix, and exits 1 without a traceback.

Anything that is not an EdgepackError is a bug in edgepack and keeps its traceback.
"""

from __future__ import annotations

import difflib


class EdgepackError(Exception):
    """A user-facing error: `problem` says what is wrong, `hint` what to do about it."""

    def __init__(self, problem: str, hint: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        text = " ".join(self.problem.split())
        if self.hint:
            text += " -- " + " ".join(self.hint.split())
        return text


class ConfigError(EdgepackError):
    """A recipe, stage config, target TOML, model config.json or command-line option is wrong."""


class ArtifactError(EdgepackError):
    """A model directory or artifact is missing, incomplete, corrupt or unsafe to load."""


class UnsupportedOnTarget(EdgepackError):
    """The requested precision / runtime / method cannot run on the chosen target."""


class ValidationFailed(EdgepackError):
    """A stage's own check (export parity, quality gate) failed; the output was not written."""


class MissingDependency(EdgepackError):
    """An optional dependency is not installed. `install` replaces the extra's pip line where the extra is not what
    is needed (onnxruntime-gpu: the onnx extra installs the CPU build)."""

    def __init__(self, module: str, extra: str, why: str = "", install: str = ""):
        what = f"this needs the Python package '{module}'" + (f" ({why})" if why else "")
        super().__init__(what, "install it with: " + (install or f"pip install 'edgepack[{extra}]'"))
        self.module = module
        self.extra = extra


# onnxruntime and onnxruntime-gpu install the same module: the CPU build must go before the GPU build comes
ORT_GPU_INSTALL = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu (the 'onnx' extra is the CPU build)"


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require(module: str, extra: str, why: str = ""):
    """Import an optional module or raise MissingDependency naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(module, extra, why) from exc
