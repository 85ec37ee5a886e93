"""The layout keeps its promises: library modules import each other without loops, never reach for another module's
private names, never import the CLI, and hold no programs; measurement programs live in scripts/ and import only the
library. Static (AST) checks over every module of the wheel, so they cost no imports."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    """Every module of the wheel: dotted name -> file, from pyproject's package-dir mapping."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    out = {}
    for pkg in tool["packages"]:
        folder = ROOT / tool["package-dir"].get(pkg, pkg.replace(".", "/"))
        if pkg not in tool["package-dir"]:  # a nested package under a mapped parent
            parent = pkg.rsplit(".", 1)[0]
            folder = ROOT / tool["package-dir"][parent] / pkg.rsplit(".", 1)[1]
        for f in folder.glob("*.py"):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, str | None, int]]:
    """(imported edgepack module, imported name or None, line) for every import in the file, lazy ones included:
    an import inside a function is still a dependency, and a loop hidden in a function is still a loop. Imports
    under `if TYPE_CHECKING:` are left out (they never run)."""
    out = []
    pkg = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for stmt in node.body for n in ast.walk(stmt)}  # annotations only: no import at run time
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("edgepack")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if not mod.startswith("edgepack"):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub, None, node.lineno) if sub in known else (mod, a.name, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: {m for m, _, _ in imports(n, p, mods) if m in mods and m != n} for n, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    found = cycles(graph())
    assert not found, "import cycles (break them by moving the shared piece to a lower module):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_cycle_detector_sees_a_lazy_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules():
    mods = modules()
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name} from {mod}"
           for n, p in mods.items() for mod, name, line in imports(n, p, mods)
           if name and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))]
    assert not bad, "private names used across modules (make them public where they belong):\n" + "\n".join(bad)


def test_the_library_never_imports_the_cli():
    mods = modules()
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for n, p in mods.items() if not n.startswith("edgepack.cli")
           for mod, _, line in imports(n, p, mods) if mod == "edgepack.cli" or mod.startswith("edgepack.cli.")]
    assert not bad, "library modules importing the CLI package:\n" + "\n".join(bad)


def test_stage_folders_hold_library_code_only():
    """Programs (argparse, a __main__ block) live in scripts/, outside the wheel."""
    progs = []
    for n, p in modules().items():
        src = p.read_text()
        if n != "edgepack.cli.__main__" and ("__name__ == \"__main__\"" in src or "import argparse" in src):
            progs.append(str(p.relative_to(ROOT)))
    assert not progs, f"programs inside the package (move them to scripts/): {progs}"


def test_scripts_import_only_the_library():
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    assert len(scripts) >= 9
    names = {p.stem for p in scripts}
    bad = []
    for p in scripts:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{p.name}:{node.lineno} imports {m}" for m in mods
                        if m.split(".")[0] in names or m.startswith(("edgepack.scripts", "scripts"))]
    assert not bad, "scripts import each other (share through the library instead):\n" + "\n".join(bad)
