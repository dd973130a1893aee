"""The house reads top-down: layers point one way, no module imports itself in a circle, no file grows past
~400 lines without saying why.

Run alone with `pytest tests/test_layers.py -v`; imports are walked with `ast` (lazy ones inside functions
included), never by importing.
"""

from __future__ import annotations

import ast

import pytest
from repo_modules import file_imports, module_name, rel, repo_files

# Layer of each import name, top (pipeline) to bottom (engine). A module may import its own layer and any
# layer below it; `predictor` and `data` are one layer but may not import each other (evaluation, above
# both, joins them).
LAYERS = [
    ("pipeline", ("speckv.pipeline",)),
    ("api", ("speckv.api", "speckv.hf", "speckv.serving", "speckv")),
    ("evaluation", ("speckv.predictor.evaluation",)),
    ("predictor", ("speckv.predictor",)),
    ("data", ("speckv.data",)),
    ("engine", ("speckv.profiling",)),
]
RANK = {"pipeline": 0, "api": 1, "evaluation": 2, "predictor": 3, "data": 3, "engine": 4}
MAX_LINES = 400
REASON = "longer than 400 lines because"  # the phrase a long module's docstring gives its reason with


def layer(name: str) -> str:
    """The layer of a module: the longest matching prefix wins (evaluation inside predictor)."""
    best = max(
        ((lay, p) for lay, prefixes in LAYERS for p in prefixes if name == p or name.startswith(p + ".")),
        key=lambda lp: len(lp[1]),
    )
    return best[0]


# Imports only: the engine reaching entry points by name (profiling/plugins.py) is not an import edge.
GRAPH = {module_name(p): file_imports(p, plugins=False) for p in repo_files()}
FILES = {module_name(p): p for p in repo_files()}


def allowed(src: str, dst: str) -> bool:
    a, b = layer(src), layer(dst)
    if {a, b} == {"predictor", "data"}:
        return False
    return RANK[b] >= RANK[a]


def test_the_walk_finds_the_layers():
    assert layer("speckv.predictor.evaluation.report") == "evaluation"
    assert layer("speckv.predictor.train") == "predictor"
    assert "speckv.profiling.controllers" in GRAPH["speckv.profiling.decode"]
    assert "speckv.predictor.runtime" in GRAPH["speckv.predictor.controller"]
    assert not allowed("speckv.profiling.models", "speckv.data.models")
    assert not allowed("speckv.predictor.train", "speckv.predictor.evaluation.stats_that_do_not_exist")


@pytest.mark.parametrize("src", sorted(GRAPH))
def test_imports_point_down(src):
    wrong = sorted(dst for dst in GRAPH[src] if not allowed(src, dst))
    assert not wrong, f"{rel(FILES[src])} ({layer(src)}) imports {wrong} from a layer above or beside it"


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph (lazy imports count: a cycle through
    a function-level import still ties the modules together)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("name", sorted(FILES))
def test_long_files_say_why(name):
    path = FILES[name]
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert REASON in doc.lower(), (
        f"{rel(path)} has {lines} lines: split it by job, or say in its docstring why it is {REASON} ..."
    )
