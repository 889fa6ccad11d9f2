"""The shape of the code: dependencies point one way (CLI → api → the rest of the core), no cycles between the
core's parts, config knows no models, and no module outgrows one screenful of concepts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

CORE = ROOT / "mergevq_core"
MAX_LINES = 450


def _modules(pkg: Path) -> dict[str, Path]:
    """Dotted module name → file, for every .py under `pkg`."""
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        parts = list(f.relative_to(pkg.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module `path` imports anywhere (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import checkpoint` names a module
    return found


MODULES = _modules(CORE)
IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(module: str) -> str | None:
    """The top-level part of the core a module belongs to: `mergevq_core.models.gpt` → `models`."""
    parts = module.split(".")
    if parts[0] != "mergevq_core" or len(parts) < 2:
        return None
    return parts[1]


def test_the_core_never_imports_the_front_end():
    for name, imported in IMPORTS.items():
        bad = {m for m in imported if m.split(".")[0] in ("mergevq_cli", "typer", "rich") or m == "mergevq_core.api"
               or m.startswith("mergevq_core.api.")}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_config_imports_no_model_and_no_torch():
    for name, imported in IMPORTS.items():
        if _part(name) == "config":
            bad = {m for m in imported if _part(m) in ("models", "generators", "train", "eval", "data", "bench")
                   or m.split(".")[0] == "torch"}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_no_import_cycle_between_the_parts_of_the_core():
    edges: dict[str, set[str]] = {}
    for name, imported in IMPORTS.items():
        src = _part(name)
        for m in imported:
            dst = _part(m)
            if src and dst and dst != src and f"mergevq_core.{dst}" in MODULES:
                edges.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' → '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("path", sorted((ROOT / "mergevq_core").rglob("*.py")) + sorted((ROOT / "mergevq_cli").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_source_file_is_too_long(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_each_paper_concept_has_its_own_file():
    for rel in ("tome/matching.py", "tome/schedule.py", "quant/lfq.py", "quant/entropy.py", "models/recovery.py",
                "generators/mergear.py", "generators/randar.py", "eval/probe.py", "eval/fid.py"):
        assert (CORE / rel).is_file(), rel
    mergear = (CORE / "generators" / "mergear.py").read_text()
    assert "def mergear_mask" in mergear and "class PositionCache" in mergear and "class MergeAR" in mergear
