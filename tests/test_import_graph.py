"""The shape of the package, read from its source with `ast` (nothing is imported): no import circles anywhere in
src/herd, and the model imports only torch and its own config (never checkpoint formats, serving, training or
inference code), so it stays the piece anyone can read and reuse alone.

Run: .venv/bin/python -m pytest tests/test_import_graph.py -v
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The herd modules `path` imports anywhere in its body (function-level imports count: a circle through a lazy
    import is still a circle in the design). `from herd.train import snapshots` imports the module
    herd.train.snapshots; `from herd.config import TextConfig` imports herd.config."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules} - {name}


def graph() -> dict[str, set[str]]:
    """{module: the herd modules it imports} over every file under src/herd."""
    files = {_module(p): p for p in SRC.rglob("*.py")}
    return {name: _imports(path, name, set(files)) for name, path in files.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if m.startswith(n + "."):
                continue  # a package's __init__ gathering its own modules is not a circle: the package is them
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_is_read():
    edges = graph()
    assert "herd.model.text" in edges and "herd.model.attention" in edges["herd.model.text"]
    assert "herd.train.snapshots" in edges["herd.train.trainer"]  # `from herd.train import snapshots as ckpt`


def test_no_import_circles():
    assert _cycle(graph()) is None, " -> ".join(_cycle(graph()))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_model_imports_no_format_serving_training_or_inference_code():
    allowed = ("herd.model", "herd.config")
    for name, deps in graph().items():
        if name.startswith("herd.model"):
            bad = sorted(d for d in deps if not d.startswith(allowed))
            assert not bad, f"{name} imports {bad}: the model may import only torch, herd.config and herd.model"
    for path in (SRC / "herd" / "model").rglob("*.py"):
        tree = ast.parse(path.read_text())
        outside = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
            {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert outside <= {"torch", "herd", "math", "__future__", "dataclasses"}, (path.name, outside)


def test_module_names_are_unique():
    """A file's name says its job: no two modules share a name in different folders (two `checkpoint.py` files
    once drifted apart and dropped the router biases on load)."""
    names = [p.name for p in (SRC / "herd").rglob("*.py") if p.name != "__init__.py"]
    assert sorted({n for n in names if names.count(n) > 1}) == []
