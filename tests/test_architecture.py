"""The import rules of `icgate`, read from the source with `ast` (docs/architecture.md says why).

Every module under icgate/ is read through the real folders its links point to (gateway/, cache/,
routers/, lengths/, icgate/text.py and icgate/files.py), and every import counts: inside functions and under
`if TYPE_CHECKING:` as much as at the top. Only the cycle check is limited to what runs at import time.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "icgate"
PARTS = ("gateway", "cache", "routers", "lengths")  # the linked folders whose code is Python modules
OURS = ("icgate", *PARTS, "policies", "migrations")  # top-level names that are ours
LIBRARIES = ("icgate.cache", "icgate.routers", "icgate.lengths")
# The modules at the package root that everything may use; they import nothing of icgate's.
FOUNDATIONS = ("icgate.text", "icgate.files")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    path: Path
    line: int
    target: str  # the module imported, resolved to a known module where one matches
    written: str  # as written in the source
    relative: bool
    runs_at_import: bool  # top level of the module (not in a function, not under TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.module} ({self.path.relative_to(PACKAGE.parent)}:{self.line}) imports {self.written}"


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name, at its real path."""
    found = {"icgate": PACKAGE / "__init__.py", **{name: PACKAGE / f"{name[7:]}.py" for name in FOUNDATIONS}}
    for part in PARTS:
        real = (PACKAGE / part).resolve()
        for path in sorted(real.rglob("*.py")):
            names = path.relative_to(real).with_suffix("").parts
            if names[-1] == "__init__":
                names = names[:-1]
            found[".".join(("icgate", part, *names))] = path
    return found


