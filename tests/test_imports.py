"""The project's modules import one way: no circle, and no import of a project module hidden in a function."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem for p in ROOT.glob("*.py")}


def imports(path: Path) -> tuple[set[str], list[str]]:
    """(project modules imported at module level, project modules imported inside a function or class)."""
    top, nested = set(), []
    tree = ast.parse(path.read_text())

    def names(node):
        if isinstance(node, ast.Import):
            return [a.name.split(".")[0] for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            return [node.module.split(".")[0]]
        return []
    for node in tree.body:
        top |= {n for n in names(node) if n in MODULES}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                nested += [f"{path.name}:{inner.lineno} imports {n}" for n in names(inner) if n in MODULES]
    return top, nested


def test_no_project_module_is_imported_inside_a_function():
    nested = [line for p in sorted(ROOT.glob("*.py")) for line in imports(p)[1]]
    assert nested == []


def test_project_imports_form_no_circle():
    graph = {p.stem: imports(p)[0] for p in ROOT.glob("*.py")}
    state, cycle = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycle.append(path + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycle == []
