"""The repository's modules by import name, as the installed `speckv` namespace maps them.

pyproject.toml maps `speckv.<folder>` to the folders at the repository root (`speckv.predictor` ->
`predictor/`); tools that find modules by walking one directory tree (import-linter's grimp) cannot follow
that, so the structural tests (dvc deps, layers) read the mapping here and walk imports with `ast`.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
_PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = _PYPROJECT["tool"]["setuptools"]["package-dir"]  # import name -> folder
FOLDERS = tuple(sorted(PACKAGE_DIRS.values()))  # code folders at the repository root
# Modules the engine reaches by name through entry points (speckv.profiling.plugins), never by an import:
# per group, and per the constant a module passes to `plugins.find` (plugins.MODELS, plugins.CONTROLLERS).
PLUGIN_GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(sorted({ref.split(":")[0] for ref in refs.values()}))
    for group, refs in _PYPROJECT["project"].get("entry-points", {}).items()
}
PLUGIN_CONSTANTS = {"plugins.MODELS": "speckv.models", "plugins.CONTROLLERS": "speckv.controllers"}
PLUGINS_MODULE = "speckv.profiling.plugins"


def module_file(name: str) -> Path | None:
    """The repo file that `import name` executes, or None when `name` is not a module of the repo."""
    parts = name.split(".")
    for depth in range(len(parts), 0, -1):
        folder = PACKAGE_DIRS.get(".".join(parts[:depth]))
        if folder is not None:
            base = ROOT.joinpath(folder, *parts[depth:])
            for path in (base.with_suffix(".py"), base / "__init__.py"):
                if path.is_file():
                    return path
            return None
    return None


def module_name(path: Path) -> str:
    """The import name of a repo file (`predictor/evaluation/live.py` -> `speckv.predictor.evaluation.live`)."""
    rel = path.resolve().relative_to(ROOT)
    best = max(
        (n for n, f in PACKAGE_DIRS.items() if rel.parts[: len(Path(f).parts)] == Path(f).parts), key=len
    )
    rest = list(rel.parts[len(Path(PACKAGE_DIRS[best]).parts) :])
    rest[-1] = rest[-1].removesuffix(".py")
    if rest[-1] == "__init__":
        rest.pop()
    return ".".join([best, *rest])


def package_of(path: Path) -> str:
    """The package a file's relative imports start from."""
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def repo_files() -> list[Path]:
    return sorted(
        p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts
    )


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def imports(node: ast.AST, package: str) -> Iterator[str]:
    """Module names an Import / ImportFrom node loads (`from a import b` yields a.b when b is a module)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(p for p in [*parent, base] if p)
        yield base
        yield from (f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def walk(node: ast.AST) -> Iterator[ast.AST]:
    """ast.walk without `if TYPE_CHECKING:` bodies (they never run)."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(c for c in ast.iter_child_nodes(current) if not is_type_checking(c))


def file_imports(path: Path, plugins: bool = True) -> set[str]:
    """Repo modules a file imports, at module level or lazily inside functions; with `plugins`, a file
    importing the plugin lookup also reaches every entry-point module (it runs them, without importing)."""
    tree = ast.parse(path.read_text())
    found = {m for node in walk(tree) for m in imports(node, package_of(path)) if module_file(m)}
    if plugins and PLUGINS_MODULE in found:
        found |= plugin_modules(path.read_text())
    return found


def plugin_modules(source: str) -> set[str]:
    """Entry-point modules a module's source reaches: those of each group whose constant it names."""
    return {
        m
        for const, group in PLUGIN_CONSTANTS.items()
        if const in source
        for m in PLUGIN_GROUPS.get(group, ())
    }
