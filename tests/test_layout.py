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


PACKAGE = ROOT / "strands_dedup"


def _is_module(package: Path, name: str) -> bool:
    return (package / f"{name}.py").is_file() or (package / name / "__init__.py").is_file()


def _imported_package(path: Path, node: ast.ImportFrom) -> Path | None:
    """The package directory an import's names come from (None: not this project's)."""
    if node.level:
        base = path.parent
        for _ in range(node.level - 1):
            base = base.parent
    elif (node.module or "").split(".")[0] == "strands_dedup":
        base = ROOT
    else:
        return None
    for part in (node.module or "").split("."):
        if part:
            base = base / part
    return base


def _reaches(path: Path) -> list[str]:
    """Private names read from another module. Inside the package a `_` *module* may be imported
    (internals are the package's own); a `_` name defined in another module may not."""
    tree = ast.parse(path.read_text(), str(path))
    own = _defined_here(tree)
    inside = PACKAGE in path.parents
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
        elif isinstance(node, ast.ImportFrom):
            package = _imported_package(path, node)
            if package is None:
                continue
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} import {alias.name}"
                for alias in node.names
                if _private(alias.name)
                and alias.name != "_version"
                and not (inside and _is_module(package, alias.name))
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
        "strands_dedup._store": (
            "strands_dedup._engine",
            "strands_dedup.http",
            "strands_dedup.agents",
            "strands_dedup.cli",
        ),
        "strands_dedup._engine": (
            "strands_dedup.http",
            "strands_dedup.agents",
            "strands_dedup.cli",
        ),
        "strands_dedup._protocol": ("strands_dedup._store", "strands_dedup._engine"),
        "strands_dedup._keys": ("strands_dedup._store", "strands_dedup._engine"),
        "strands_dedup._errors": ("strands_dedup.",),
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
    """Lines where a module reads a deduplicator's engine or imports the engine module itself."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if (isinstance(node, ast.Attribute) and node.attr in ("engine", "_engine"))
        or (isinstance(node, ast.Name) and node.id == "engine_of")
        or (isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_engine.engine"))
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
    assert _engine_reaches(ast.parse("from .._engine.engine import Engine\n")) == [1]
    assert _engine_reaches(ast.parse("def f(dedup):\n    return engine_of(dedup)\n")) == [2]
    assert _engine_reaches(ast.parse("from .._engine.deduplicator import Deduplicator\n")) == []


# -- the public boundary ------------------------------------------------------------------------

PUBLIC: dict[str, list[str]] = {
    "strands_dedup": sorted(strands_dedup.__all__),
    "strands_dedup.http": [
        "FENCE_HEADER",
        "KEYED",
        "Gateway",
        "GatewayConfig",
        "HttpConfig",
        "IdempotencyMiddleware",
        "IdempotentAsyncTransport",
        "IdempotentTransport",
        "OutgoingConfig",
        "StoredResponse",
        "effect_key",
        "run_gateway",
    ],
    "strands_dedup.http.outgoing_requests": ["IdempotentAdapter"],
    "strands_dedup.agents": ["idempotent_tool", "message_token", "tool_token"],
    "strands_dedup.agents.strands": [
        "STREAMED_KEYS",
        "DedupAgent",
        "RedisSessionManager",
        "RedisSessionRepository",
        "ReplayedMetrics",
        "StoredAgentResult",
        "committed_session",
        "idempotent_tool",
        "message_token",
    ],
    "strands_dedup.cli": ["NAMESPACE_ENV", "REDIS_URL_ENV", "Inspector", "main"],
}
"""Every public module and the names it exports. A change here is a change of the public API."""

TOP_LEVEL = [
    "Activity",
    "BusyReason",
    "CallContext",
    "ConversationError",
    "DedupConfig",
    "DedupError",
    "Deduplicator",
    "DuplicateInFlight",
    "FingerprintMismatch",
    "Health",
    "InvalidToken",
    "JsonSerializer",
    "LeaseLost",
    "NotStored",
    "Outcome",
    "OutcomeUnknown",
    "PrimaryFailed",
    "PrometheusMetrics",
    "ReentrantCall",
    "ResultTooLarge",
    "Role",
    "SerializationError",
    "Serializer",
    "SessionBusy",
    "SessionConfig",
    "SessionGuard",
    "SessionHold",
    "SessionLoad",
    "SignedPickleSerializer",
    "StoreRefused",
    "StoreUnavailable",
    "StreamReset",
    "SyncDeduplicator",
    "UnkeyedRequest",
    "WaitTimeout",
    "__version__",
    "current_call",
    "current_session",
]


def _module_paths() -> list[str]:
    return [
        info.name
        for info in pkgutil.walk_packages(strands_dedup.__path__, "strands_dedup.")
        if info.name != "strands_dedup.cli.__main__"
    ]


def test_the_public_names_are_pinned() -> None:
    assert sorted(strands_dedup.__all__) == sorted(TOP_LEVEL)
    for name, exported in PUBLIC.items():
        module = importlib.import_module(name)
        assert sorted(module.__all__) == sorted(exported), name
        for attribute in exported:
            assert hasattr(module, attribute), f"{name}.{attribute}"


def test_every_other_module_is_private() -> None:
    """A module is public only if it is listed above; every other one has a `_` in its path."""
    public = [
        path
        for path in _module_paths()
        if not any(part.startswith("_") for part in path.split(".")) and path not in PUBLIC
    ]
    assert public == []


def _internal_imports(source: str, label: str) -> list[str]:
    """This project's private modules a file outside the package imports (or names in a string
    handed to ``importlib``/``-m``)."""
    tree = ast.parse(source, label)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if node.value.startswith("strands_dedup.") else []
        for name in names:
            parts = name.split(".")
            internal = any(_private(part) for part in parts[1:])
            if parts[0] == "strands_dedup" and internal and name != "strands_dedup._version":
                found.append(f"{label}:{node.lineno} {name}")
    return found


OUTSIDE = sorted(
    path
    for folder in ("tests", "examples", "benchmarks")
    for path in (ROOT / folder).rglob("*.py")
    if path.name != "test_layout.py"
)

WHITE_BOX = {
    # Files that import an internal module, and why. Nothing else outside the package may, and
    # this list may only shrink. Tests of pure internals, as plain functions of data:
    "tests/test_commands.py": "each script's arguments and the parsing of its replies",
    "tests/test_protocol.py": "the wire formats both ways and the waiter's decisions",
    "tests/test_units.py": "the key schema, the envelope codecs, the subscriber's bookkeeping",
    "tests/subscribers.py": "a hand-driven subscriber for test_units",
    "tests/test_failures.py": "the table from driver errors to the error tree",
    "tests/test_engine_parts.py": "the engine's parts: store policy, session activity, stats",
    "tests/test_renewer.py": "the renewer's batching and lost-lease bookkeeping",
    "tests/test_pipeline.py": "the auto-pipeline's batching and failure isolation",
    # A command sent twice on purpose (no proxy can repeat one on memory:// or a cluster):
    "tests/test_repeats.py": "each script run twice with the same arguments",
    "tests/test_stream_exactly_once.py": "an append batch run twice (memory:// case)",
    "tests/test_contract.py": "a retried claim, a renewal after a release, subscriber pings",
    # What only the internals can show:
    "tests/test_sync_callers.py": "no round trip of a blocking call is handed to another thread",
    "tests/test_cluster.py": "per-primary pipelines and where a lone command goes",
    "tests/faults/worker.py": "the fault runs' worker reads the engine's counters and keys",
    "benchmarks/conversations.py": "times a turn's load and commit steps apart",
}


def test_nothing_outside_the_package_imports_its_internals() -> None:
    reaching = {}
    for path in OUTSIDE:
        found = _internal_imports(path.read_text(), str(path.relative_to(ROOT)))
        if found:
            reaching[str(path.relative_to(ROOT))] = found
    assert sorted(set(reaching) - set(WHITE_BOX)) == [], reaching
    assert sorted(set(WHITE_BOX) - set(reaching)) == [], "no longer reaches in: drop it"


def test_the_boundary_checker_sees_an_internal_import() -> None:
    source = "from strands_dedup._store.commands import parse_claim\nimport strands_dedup._keys\n"
    assert len(_internal_imports(source, "probe.py")) == 2
    assert _internal_imports("from strands_dedup.http import Gateway\n", "probe.py") == []
