"""No import cycles in lomo_kernels/ and triton_kernels/ (installed as lomo_kernels.triton_kernels),
and no #include cycles in csrc/ (include_graph, below).

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``, at module
level or inside a function (a lazy import that hides a cycle is still one), is an edge to the
module it names (``from . import x``: the submodule x when there is one, else the package). A cycle
is reported with its path, e.g. ``lomo_kernels.ops -> lomo_kernels.selfcheck -> lomo_kernels.ops``.
Importing a submodule also runs its packages' ``__init__`` files; those implicit edges are not
counted (every package would be in a cycle with its own submodules).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"lomo_kernels": ROOT / "lomo_kernels", "lomo_kernels.triton_kernels": ROOT / "triton_kernels"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the packages."""
    found = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the packages that ``module`` imports anywhere in its source."""
    package = module if _is_package(path) else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name and name not in modules:  # import a.b.c where only a.b is ours
                    name = name.rpartition(".")[0]
                if name:
                    out.add(name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base not in modules:
                continue  # not ours (torch, triton, numpy, ...)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
    out.discard(module)  # (a package importing its own name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component of more than
    one module, or of one module importing itself (Tarjan's algorithm)."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for scc in sccs:
        members = set(scc)
        start = min(scc)
        if len(scc) == 1 and start not in graph.get(start, ()):
            continue
        # a path from start back to itself inside the component (breadth-first: the shortest)
        paths, seen = [[start]], set()
        while paths:
            path = paths.pop(0)
            nxt = [w for w in sorted(graph[path[-1]]) if w in members]
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def test_the_packages_have_no_import_cycle():
    graph = import_graph()
    assert "lomo_kernels.optim._base" in graph and "lomo_kernels.triton_kernels.launch" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_optimizers_do_not_import_the_trainer_helper():
    graph = import_graph()
    reach, todo = set(), ["lomo_kernels.optim"]
    while todo:
        m = todo.pop()
        for w in graph[m]:
            if w not in reach:
                reach.add(w)
                todo.append(w)
    assert "lomo_kernels.hf" not in reach


def test_the_checker_finds_a_lazy_cycle(tmp_path):
    # the graph builder sees imports inside functions, and the finder names the cycle
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(" -> ".join(c) for c in find_cycles(graph)) == ["a -> b -> c -> a", "d -> d"]
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("def f():\n    from . import y\n")
    (pkg / "y.py").write_text("from .x import f\n")
    modules = {"pkg": pkg / "__init__.py", "pkg.x": pkg / "x.py", "pkg.y": pkg / "y.py"}
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert graph == {"pkg": set(), "pkg.x": {"pkg.y"}, "pkg.y": {"pkg.x"}}
    assert find_cycles(graph) == [["pkg.x", "pkg.y", "pkg.x"]]


# ---------------------------------------------------------------- csrc/: the #include graph

CSRC = ROOT / "csrc"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
_SOURCES = ("*.h", "*.cuh", "*.cpp", "*.cu")


def include_graph(root: Path = CSRC) -> dict[str, set[str]]:
    """File (relative to ``root``) -> the files of ``root`` it includes with ``#include "..."``,
    resolved as the build does: next to the including file, then in ``root`` (the include path).
    Every include counts, also one inside an #if (a header that a configuration includes is still
    a dependency). System includes (<...>) are not ours."""
    files = sorted({p for pattern in _SOURCES for p in root.rglob(pattern)})
    graph = {}
    for path in files:
        edges = set()
        for name in _INCLUDE.findall(path.read_text()):
            for base in (path.parent, root):
                target = (base / name).resolve()
                if target.is_file() and root.resolve() in target.parents:
                    edges.add(target.relative_to(root.resolve()).as_posix())
                    break
        graph[path.relative_to(root).as_posix()] = edges
    return graph


def test_csrc_has_no_include_cycle():
    graph = include_graph()
    assert "ops.h" in graph and "cuda/emulation.h" in graph["emulated/lomo_update.cpp"]
    cycles = find_cycles(graph)
    assert not cycles, "include cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_include_checker_finds_a_cycle(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.h").write_text('#pragma once\n#include "sub/b.h"\n#include <vector>\n')
    (tmp_path / "sub" / "b.h").write_text('#if X\n#  include "c.h"\n#endif\n')  # next to b.h
    (tmp_path / "sub" / "c.h").write_text('#include "a.h"\n')  # from the include path
    (tmp_path / "k.cpp").write_text('#include "sub/c.h"\n#include "missing.h"\n')
    graph = include_graph(tmp_path)
    assert graph == {"a.h": {"sub/b.h"}, "sub/b.h": {"sub/c.h"}, "sub/c.h": {"a.h"},
                     "k.cpp": {"sub/c.h"}}
    assert find_cycles(graph) == [["a.h", "sub/b.h", "sub/c.h", "a.h"]]
