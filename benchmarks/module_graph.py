"""The import graph of the se_retrofit package, and its cycles (there must be none).

Each module of the package is a node; an edge ``a -> b`` says that ``a`` imports ``b`` when it is
imported (a module-level ``import`` or ``from ... import``, also inside ``if``/``try`` at module level).
Imports inside functions are lazy: they run when the function is called, after every module has
loaded, so they cannot make an import cycle; they are listed apart (``--lazy``) and left out of
the cycle check. ``from . import x`` counts as importing the subpackage or module ``x``; importing
``a.b`` counts as importing ``a.b`` (the package ``a`` runs first, but it is its own node).

Run from the repository root::

    python benchmarks/module_graph.py            # edges, then "no import cycles" or each cycle
    python benchmarks/module_graph.py --lazy     # also the lazy (in-function) imports
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "se_retrofit"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name of every module of the package -> its file."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, names: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(modules of the package ``module`` imports at load time, those it imports lazily in functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    eager: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if inside else eager).update(_targets(module, path, child, names))
            visit(child, inside)

    visit(tree, False)
    if_type_checking = _type_checking_only(tree, module, path, names)
    return eager - if_type_checking - {module}, (lazy | if_type_checking) - {module}


def _type_checking_only(tree: ast.Module, module: str, path: Path, names: dict[str, Path]) -> set[str]:
    """Imports under ``if TYPE_CHECKING:`` never run."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    found.update(_targets(module, path, child, names))
    return found


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, names: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in names}
    source = _resolve(module, path.name == "__init__.py", node)
    found = set()
    for alias in node.names:
        child = f"{source}.{alias.name}"
        if child in names:
            found.add(child)  # from . import x: the module x
        elif source in names:
            found.add(source)
    return found


def graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(load-time import edges, lazy import edges) of every module of the package."""
    names = module_names(root)
    eager, lazy = {}, {}
    for module, path in names.items():
        eager[module], lazy[module] = imports(module, path, names)
    return eager, lazy


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))
    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lazy", action="store_true", help="also list the imports made inside functions")
    args = parser.parse_args(argv)
    eager, lazy = graph()
    short = lambda name: name[len(PACKAGE) + 1:] or PACKAGE  # noqa: E731
    for module in sorted(eager):
        print(f"{short(module)} -> {', '.join(sorted(map(short, eager[module]))) or '-'}")
    if args.lazy:
        print("\nlazy (inside functions):")
        for module in sorted(lazy):
            if lazy[module]:
                print(f"{short(module)} ~> {', '.join(sorted(map(short, lazy[module])))}")
    found = cycles(eager)
    print("\n" + ("no import cycles" if not found else "\n".join("cycle: " + " <-> ".join(map(short, c)) for c in found)))
    return 0 if not found else 1


if __name__ == "__main__":
    sys.exit(main())
