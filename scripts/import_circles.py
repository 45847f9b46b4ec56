"""Print the import circles between the modules of a package, read from its import statements (no code runs).

    python scripts/import_circles.py [PACKAGE_DIR]      (default: transfer_cli; exit status 1 on a circle)

`from pkg import mod` ties the importer to pkg/mod.py alone; `from pkg import NAME` ties it to
pkg/__init__.py, so a builder that takes a registry from its package's __init__, which imports the
builder, is a circle. Imports inside functions count: a lazy import only hides a circle.
"""
import ast
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the package that module `name` (the file `path`) imports, at its top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in pkg/mod.py is pkg.x; each further dot goes up one
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    nearest = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            nearest.add(target)
    return nearest


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (each module on a loop, with
    every module it reaches and that reaches it back)."""
    reach = {}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        reach[start] = seen
    groups = {tuple(sorted(n for n in reach[m] if m in reach[n])) for m in graph if m in reach[m]}
    return sorted(list(g) for g in groups)


def main(root: Path) -> int:
    known = modules(root)
    found = circles({name: imported(name, path, known) for name, path in known.items()})
    for group in found:
        print(" <-> ".join(group))
    print(f"{len(found)} import circles")
    return 1 if found else 0


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "transfer_cli"
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
