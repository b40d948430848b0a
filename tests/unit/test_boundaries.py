"""Package boundaries, read from the source with ast (imports inside functions included): the
gateway imports neither the replica nor the load tests (the `infergate` command runs those as
their own entry points); inside the gateway each wing imports only the wings below it (LAYERS);
and no first-party module sits on an import cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("gateway", "replica", "loadtests")
# The gateway's wings, lowest first: a module may import its own wing and any wing of a lower
# rank, never one of the same rank or above (datapath and control are siblings: neither calls
# the other). gateway/__init__.py describes each.
LAYERS: dict[str, int] = {
    "foundation": 0,  # errors, yamlfile, boundedjson, logfilter, sharedmem, aio
    "routing": 1,  # the replica type, the request info, policies, prefix index: sync, no I/O
    "launcher": 1,  # cluster: `infergate up`, apart from the gateway it starts
    "config": 2,  # the schema, embedding the routing options
    "flow": 3,  # tenancy: who sends a request, its class, key limits, the fair queue's order
    "pool": 4,  # replica state, admission and the lease, outlier rules, the gateway in force
    "datapath": 5,  # one request from arrival to release
    "control": 5,  # the loops that feed the pool
    "ops": 6,  # metrics, status page, OpenAPI, model list: they subscribe
    "jobs": 7,  # deferred jobs and batches
    "app": 8,  # the composition root: nothing below imports it
    "entry": 9,  # python -m gateway
}
FOUNDATION = {"errors", "yamlfile", "boundedjson", "logfilter", "sharedmem", "aio"}


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
        # Its own enclosing packages are imported before it in any case (a package whose
        # __init__ imports its modules is not a cycle).
        edges[name] = {t for t in targets if not (name + ".").startswith(t + ".")}
    return edges


def test_the_gateway_imports_neither_the_replica_nor_the_load_tests() -> None:
    offending = [
        f"{path.relative_to(ROOT)} imports {target}"
        for path in sorted((ROOT / "gateway").rglob("*.py"))
        for target in imported(path)
        if target.split(".")[0] in ("replica", "loadtests")
    ]
    assert offending == []


def wing(module: str) -> str:
    """gateway.pool.live -> "pool"; gateway.errors -> "foundation"."""
    part = module.split(".")[1]
    if part in FOUNDATION:
        return "foundation"
    return {"cluster": "launcher", "__main__": "entry"}.get(part, part)


def test_every_gateway_module_has_a_wing() -> None:
    modules = [m for m in graph() if m.startswith("gateway.")]
    assert modules
    assert [m for m in modules if wing(m) not in LAYERS] == []


def test_each_gateway_wing_imports_only_the_wings_below_it() -> None:
    offending = [
        f"{source} ({wing(source)}) imports {target} ({wing(target)})"
        for source, targets in sorted(graph().items())
        if source.startswith("gateway.")
        for target in sorted(targets)
        if target.startswith("gateway.")
        and wing(target) != wing(source)
        and LAYERS[wing(target)] >= LAYERS[wing(source)]
    ]
    assert offending == []


def test_the_layer_rule_catches_an_upward_import() -> None:
    assert LAYERS[wing("gateway.app.state")] > LAYERS[wing("gateway.datapath.proxy")]
    assert LAYERS[wing("gateway.control.health")] == LAYERS[wing("gateway.datapath.proxy")]
    assert wing("gateway.config") == "config" and wing("gateway.errors") == "foundation"


@pytest.mark.parametrize("start", sorted(f"{top}." for top in FIRST_PARTY))
def test_no_import_cycle(start: str) -> None:
    edges = graph()
    for module in sorted(m for m in edges if m.startswith(start)):
        assert _cycle_from(module, edges) is None


def _cycle_from(start: str, edges: dict[str, set[str]]) -> str | None:
    """Depth-first from `start`; reaching it again is a cycle, returned as its path."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for target in sorted(edges.get(node, ())):
            if target == start:
                return "import cycle: " + " -> ".join([*path, target])
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


def test_the_cycle_check_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle_from("a", edges) == "import cycle: a -> b -> c -> a"
    assert _cycle_from("d", edges) is None


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


def policy_probes(source: str, policy_classes: set[str]) -> list[str]:
    """Calls that find a policy's behaviour by probing it: `isinstance(_, SomePolicy)`, or
    `hasattr(policy, ...)` / `getattr(policy, ..., default)` on a name holding a policy."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        args = node.args
        if node.func.id == "isinstance" and len(args) == 2:
            named = {n.id for n in ast.walk(args[1]) if isinstance(n, ast.Name)}
            if named & policy_classes:
                found.append(ast.unparse(node))
        elif node.func.id in ("hasattr", "getattr") and args and _names_a_policy(args[0]):
            found.append(ast.unparse(node))
    return found


# The load tests' parts, lowest first (a part imports only lower ones; the commands at the top
# level import any part, never one another): stats is the one percentile and its friends.
LOADTESTS_LAYERS = {"stats": 0, "load": 1, "sim": 2, "harness": 3, "analysis": 4, "command": 5}
PACKAGES = {
    "loadtests",
    "loadtests.load",
    "loadtests.sim",
    "loadtests.harness",
    "loadtests.analysis",
}


def loadtests_part(module: str) -> str:
    if module == "loadtests.analysis.stats":
        return "stats"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "command"


def test_each_loadtests_part_imports_only_lower_parts() -> None:
    offending = [
        f"{source} ({loadtests_part(source)}) imports {target} ({loadtests_part(target)})"
        for source, targets in sorted(graph().items())
        if source.startswith("loadtests.") and source not in PACKAGES
        for target in sorted(targets)
        if target.startswith("loadtests.")
        and target not in PACKAGES
        and (
            LOADTESTS_LAYERS[loadtests_part(target)] > LOADTESTS_LAYERS[loadtests_part(source)]
            or (loadtests_part(source) == loadtests_part(target) == "command")
            or (
                loadtests_part(target) != loadtests_part(source)
                and LOADTESTS_LAYERS[loadtests_part(target)]
                == LOADTESTS_LAYERS[loadtests_part(source)]
            )
        )
    ]
    assert offending == []


def _names_a_policy(node: ast.expr) -> bool:
    return "polic" in ast.unparse(node).lower()


def test_policies_are_called_through_declared_hooks_never_probed() -> None:
    from gateway.routing import policies

    classes = {
        name
        for name, value in vars(policies).items()
        if isinstance(value, type) and issubclass(value, policies.Policy)
    }
    assert {"Policy", "PrefixAware", "PrecisePrefix"} <= classes
    probes = [
        f"{path.relative_to(ROOT)}: {probe}"
        for top in ("gateway", "loadtests")
        for path in sorted((ROOT / top).rglob("*.py"))
        for probe in policy_probes(path.read_text(), classes)
    ]
    assert probes == []
    probed = "if isinstance(p, PrecisePrefix): pass\nif hasattr(policy, 'x'): pass\n"
    assert len(policy_probes(probed, classes)) == 2  # the check sees both kinds
