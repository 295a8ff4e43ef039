"""The server's module graph has no cycle (a module that needs another's types takes a Protocol instead), and the
scheduler stays pure: it imports no model code."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"


def app_imports(path: Path) -> set[str]:
    """The app.* modules that `path` imports, at any depth of the file (a lazy import is an edge too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("app.")}
    return found


def graph() -> dict[str, set[str]]:
    return {f"app.{path.stem}": app_imports(path) for path in APP.glob("*.py")}


def test_no_import_cycle_in_app():
    modules = graph()
    assert "app.engine" in modules and "app.scheduler" in modules
    try:
        order = list(TopologicalSorter(modules).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from exc
    assert order.index("app.scheduler") < order.index("app.engine")


def test_the_scheduler_needs_no_model_code():
    source = (APP / "scheduler.py").read_text()
    assert app_imports(APP / "scheduler.py") <= {"app.settings"}
    assert "import torch" not in source and "transformers" not in source
