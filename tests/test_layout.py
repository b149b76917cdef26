"""The package's import graph: no cycle, demo/ reached only through the model registry, and docs/layers.md drawn
from the code as it is.

    python tests/test_layout.py      # redraw docs/layers.md after moving imports
"""

from __future__ import annotations

import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "beamcap")
PICTURE = os.path.join(REPO, "docs", "layers.md")
# Folders drawn as one box: the test-model builders are not stages of the library.
BOXES = ("testing",)
# The only library modules that may import demo/ (whose tools, train and evaluate, stand on top of the library):
# the model registry (the 'beamcap-demo' entry) and the package's public face (demo_model_path).
DEMO_IMPORTERS = {"sources", "beamcap"}


def _module(path: str) -> str:
    rel = os.path.relpath(path, PACKAGE)[: -len(".py")].replace(os.sep, ".")
    rel = rel.removesuffix(".__init__").removesuffix("__init__") or "beamcap"
    top = rel.split(".")[0]
    return top if top in BOXES else rel


def _target(name: str, modules: set[str]) -> str | None:
    """The drawn module that ``import beamcap.x.y`` names (the longest known prefix)."""
    if name == "beamcap":
        return "beamcap"
    parts = name.removeprefix("beamcap.").split(".")
    if parts[0] in BOXES:
        return parts[0]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def import_graph() -> dict[str, set[str]]:
    """{module: the beamcap modules it imports}, from the source (imports inside functions count too)."""
    files = []
    for root, _dirs, names in os.walk(PACKAGE):
        files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    modules = {_module(f) for f in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in files:
        source = _module(path)
        package = os.path.relpath(os.path.dirname(path), REPO).replace(os.sep, ".")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name == "beamcap" or name.startswith("beamcap."):
                    target = _target(name, modules)
                    if target and target != source:
                        graph[source].add(target)
    return graph


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules by level: level 0 imports nothing of beamcap, level n imports only from levels below n."""
    level: dict[str, int] = {}

    def depth(m: str, path: tuple[str, ...] = ()) -> int:
        if m in path:
            raise ValueError("import cycle: " + " -> ".join((*path[path.index(m) :], m)))
        if m not in level:
            level[m] = 1 + max((depth(d, (*path, m)) for d in graph[m]), default=-1)
        return level[m]

    for m in graph:
        depth(m)
    return [sorted(m for m in graph if level[m] == n) for n in range(max(level.values()) + 1)]


def picture(graph: dict[str, set[str]]) -> str:
    """docs/layers.md: a Mermaid drawing, one row per level, every arrow pointing down to what is imported."""
    ident = {m: m.replace(".", "_") for m in graph}
    lines = ["```mermaid", "flowchart TB"]
    for n, row in reversed(list(enumerate(layers(graph)))):
        lines.append(f"  subgraph L{n}[level {n}]")
        lines += [f"    {ident[m]}[{m}{'/' if m in BOXES else ''}]" for m in row]
        lines.append("  end")
    for m in sorted(graph):
        lines += [f"  {ident[m]} --> {ident[d]}" for d in sorted(graph[m])]
    lines.append("```")
    return (
        "# The package's layers\n\n"
        "Drawn from the code by `python tests/test_layout.py` (and checked by it under pytest): each module sits one\n"
        "level above the highest module it imports, so every arrow (importer --> imported) points down, and nothing\n"
        "imports `demo` but the model registry (`sources`) and the package's public face (`demo.train` and\n"
        "`demo.evaluate` are tools that stand on the library).\n\n" + "\n".join(lines) + "\n"
    )


def test_no_import_cycle_and_every_arrow_points_down():
    graph = import_graph()
    rows = layers(graph)  # raises on a cycle, naming it
    level = {m: n for n, row in enumerate(rows) for m in row}
    assert all(level[d] < level[m] for m in graph for d in graph[m])
    # The data-flow stages, in order: each later one stands above the earlier ones.
    stages = ["samples", "batching", "dofn", "transform"]
    assert [level[s] for s in stages] == sorted(level[s] for s in stages), {s: level[s] for s in stages}
    assert level["samples"] < level["batching"] and level["samples"] < level["dofn"]


def test_demo_is_reached_only_through_the_registry():
    importers = {
        m
        for m, deps in import_graph().items()
        if not m.startswith("demo") and any(d == "demo" or d.startswith("demo.") for d in deps)
    }
    assert importers <= DEMO_IMPORTERS, importers - DEMO_IMPORTERS


def test_the_picture_is_the_code():
    with open(PICTURE, encoding="utf-8") as f:
        assert f.read() == picture(import_graph()), "docs/layers.md drifted: run python tests/test_layout.py"


def test_a_cycle_is_named():
    try:
        layers({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    except ValueError as e:
        assert "a -> b -> c -> a" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")


if __name__ == "__main__":
    with open(PICTURE, "w", encoding="utf-8") as out:
        out.write(picture(import_graph()))
    sys.exit(0)
