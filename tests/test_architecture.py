"""The import contract: dependencies point one way (docs/architecture.md).

``adapters`` <- ``service`` (engine <- state, api, stream, routing <- app/cli) <- ``benchmarks``/``loadtest``.
Every import counts, at module level, inside functions and under ``TYPE_CHECKING``: a lazy import is
still a dependency, and a cycle hidden in one still makes two modules impossible to read apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
HTTP_FRAMEWORKS = ("fastapi", "starlette")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(CHECKOUT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(package: str) -> dict[str, set[str]]:
    """Every module of ``package`` -> the modules it imports (absolute names, as written)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((CHECKOUT / package).rglob("*.py")):
        name = _module_name(path)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = targets
    return graph


def _internal_graph(package: str) -> dict[str, set[str]]:
    """Edges between modules of ``package`` only (``from a import b`` counts as a -> a.b when b is a module)."""
    graph = _imports(package)
    return {module: {t for t in targets if t in graph and t != module} for module, targets in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _importers(package: str, prefix: str) -> list[str]:
    return sorted(
        module
        for module, targets in _imports(package).items()
        if any(t == prefix or t.startswith(prefix + ".") for t in targets)
    )


def test_no_import_cycle_inside_service() -> None:
    assert _cycles(_internal_graph("service")) == []


def test_no_import_cycle_inside_adapters() -> None:
    assert _cycles(_internal_graph("adapters")) == []


def test_only_the_http_package_imports_fastapi_or_starlette() -> None:
    outside = {
        framework: [m for m in _importers("service", framework) if not m.startswith("service.http")]
        for framework in HTTP_FRAMEWORKS
    }
    assert outside == {framework: [] for framework in HTTP_FRAMEWORKS}
    assert _importers("adapters", "fastapi") == [] and _importers("adapters", "starlette") == []


def test_service_imports_benchmarks_only_from_the_command_line_entry_point() -> None:
    assert _importers("service", "benchmarks") == ["service.cli"]


def test_adapters_import_neither_service_nor_benchmarks() -> None:
    assert _importers("adapters", "service") == []
    assert _importers("adapters", "benchmarks") == []


def test_the_checker_sees_a_cycle_and_a_framework_import(tmp_path, monkeypatch) -> None:
    """The contract tests above would pass on an empty graph: show they catch what they are for."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n    import fastapi\n")
    monkeypatch.setattr(__import__(__name__), "CHECKOUT", tmp_path)
    assert _cycles(_internal_graph("pkg")) == [["pkg.a", "pkg.b"]]
    assert _importers("pkg", "fastapi") == ["pkg.b"]
