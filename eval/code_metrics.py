"""The shape of the code: lines per module, the longest functions, and which kangpt module imports which.

Reads the source (``kangpt/``, ``eval/``, ``train.py``) without importing it, and checks that no
library module imports the commands (``kangpt.commands``): commands depend on the library, never the
reverse. Exit code 1 if one does.

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
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
