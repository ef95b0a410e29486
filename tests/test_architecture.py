"""The package's layout holds: each stage imports only the stages below it, and no module imports itself back.

The order is the one ``docs/architecture.md`` shows. Imports inside functions count (they run); imports under
``if TYPE_CHECKING:`` do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medseg_lightning"
STAGES = ["cli", "sweep", "studies", "tasks", "training", "evaluation", "tracking", "inference", "reporting", "models",
          "data", "config", "utilities"]  # top to bottom


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported medseg module, at module level?) for every import that runs."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("medseg_lightning"):
                for alias in child.names:
                    candidate = f"{child.module}.{alias.name}"
                    found.append((candidate if candidate in MODULES else child.module, top))
            visit(child, top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(path.read_text()), True)
    return [(name, top) for name, top in found if name in MODULES and name != "medseg_lightning"]


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_every_module_lives_in_a_stage_folder() -> None:
    loose = sorted(name for name in MODULES if name != "medseg_lightning" and _stage(name) is None)
    assert not loose, f"modules outside the stage folders {STAGES}: {loose}"


def test_stages_import_only_the_stages_below_them() -> None:
    upward = []
    for module, path in MODULES.items():
        source = _stage(module)
        for imported, _ in _imports(path):
            target = _stage(imported)
            if source and target and STAGES.index(target) < STAGES.index(source):
                upward.append(f"{module} -> {imported}")
    assert not upward, "imports that climb to a higher stage:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_back() -> None:
    """Not at import time, nor through an import inside a function (a loop hidden by a lazy import is still one)."""
    graph = {module: {name for name, _ in _imports(path)} for module, path in MODULES.items()}
    cycles: set[tuple[str, ...]] = set()

    def walk(module: str, path: list[str]) -> None:
        for imported in graph[module]:
            if imported in path:
                cycle = path[path.index(imported):]
                start = cycle.index(min(cycle))
                cycles.add(tuple(cycle[start:] + cycle[:start]))
            elif len(path) < 12:
                walk(imported, [*path, imported])

    for module in graph:
        walk(module, [module])
    assert not cycles, "import loops:\n" + "\n".join(" -> ".join(cycle) for cycle in sorted(cycles))
