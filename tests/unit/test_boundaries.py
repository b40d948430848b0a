"""Package boundaries, read from the source with ast (imports inside functions included): the
gateway imports neither the replica nor the load tests (the `infergate` command runs those as
their own entry points), and the CLI and benchmark modules sit on no import cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("gateway", "replica", "loadtests")
NO_CYCLE = ("gateway.app.cli", "gateway.cluster", "loadtests.bench", "loadtests.simulate")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[str]:
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: list[str]) -> Iterator[str]:
    """Every module the source imports anywhere in it: `import a.b`, `from a import b` (a and
    a.b), relative imports (from `package`), `importlib.import_module("a.b")` with a literal."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            yield str(node.args[0].value)


def graph() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports (a.b.c also imports a, a.b)."""
    files = {module_name(p): p for top in FIRST_PARTY for p in (ROOT / top).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for target in imported(path):
            parts = target.split(".")
            targets |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & files.keys()
        edges[name] = targets - {name}
    return edges


def test_the_gateway_imports_neither_the_replica_nor_the_load_tests() -> None:
    offending = [
        f"{path.relative_to(ROOT)} imports {target}"
        for path in sorted((ROOT / "gateway").rglob("*.py"))
        for target in imported(path)
        if target.split(".")[0] in ("replica", "loadtests")
    ]
    assert offending == []


@pytest.mark.parametrize("start", NO_CYCLE)
def test_no_import_cycle_through_the_cli_and_benchmark_modules(start: str) -> None:
    edges = graph()
    assert start in edges
    # Depth-first from `start`; reaching it again is a cycle, reported as its path.
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for target in sorted(edges.get(node, ())):
            assert target != start, "import cycle: " + " -> ".join([*path, target])
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))


def test_the_checker_sees_lazy_relative_and_dynamic_imports() -> None:
    source = (
        "def f():\n"
        "    from replica.cli import main\n"
        "    import importlib\n"
        "    importlib.import_module('loadtests.bench')\n"
        "from . import pool\n"
    )
    found = set(imports_in(source, ["gateway"]))
    assert {"replica.cli", "loadtests.bench", "gateway.pool"} <= found