def _is_package(module: str) -> bool:
    return modules()[module].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path) -> None:
        self.module, self.path = module, path
        self.depth = 0  # > 0: inside a function or a TYPE_CHECKING block
        self.found: list[Import] = []

    def _deeper(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _deeper

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.depth += 1
        for child in node.body:
            self.visit(child)
        self.depth -= 1
        for child in node.orelse:
            self.visit(child)

    def _add(self, node: ast.stmt, target: str, written: str, relative: bool = False) -> None:
        runs = self.depth == 0
        self.found.append(Import(self.module, self.path, node.lineno, target, written, relative, runs))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, f"`import {alias.name}`")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            # Resolved as Python would, so that the other rules still see where it leads.
            anchor = self.module.split(".")
            keep = len(anchor) - node.level + (1 if _is_package(self.module) else 0)
            base = ".".join([*anchor[:keep], *([node.module] if node.module else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            target = sub if sub in modules() else base
            written = f"`from {'.' * node.level}{node.module or ''} import {alias.name}`"
            self._add(node, target, written, relative=bool(node.level))


@cache
def imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for module, path in modules().items():
        collector = _Collector(module, path)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        found.extend(collector.found)
    return tuple(found)


def ours(imp: Import) -> bool:
    return imp.target.split(".")[0] in OURS


def within(name: str, *packages: str) -> bool:
    """`name` is one of `packages` or inside one of them."""
    return any(name == p or name.startswith(f"{p}.") for p in packages)


def imports_of(*packages: str) -> Iterator[Import]:
    return (imp for imp in imports() if within(imp.module, *packages) and ours(imp))


def report(offences: Iterable[Import], rule: str) -> None:
    lines = sorted(str(imp) for imp in offences)
    assert not lines, f"{rule}:\n  " + "\n  ".join(lines)


# --- the rules ---------------------------------------------------------------------------------------------


def test_the_tree_is_read() -> None:
    """Guards the rules below against passing on nothing."""
    names = modules()
    for expected in (
        "icgate.text",
        "icgate.files",
        "icgate.gateway.pipeline.run",
        "icgate.cache.index",
        "icgate.lengths.predict",
    ):
        assert expected in names
    assert any(
        imp.module == "icgate.gateway.pipeline.route" and imp.target == "icgate.text" for imp in imports()
    )


def test_the_collector_sees_every_kind_of_import() -> None:
    source = """
from typing import TYPE_CHECKING
import icgate.text
from . import explain
from ..store import tables
if TYPE_CHECKING:
    from icgate.gateway.api import app
else:
    import icgate.gateway.errors
class Late:
    def method(self):
        import gateway.config
"""
    module = "icgate.gateway.pipeline.run"
    collector = _Collector(module, modules()[module])
    collector.visit(ast.parse(source))
    assert {(i.target, i.relative, i.runs_at_import) for i in collector.found if ours(i)} == {
        ("icgate.text", False, True),
        ("icgate.gateway.pipeline.explain", True, True),
        ("icgate.gateway.store.tables", True, True),
        ("icgate.gateway.api.app", False, False),
        ("icgate.gateway.errors", False, True),
        ("gateway.config", False, False),
    }


@pytest.mark.parametrize("module", [*FOUNDATIONS, "icgate.gateway.config", "icgate.gateway.errors"])
def test_the_foundations_import_nothing_of_icgates(module: str) -> None:
    report(imports_of(module), f"{module} must import nothing of icgate's")


def test_records_import_only_the_config_and_the_foundations() -> None:
    allowed = ("icgate.gateway.config", *FOUNDATIONS)
    offences = (imp for imp in imports_of("icgate.gateway.records") if not within(imp.target, *allowed))
    report(offences, "icgate.gateway.records may import only " + ", ".join(allowed))


@pytest.mark.parametrize("library", LIBRARIES)
def test_the_libraries_import_only_themselves_and_the_foundations(library: str) -> None:
    offences = (imp for imp in imports_of(library) if not within(imp.target, library, *FOUNDATIONS))
    report(
        offences,
        f"{library} may import only itself and {', '.join(FOUNDATIONS)} (never gateway, never each other)",
    )


BACKEND_AND_STORE_MAY_USE = (
    "icgate.gateway.config",
    "icgate.gateway.errors",
    "icgate.gateway.records",
    "icgate.gateway.telemetry",
    *FOUNDATIONS,
    *LIBRARIES,
)


@pytest.mark.parametrize("package", ["icgate.gateway.backends", "icgate.gateway.store"])
def test_backends_and_store_use_only_the_foundations_the_libraries_and_themselves(package: str) -> None:
    allowed = (*BACKEND_AND_STORE_MAY_USE, package)
    offences = (imp for imp in imports_of(package) if not within(imp.target, *allowed))
    report(offences, f"{package} may import only {', '.join(allowed)}")


def test_telemetry_imports_only_config_and_records() -> None:
    allowed = ("icgate.gateway.config", "icgate.gateway.records")
    offences = (imp for imp in imports_of("icgate.gateway.telemetry") if not within(imp.target, *allowed))
    report(offences, "icgate.gateway.telemetry may import only " + ", ".join(allowed))


def test_the_models_in_force_use_only_the_store_and_below() -> None:
    allowed = (*BACKEND_AND_STORE_MAY_USE, "icgate.gateway.store")
    offences = (imp for imp in imports_of("icgate.gateway.route_models") if not within(imp.target, *allowed))
    report(offences, "icgate.gateway.route_models may import only " + ", ".join(allowed))


def test_the_pipeline_never_imports_the_api_cli_or_wiring() -> None:
    banned = (
        "icgate.gateway.api",
        "icgate.gateway.cli",
        "icgate.gateway.wiring",
        "icgate.gateway.inprocess",
        "icgate.gateway.admin",
    )
    offences = (imp for imp in imports_of("icgate.gateway.pipeline") if within(imp.target, *banned))
    report(offences, "icgate.gateway.pipeline must not import " + ", ".join(banned))


def test_only_the_cli_imports_the_cli() -> None:
    offences = (
        imp
        for imp in imports()
        if within(imp.target, "icgate.gateway.cli") and not within(imp.module, "icgate.gateway.cli")
    )
    report(offences, "only icgate.gateway.cli may import icgate.gateway.cli")


def test_the_api_never_imports_the_cli_or_the_in_process_gateway() -> None:
    banned = ("icgate.gateway.cli", "icgate.gateway.inprocess")
    offences = (imp for imp in imports_of("icgate.gateway.api") if within(imp.target, *banned))
    report(offences, "icgate.gateway.api must not import " + ", ".join(banned))


def test_the_console_sits_beside_the_api_never_under_it() -> None:
    """The API mounts the console (`create_app`); the console uses the store, the wiring and the config,
    never the API's modules, the CLI or the in-process gateway."""
    banned = ("icgate.gateway.api", "icgate.gateway.cli", "icgate.gateway.inprocess")
    offences = (imp for imp in imports_of("icgate.gateway.admin") if within(imp.target, *banned))
    report(offences, "icgate.gateway.admin must not import " + ", ".join(banned))


def test_only_the_package_root_reaches_the_in_process_gateway() -> None:
    """The in-process gateway sits on top, beside the HTTP API: nothing below it may depend on it."""
    offences = (
        imp
        for imp in imports()
        if within(imp.target, "icgate.gateway.inprocess")
        and not within(imp.module, "icgate.gateway.inprocess")
        and imp.module != "icgate"
    )
    report(offences, "only icgate (the root) may import icgate.gateway.inprocess")


def test_every_import_of_ours_is_absolute_under_icgate() -> None:
    offences = (imp for imp in imports() if imp.relative or (ours(imp) and not within(imp.target, "icgate")))
    report(offences, "imports of our own code are absolute and start with `icgate.`")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or one that imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_cycles_finds_components() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_at_import_time() -> None:
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    via: dict[tuple[str, str], Import] = {}
    for imp in imports():
        if imp.runs_at_import and imp.target in known and imp.target != imp.module:
            edges[imp.module].add(imp.target)
            via.setdefault((imp.module, imp.target), imp)
    found = cycles(edges)
    described = []
    for component in found:
        members = set(component)
        links = sorted(str(via[(a, b)]) for a in component for b in edges[a] & members)
        described.append(" <-> ".join(component) + "\n    " + "\n    ".join(links))
    assert not found, "import cycles among modules:\n  " + "\n  ".join(described)
