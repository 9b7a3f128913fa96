"""The package's import graph has no circle, and no project import hides inside a function to dodge one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minimind_hf"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project modules an import statement of `module` imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = (
        ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        if node.level
        else node.module or ""
    )
    found = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [t for t in found if t in MODULES and t != module]


def graph() -> tuple[dict[str, set[str]], list[tuple[str, int]]]:
    edges, nested = {m: set() for m in MODULES}, []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in ast.walk(s)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and (found := targets(module, node)):
                edges[module].update(found)
                if id(node) not in top:
                    nested.append((module, node.lineno))
    return edges, nested


def test_no_import_circle():
    edges, _ = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for other in sorted(edges[module]):
            if state.get(other) == 1:
                cycles.append([*stack[stack.index(other) :], other])
            elif other not in state:
                visit(other, [*stack, other])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles


def test_no_project_import_inside_a_function():
    assert graph()[1] == []
