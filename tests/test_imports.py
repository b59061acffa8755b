"""The package's import structure: no cycles, no private names across modules, the lower
layers (data, models) never reach up, and no library module imports an entry point."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssod"
ENTRY_POINTS = {"ssod.train", "ssod.eval", "ssod.predict", "ssod.bench", "ssod.tune", "ssod.data.cli"}
# What the lowest layers may import besides themselves: the typed config and atomic writes.
LOWER = ("ssod.data", "ssod.models")
BASE = ("ssod.config", "ssod.io")
# Infrastructure every layer may use: it knows nothing of data, models, methods or training.
INFRASTRUCTURE = ("ssod.io", "ssod.config", "ssod.checkpoint", "ssod.masking", "ssod.mlflow_client", "ssod.spool",
                  "ssod.tracking", "ssod.mlflow_view", "ssod.interrupts")


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the ssod modules it imports (anywhere in it, functions too); private imports."""
    graph, private = defaultdict(set), []
    for path in PACKAGE.rglob("*.py"):
        module = "ssod." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssod"):
                graph[module].add(node.module)
                private += [f"{module}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names if a.name.startswith("ssod"))
    return graph, private


def test_no_import_cycles():
    graph, _ = _graph()

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    # A package imports its own modules (its __init__ re-exports them): not a cycle.
    cycles = [m for m in graph if m in reachable(m) and not any(n.startswith(m + ".") for n in graph[m])]
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    assert _graph()[1] == []


def test_data_and_models_import_only_themselves_the_config_and_io():
    graph, _ = _graph()
    upward = {m: sorted(i for i in imports if not i.startswith(LOWER) and i not in BASE)
              for m, imports in graph.items() if m.startswith(LOWER) and m not in ENTRY_POINTS}
    assert {m: i for m, i in upward.items() if i} == {}


def test_infrastructure_imports_only_infrastructure():
    """Checkpoints, tracking, atomic writes, the config and interrupts are used by every layer
    and use none of them (tracking once reached into ``ssod.data.splits`` for its writers)."""
    graph, _ = _graph()
    reaching = {m: sorted(i for i in graph.get(m, ()) if i not in INFRASTRUCTURE) for m in INFRASTRUCTURE}
    assert {m: i for m, i in reaching.items() if i} == {}
    assert graph.get("ssod.io", set()) == set() and graph.get("ssod.config", set()) == set()


def test_entry_points_are_imported_by_no_module():
    graph, _ = _graph()
    assert {m: sorted(graph[m] & ENTRY_POINTS) for m in graph if graph[m] & ENTRY_POINTS} == {}
