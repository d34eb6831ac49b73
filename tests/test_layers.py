"""The house's shape: packages import only downward (configs, model, train, rlhf,
orchestrate), no two modules import each other through any chain, and no library file or
function outgrows the limits design.md sets. Imports inside functions count too: a
lazy import is still an edge."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Lowest first: a package may import its own modules and those of the packages before it.
# configs sits above model: its presets name ModelConfig sizes.
LAYERS = ("model", "configs", "train", "rlhf", "orchestrate")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def library_files() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every library package."""
    out = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imported_modules(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The library modules a file imports anywhere in it (`from pkg import mod` included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    files = library_files()
    modules = set(files)
    graph = {name: imported_modules(path, modules) - {name} for name, path in files.items()}
    # `import train.data.pipelines` also runs the packages above it: drop those edges only
    # when they are the package __init__ files, which hold no code here.
    for name, edges in graph.items():
        graph[name] = {
            e
            for e in edges
            if files[e].name != "__init__.py" or files[e].read_text().count("\n") > 3
        }
    return graph


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_packages_import_only_downward():
    upward = [
        f"{name} -> {target}"
        for name, edges in sorted(import_graph().items())
        for target in sorted(edges)
        if layer(target) > layer(name)
    ]
    assert upward == [], "imports that point up a layer:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_a_planted_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_files_and_functions_stay_small():
    too_long = []
    for name, path in sorted(library_files().items()):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {lines} lines")
    assert too_long == [], "over the limits:\n" + "\n".join(too_long)
