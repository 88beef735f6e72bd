"""The shape of the code: lines per module, the longest functions, and which kangpt module imports which.

Reads the source (``kangpt/``, ``eval/``, ``train.py``) without importing it, and checks that the
imports only point down: no library module imports the commands (``kangpt.commands``), the modules
at the package root (the modelling closure a saved model folder carries) import only each other, and
no module imports itself through others (a cycle). Exit code 1 if one does.

    python eval/code_metrics.py              # this checkout
    python eval/code_metrics.py --longest 20 PATH/TO/OTHER/CHECKOUT
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sources(root: Path) -> list[Path]:
    """The Python files measured, relative to ``root``."""
    files = [*(root / "kangpt").rglob("*.py"), *(root / "eval").glob("*.py"), root / "train.py"]
    return sorted(path.relative_to(root) for path in files if path.is_file())


def module_name(path: Path) -> str:
    """``kangpt/commands/__init__.py`` -> ``kangpt.commands``."""
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kangpt_imports(tree: ast.Module, path: Path, modules: set[str]) -> set[str]:
    """The kangpt modules a file imports (relative imports resolved against its package; ``modules``
    are the module names there are)."""
    package = path.parent.parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[: len(package) - node.level + 1])
            if node.module:
                found.add(f"{base}.{node.module}")
            else:  # from . import a, b: submodules, or names of the package itself
                names = (f"{base}.{alias.name}" for alias in node.names)
                found.update(name if name in modules else base for name in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kangpt":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kangpt")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=str(ROOT), help="checkout to measure (default: this one)")
    parser.add_argument("--longest", type=int, default=12, help="how many of the longest functions to list")
    args = parser.parse_args(argv)
    root = Path(args.root)
    total, functions, graph = 0, [], {}
    paths = sources(root)
    modules = {module_name(path) for path in paths}
    print("| lines | module |\n|---:|---|")
    for path in paths:
        text = (root / path).read_text()
        tree = ast.parse(text)
        lines = len(text.splitlines())
        total += lines
        print(f"| {lines} | {path.as_posix()} |")
        functions += [(node.end_lineno - node.lineno + 1, f"{module_name(path)}.{node.name}")
                      for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        graph[module_name(path)] = sorted(kangpt_imports(tree, path, modules))
    print(f"| {total} | in all |\n\nlongest functions:")
    for lines, name in sorted(functions, reverse=True)[: args.longest]:
        print(f"- {name}: {lines}")
    print("\nimports (module -> the kangpt modules it imports):")
    for module, imported in graph.items():
        if imported:
            print(f"- {module} -> {', '.join(imported)}")
    library = [m for m in graph if m.startswith("kangpt") and not m.startswith("kangpt.commands")]
    wrong = [m for m in library if any(i.startswith("kangpt.commands") for i in graph[m])]
    print(f"\nlibrary modules importing kangpt.commands: {', '.join(wrong) or 'none'}")
    closure = {m for m in graph if m.startswith("kangpt.") and m.count(".") == 1
               and (root / (m.replace(".", "/") + ".py")).is_file()}
    up = [f"{m} -> {i}" for m in sorted(closure) for i in graph[m] if i not in closure]
    print(f"modelling modules (package root) importing others: {', '.join(up) or 'none'}")
    cycles = import_cycles(graph)
    print(f"import cycles: {'; '.join(' -> '.join(c) for c in cycles) or 'none'}")
    return 1 if wrong or up or cycles else 0


def import_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Every cycle of module imports found by a depth-first walk (each as the modules around it).

    A package's ``__init__`` importing its own modules is no cycle with them: those modules import
    their siblings, not the package, so the edges to the package itself are left out.
    """
    edges = {m: [i for i in imported if i in graph and not m.startswith(f"{i}.")]
             for m, imported in graph.items()}
    cycles, state = [], {}  # state: 1 on the walk's path, 2 done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in edges[module]:
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module, [module])
    return cycles


if __name__ == "__main__":
    sys.exit(main())
