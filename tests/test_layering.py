"""The package's import graph: the model core imports nothing above it, the layers stack one way, and no module
imports itself back through others. The graph is read from the source (`ast`), function-level imports included."""

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

import idefics

ROOT = Path(idefics.__file__).parent
# Lowest first; a module may import its own layer and the ones below. Every module of the package is in one.
LAYERS = [
    (
        "core",
        [
            "config",
            "cache",
            "image_cache",
            "loading",
            "collectives",
            "quantization",
            "parallel",
            "modeling",
            "processing",
        ],
    ),
    ("adapters", ["adapters"]),
    ("generation", ["generation"]),
    ("facade", ["", "methods"]),  # idefics/__init__.py and the model methods it attaches
    ("applications", ["training", "serving", "evaluation"]),
    ("entry points", ["cli", "demo", "__main__"]),
]
ABOVE_THE_CORE = ["adapters", "generation", "training", "serving", "evaluation", "cli", "demo"]


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every module under src/idefics."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["idefics", *path.relative_to(ROOT).with_suffix("").parts]
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _packages(name: str) -> list[str]:
    """The packages whose __init__ runs before `name` does: idefics, idefics.x, ... (not `name` itself)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its import statements run (any depth in the file, TYPE_CHECKING too).

    `import a.b.c` and `from a.b import c` run a, a.b and a.b.c; the importer's own enclosing packages are left out
    (they are initialised before it) unless it takes a name other than a submodule from one of them."""
    mods = modules()

    def existing(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rpartition(".")[0]
        return name if name in mods else None

    graph = {}
    for name, (path, package) in mods.items():
        own = set(_packages(name)) | ({name} if package else set())
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported = [(alias.name, False) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                subs = [f"{source}.{alias.name}" for alias in node.names]
                imported = [(sub, False) for sub in subs if sub in mods]
                imported.append((source, any(sub not in mods for sub in subs)))  # takes names from `source`
            else:
                continue
            for target, takes_names in imported:
                target = existing(target) if target.split(".")[0] == "idefics" else None
                if target is None:
                    continue
                for module in [*_packages(target), target]:
                    if module not in own or (module == target and takes_names):
                        targets.add(module)
        graph[name] = targets - {name}
    return graph


def layer_of(name: str) -> int:
    """Index in LAYERS of the module's layer (the longest matching package)."""
    relative = name.removeprefix("idefics").removeprefix(".")
    matches = [
        (len(p), i) for i, (_, packages) in enumerate(LAYERS) for p in packages
        if relative == p or (p and relative.startswith(p + "."))
    ]  # fmt: skip
    assert matches, f"{name} is in no layer of tests/test_layering.py's LAYERS: place it there"
    return max(matches)[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_modeling_imports_nothing_above_it():
    """A fresh interpreter that imports the model core (and builds its public class) loads no layer above it."""
    above = [f"idefics.{p}" for p in ABOVE_THE_CORE]
    code = (
        "import sys, idefics.modeling\n"
        "assert hasattr(idefics.modeling.IdeficsForVisionText2Text, 'generate')\n"
        f"print(' '.join(m for m in sys.modules if m in {above!r} or m.startswith(tuple(p + '.' for p in {above!r}))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [], f"importing idefics.modeling imported {result.stdout.strip()}"


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 100 and "idefics.adapters.layers" in graph["idefics.adapters"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("layer", range(len(LAYERS)), ids=[name for name, _ in LAYERS])
def test_layers_import_only_downward(layer):
    graph = import_graph()
    upward = [
        f"{name} imports {target} ({LAYERS[layer_of(target)][0]})"
        for name in sorted(graph) if layer_of(name) == layer
        for target in sorted(graph[name]) if layer_of(target) > layer
    ]  # fmt: skip
    assert not upward, f"{LAYERS[layer][0]} imports a layer above it: " + "; ".join(upward)


def test_the_walk_sees_function_level_and_circular_imports():
    """The checks can fail: imports inside functions are edges, package inits count, and a circle is found."""
    graph = import_graph()
    assert "idefics.generation" in graph["idefics.methods"]  # `from .generation import generate` in a method
    assert {"idefics.modeling", "idefics.modeling.layout"} <= graph["idefics.generation.step"]  # the __init__ runs
    assert "idefics" in graph["idefics.cli.generate"]  # `from .. import DEMO_MODEL` inside a function
    assert "idefics.training" not in graph["idefics.training.loop"]  # `from . import checkpoint`: a submodule
    assert find_cycle({"a.loop": {"a.beam"}, "a.beam": {"a.loop"}, "a.x": set()}) == ["a.beam", "a.loop", "a.beam"]
    assert find_cycle({"a.loop": {"a.beam"}, "a.beam": set()}) is None
    assert layer_of("idefics.generation.step") > layer_of("idefics.modeling.layout")
