"""The package's import graph has no cycle, and every import between subpackages points
down the declared layer order, counting imports inside functions too.

A function-level import only hides a cycle (or an upward dependency) from the
interpreter; it still means one module depends on the other, so it is counted like any
other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mlx_tune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports pkg.mod when that is a module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                while target and target not in modules:  # a.b.c where a.b is the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# Subpackages (and top-level modules) from the bottom up: a module may import from its own
# layer's package or from a lower layer, never from a higher one. A run flows spec ->
# data -> backend -> loop; what only reads the finished run (export, the other commands)
# and the command line sit on top.
LAYERS = [
    {"mlx_tune", "exit_codes", "files", "errors"},
    # The losses: framework-neutral and import nothing of the run, so the spec's check
    # (config) can ask an objective which settings it reads.
    {"objectives"},
    {"config"},
    {"system"},
    {"models"},
    {"data"},
    {"checkpoint"},
    {"backends"},
    {"distributed"},
    {"reporting"},
    {"supervise"},  # the --supervise parent: below training, which shows its status line
    {"training"},
    {"export"},
    {"commands"},
    {"cli", "__main__"},
]
# (importer, imported) module pairs allowed to point up, each with the reason. Keep it short.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("mlx_tune.config.schema", "mlx_tune.backends.registry"):
        "the spec's backend choices are the registry's names; registry.py imports only errors",
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module}: its package '{top}' is in no layer of LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if b.startswith("mlx_tune") and layer_of(b) > layer_of(a)
                  and (a, b) not in ALLOWED_UPWARD)


def test_the_walker_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "mlx_tune.training.planner" in graph["mlx_tune.commands.plan"]
    assert "mlx_tune.commands.plan" in graph["mlx_tune.cli"]  # inside a function
    assert "mlx_tune.backends.torch.ddp" in graph["mlx_tune.backends.torch.backend"]  # in a function
    assert "mlx_tune.backends.registry" in graph["mlx_tune.backends.select"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_package_is_in_a_layer():
    for module in import_graph():
        layer_of(module)


def test_the_allowed_upward_imports_exist_and_import_nothing_above():
    graph = import_graph()
    for importer, imported in ALLOWED_UPWARD:
        assert imported in graph[importer], f"{importer} -> {imported} is gone: drop it"
        assert max(layer_of(m) for m in graph[imported] | {importer}) <= layer_of(importer), \
            f"{imported} imports from above {importer}: the exception would hide a real cycle"


def test_imports_point_down_the_layers():
    up = upward_imports(import_graph())
    assert not up, "imports pointing up the layer order (tests/test_import_cycles.py " \
        "LAYERS):\n" + "\n".join(up)


def test_an_upward_import_is_caught():
    graph = {"mlx_tune.distributed.decisions": {"mlx_tune.training.monitors"},
             "mlx_tune.training.monitors": {"mlx_tune.exit_codes"}, "mlx_tune.exit_codes": set()}
    assert upward_imports(graph) == ["mlx_tune.distributed.decisions -> mlx_tune.training.monitors"]
