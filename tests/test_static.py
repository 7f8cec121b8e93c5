"""The package's own static checks, run as tests so that CI enforces them.

``mypy --strict`` covers torch_maml/, tests/ (including tests/typing_cases: a user's
package that must type-check, and usage that must be rejected), examples/ and the docs
site's build extensions (docs/_ext); ruff checks lint and formatting, of benchmarks/
too. Both are configured in pyproject.toml. Then the package's structure, read with
``ast``: its modules import each other without a cycle, none imports another's
private (underscore) names, and what users read names no document they do not have.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "torch_maml"


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.mark.integration
def test_mypy_strict() -> None:
    result = run(
        sys.executable, "-m", "mypy", "--strict", "torch_maml", "tests", "examples", "docs/_ext"
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_ruff() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    paths = ("torch_maml", "tests", "examples", "benchmarks", "docs/_ext")
    lint = run(ruff, "check", *paths)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    formatting = run(ruff, "format", "--check", *paths)
    assert formatting.returncode == 0, formatting.stdout + formatting.stderr


# ---------------------------------------------------------------- the import graph


def module_name(path: Path) -> str:
    """``torch_maml/ops.py`` -> ``torch_maml.ops``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <module> import ...`` in module ``importer``."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]  # a module's relative imports start from its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


class Import:
    """One name a torch_maml module takes from another torch_maml module."""

    def __init__(self, importer: str, target: str, name: str | None, line: int) -> None:
        self.importer, self.target, self.name, self.line = importer, target, name, line

    def __repr__(self) -> str:
        what = self.target if self.name is None else f"{self.target}.{self.name}"
        return f"{self.importer}:{self.line} imports {what}"


def package_imports() -> list[Import]:
    """Every import of a torch_maml module by a torch_maml module, at any depth of the code.

    ``from . import algorithms`` imports the module ``torch_maml.algorithms``;
    ``from .ops import Ops`` takes the name ``Ops`` from ``torch_maml.ops``.
    """
    known = modules()
    found = []
    for importer, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known:
                        found.append(Import(importer, alias.name, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                source = absolute(importer, is_package, node)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in known:
                        found.append(Import(importer, submodule, None, node.lineno))
                    elif source in known:
                        found.append(Import(importer, source, alias.name, node.lineno))
    return found


def test_the_import_graph_is_read_correctly() -> None:
    """The parser sees the imports it must see (a check of the two tests below)."""
    imports = {(i.importer, i.target, i.name) for i in package_imports()}
    assert ("torch_maml", "torch_maml.algorithms", None) in imports  # from . import algorithms
    assert ("torch_maml.objective", "torch_maml.execution", "Executor") in imports
    assert ("torch_maml.estimators", "torch_maml.objective", "MetaObjective") in imports


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (node -> the nodes it imports) as a path, or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> list[str] | None:
        if name in done:
            return None
        if name in visiting:
            return [*visiting[visiting.index(name) :], name]
        visiting.append(name)
        for target in sorted(graph.get(name, ())):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        visiting.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_package_imports_no_module_that_imports_it_back() -> None:
    """The modules' imports form a graph without a cycle.

    The package's ``__init__`` imports every module, to gather the public names: a
    module that imports the package itself closes a cycle through it.
    """
    graph: dict[str, set[str]] = {name: set() for name in modules()}
    for item in package_imports():
        graph[item.importer].add(item.target)
    assert len(graph["torch_maml"]) > 10  # the public names come from every module
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_theory_formulas_are_a_leaf_module() -> None:
    """formulas.py imports no torch_maml module that could import it back."""
    targets = {i.target for i in package_imports() if i.importer == "torch_maml.formulas"}
    assert targets <= {"torch_maml.checks", "torch_maml.errors"}, targets


def test_no_module_imports_a_private_name_of_another() -> None:
    private = [
        item
        for item in package_imports()
        if item.name is not None and item.name.startswith("_") and item.target != item.importer
    ]
    assert not private, private


# ---------------------------------------------------------------- what users read


def user_files() -> list[Path]:
    found = [ROOT / "README.md"]
    for folder in ("torch_maml", "docs", "examples"):
        found += [p for p in sorted((ROOT / folder).rglob("*")) if p.is_file()]
    return [p for p in found if p.suffix in {".py", ".md", ".yml", ".yaml", ".txt", ".css", ""}]


def test_what_users_read_cites_no_document_they_do_not_have() -> None:
    """The package, its docs, README and examples never cite SPEC (a developers' file)."""
    files = user_files()
    assert ROOT / "torch_maml" / "optimizer.py" in files
    assert any(p.parent.name == "docs" for p in files)
    mentions = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bSPEC\b", line):
                mentions.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not mentions, "\n".join(mentions)
