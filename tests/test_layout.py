"""The architecture's rules, checked on the source: no module reaches into another module's
private names (tests included), and the package has no import cycles."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import strands_dedup

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*sorted((ROOT / "strands_dedup").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]

pytestmark = pytest.mark.timeout(60)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_here(tree: ast.AST) -> set[str]:
    """Private names this module defines: functions, classes, attributes it assigns, slots."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)  # dataclass fields
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return {name for name in names if _private(name)}


def _reaches(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    own = _defined_here(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Call) and getattr(base.func, "id", None) == "super":
                continue
            if node.attr not in own:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (
            node.level > 0 or (node.module or "").startswith("strands_dedup")
        ):
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} import {alias.name}"
                for alias in node.names
                if _private(alias.name) and alias.name != "_version"
            ]
    return found


def test_no_module_reaches_into_another_modules_private_names() -> None:
    reaches = [reach for path in SOURCES for reach in _reaches(path)]
    assert reaches == []


def test_the_checker_sees_a_reach() -> None:
    code = "def f(dedup):\n    return dedup._store\n"
    tree = ast.parse(code)
    assert "_store" not in _defined_here(tree)
    own = ast.parse("class A:\n    def __init__(self):\n        self._store = 1\n")
    assert "_store" in _defined_here(own)


def test_no_import_cycles_between_layers() -> None:
    """Leaves import nothing above them; the store imports no engine; the engine no surface."""
    layers = {
        "strands_dedup.store": (
            "strands_dedup.engine",
            "strands_dedup.http",
            "strands_dedup.agents",
            "strands_dedup.cli",
        ),
        "strands_dedup.engine": ("strands_dedup.http", "strands_dedup.agents", "strands_dedup.cli"),
        "strands_dedup.protocol": ("strands_dedup.store", "strands_dedup.engine"),
        "strands_dedup.keys": ("strands_dedup.store", "strands_dedup.engine"),
        "strands_dedup.errors": ("strands_dedup.",),
    }
    for path in sorted((ROOT / "strands_dedup").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = (
                    module.split(".")[: -node.level]
                    if path.name != "__init__.py"
                    else (module.split(".")[: len(module.split(".")) - node.level + 1])
                )
                imported.add(".".join([*base, *([node.module] if node.module else [])]))
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        for layer, forbidden in layers.items():
            if module == layer or module.startswith(layer + "."):
                bad = [
                    m for m in imported if m.startswith(forbidden) and m != "strands_dedup._version"
                ]
                assert bad == [], f"{module} imports {bad}"


def test_every_module_imports_on_its_own() -> None:
    for info in pkgutil.walk_packages(strands_dedup.__path__, "strands_dedup."):
        if info.name == "strands_dedup.cli.__main__" or info.name in sys.modules:
            continue
        importlib.import_module(info.name)


SURFACES = ("http", "agents")


def _engine_reaches(tree: ast.AST) -> list[int]:
    """Lines where a module reads an ``engine`` attribute or imports the engine module itself."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if (isinstance(node, ast.Attribute) and node.attr == "engine")
        or (isinstance(node, ast.ImportFrom) and (node.module or "").endswith("engine.engine"))
    ]


def test_the_surfaces_use_the_deduplicators_public_api_only() -> None:
    """HTTP and agents reach the protocol through `Deduplicator`, never through its engine."""
    reaches = [
        f"{path.relative_to(ROOT)}:{line}"
        for surface in SURFACES
        for path in sorted((ROOT / "strands_dedup" / surface).rglob("*.py"))
        for line in _engine_reaches(ast.parse(path.read_text(), str(path)))
    ]
    assert reaches == []


def test_the_engine_checker_sees_a_reach() -> None:
    assert _engine_reaches(ast.parse("def f(dedup):\n    return dedup.engine.store\n")) == [2]
    assert _engine_reaches(ast.parse("from ..engine.engine import Engine\n")) == [1]
    assert _engine_reaches(ast.parse("from ..engine.deduplicator import Deduplicator\n")) == []
