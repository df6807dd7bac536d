"""The package's layers (ARCHITECTURE.md, "Rules of the house"), enforced on every module's imports.

Each module of ``hierdino`` belongs to one layer; it may import its own layer and the layers below,
never one above. Every ``import`` statement counts, wherever it stands: at the top of a module,
inside a function (a lazy import is still a dependency; it is lazy only to keep start-up fast), and
under ``if TYPE_CHECKING:`` (naming a type of a higher layer is knowing that layer). Separately, no
two modules may import each other at module level, directly or through others (an import circle
works or fails depending on which module is imported first).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "hierdino"

# Lowest first: (the layer as ARCHITECTURE.md names it, its modules and packages). A module belongs to
# the layer of the longest name here that is itself or one of its packages.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors, logs", ("hierdino.errors", "hierdino.logs")),
    ("packaged, runtime, storage, archs, hierarchy, labels", ("hierdino.packaged", "hierdino.runtime", "hierdino.storage", "hierdino.archs",
                    "hierdino.hierarchy", "hierdino.labels", "hierdino.hierarchies",
                    "hierdino.presets")),
    ("config", ("hierdino.config",)),
    ("data", ("hierdino.data",)),
    ("models, losses", ("hierdino.models", "hierdino.losses")),
    ("eval", ("hierdino.eval",)),
    ("train", ("hierdino.train",)),
    ("tune", ("hierdino.tune",)),
    ("experiments", ("hierdino.experiments",)),
    ("cli, bench, cluster_check, testing", ("hierdino.cli", "hierdino.bench", "hierdino.cluster_check", "hierdino.manifests",
               "hierdino.testing")),
]
ORDER = " -> ".join(name for name, _ in LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in ``LAYERS``; the package ``hierdino`` itself (empty) is the lowest."""
    if module == "hierdino":
        return 0
    best = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best[1]:
                best = i, len(n)
    return best[0]


def imported(node: ast.AST, module: str, modules: dict[str, Path]) -> list[str]:
    """The hierdino modules an import statement loads: ``from hierdino.data import shards`` names the
    module ``hierdino.data.shards``; ``from hierdino.eval import OBJECTIVE`` the package."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "hierdino"]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolved against this module's package
        pkg = module.split(".") if modules[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
    if base.split(".")[0] != "hierdino":
        return []
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
    return subs + ([base] if len(subs) < len(node.names) else [])


def imports(path: Path, module: str, modules: dict[str, Path], top_level: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` for every hierdino import in ``path``; ``top_level``: only those that run
    when the module is imported (not inside a function, not under ``if TYPE_CHECKING:``)."""
    out = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level and (isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                              or isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)):
                continue
            out.extend((child.lineno, m) for m in imported(child, module, modules))
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


def upward_imports(modules: dict[str, Path]) -> list[str]:
    problems = []
    for module, path in modules.items():
        own = layer_of(module)
        if own is None:
            problems.append(f"{path.relative_to(REPO)}: {module} is in no layer: add it to LAYERS and ARCHITECTURE.md")
            continue
        for line, target in imports(path, module, modules):
            other = layer_of(target)
            if other is not None and other > own:
                problems.append(f"{path.relative_to(REPO)}:{line}: {module} ({LAYERS[own][0]}) imports {target} "
                                f"({LAYERS[other][0]}), a higher layer")
    return problems


def import_circles(modules: dict[str, Path]) -> list[list[str]]:
    """The strongly connected components (Tarjan) of more than one module, or a module importing
    itself, in the graph of module-level imports."""
    graph = {m: sorted({t for _, t in imports(p, m, modules, top_level=True) if t in modules})
             for m, p in modules.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph[v]:
                circles.append(sorted(group))

    for v in graph:
        if v not in index:
            connect(v)
    return circles


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(all_modules())
    assert not problems, "imports against the layer order " + ORDER + ":\n" + "\n".join(problems)


def test_no_import_circle():
    circles = import_circles(all_modules())
    assert not circles, "modules that import each other at module level: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_checks_catch_what_they_should(tmp_path, monkeypatch):
    """A lazy upward import (inside a function) and a module-level circle are both reported."""
    pkg = tmp_path / "hierdino"
    (pkg / "data").mkdir(parents=True)
    for f in ("__init__.py", "data/__init__.py", "storage.py"):
        (pkg / f).write_text("")
    (pkg / "data" / "a.py").write_text("import os\n\n\ndef f():\n    from hierdino.train import loop\n")
    (pkg / "train").mkdir()
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from hierdino.train import other\n")
    (pkg / "train" / "other.py").write_text("from hierdino.train.loop import x\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    modules = {module_name(p): p for p in sorted(pkg.rglob("*.py"))}
    problems = [p.replace(str(tmp_path), "") for p in upward_imports(modules)]
    assert problems == ["hierdino/data/a.py:5: hierdino.data.a (data) imports hierdino.train.loop (train), a higher layer"]
    assert import_circles(modules) == [["hierdino.train.loop", "hierdino.train.other"]]


def test_architecture_states_this_order():
    text = (REPO / "ARCHITECTURE.md").read_text()
    assert ORDER in text, f"ARCHITECTURE.md does not state the layer order {ORDER!r}"


MAX_FUNCTION_LINES = 60  # ARCHITECTURE.md: every function fits on a screen


def long_functions(modules: dict[str, Path]) -> list[str]:
    """``path:line name (n lines)`` of every function or method longer than ``MAX_FUNCTION_LINES``."""
    out = []
    for path in modules.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                    out.append(f"{where}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_is_longer_than_a_screen(tmp_path):
    assert long_functions(all_modules()) == []
    long = tmp_path / "long.py"  # the check itself: a 61-line function is named
    long.write_text("def f():\n" + "    x = 1\n" * 59 + "    return x\n")
    assert long_functions({"long": long}) == [f"{long}:1 f (61 lines)"]


def unnamed_modules(text: str, modules: dict[str, Path]) -> list[str]:
    """The modules (not packages' ``__init__``) whose file name ARCHITECTURE.md's ``text`` never names."""
    import re

    return sorted(name for name, path in modules.items()
                  if path.name != "__init__.py" and not re.search(rf"\b{re.escape(path.stem)}\b", text))


def test_architecture_names_every_module():
    assert unnamed_modules((REPO / "ARCHITECTURE.md").read_text(), all_modules()) == []
    # the check itself: a page without the checkpoint module's name misses exactly it
    text = (REPO / "ARCHITECTURE.md").read_text().replace("checkpoint", "ckpt")
    assert unnamed_modules(text, all_modules()) == ["hierdino.train.checkpoint"]
