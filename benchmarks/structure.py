"""How torch_maml's code is laid out, now and at an earlier revision, side by side.

Usage::

    python -m benchmarks.structure                # the working tree against bf571c3
    python -m benchmarks.structure --base HEAD~3  # against another revision

For the working tree and for ``--base`` (extracted with ``git archive`` into a
temporary folder, which leaves the repository untouched) it prints:

* the lines of every module of ``torch_maml/``;
* the longest function (or method), with its module and length in lines;
* whether the graph of imports between torch_maml's modules (at any depth of the
  code, the package's ``__init__`` included) has a cycle, and one cycle if so;
* a trace (``sys.setprofile``) of one ``MetaOptimizer.step`` with the defaults
  (``FiniteSum``, ``GradientDescent(steps=5, lr=0.01)``, ``Constant(1e-3)``) on a
  ``StackedTasks`` meta-batch of 25 sinusoid tasks: the calls of torch_maml's Python
  functions (comprehensions and lambdas included, and again without them), the
  distinct functions called, the modules they are in, and the module switches:
  consecutive torch_maml calls in different modules. The optimizer's first step and
  its second (the first also plans memory and fills caches) are traced apart.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
BASE = "bf571c3"
"""The last commit before torch_maml's execution layer was redesigned."""


class Function(NamedTuple):
    module: str
    name: str
    lines: int


def module_names(package: Path) -> dict[str, Path]:
    """``torch_maml.ops`` -> its file; the package's ``__init__`` is ``torch_maml``."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def line_counts(package: Path) -> dict[str, int]:
    return {
        name: len(path.read_text(encoding="utf-8").splitlines())
        for name, path in module_names(package).items()
    }


def functions(package: Path) -> list[Function]:
    """Every function and method of the package, with its qualified name and length."""
    found = []
    for module, path in module_names(package).items():
        tree = ast.parse(path.read_text(encoding="utf-8"))

        def visit(node: ast.AST, prefix: str, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    lines = (child.end_lineno or child.lineno) - child.lineno + 1
                    found.append(Function(module, name, lines))
                    visit(child, f"{name}.<locals>.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
                else:
                    visit(child, prefix)

        visit(tree, "")
    return found


def _absolute(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_graph(package: Path, module_level_only: bool = False) -> dict[str, set[str]]:
    """torch_maml module -> the torch_maml modules it imports (from any of its names)."""
    known = module_names(package)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for importer, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = tree.body if module_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.Import):
                graph[importer] |= {a.name for a in node.names if a.name in known}
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(importer, path.name == "__init__.py", node)
                for alias in node.names:
                    if f"{source}.{alias.name}" in known:
                        graph[importer].add(f"{source}.{alias.name}")
                    elif source in known:
                        graph[importer].add(source)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    path: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> list[str] | None:
        if name in done:
            return None
        if name in path:
            return [*path[path.index(name) :], name]
        path.append(name)
        for target in sorted(graph.get(name, ())):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        cycle = visit(name)
        if cycle is not None:
            return cycle
    return None


# ---------------------------------------------------------------- the trace


@contextlib.contextmanager
def _profiled(package: Path, calls: list[tuple[str, str]]) -> Iterator[None]:
    """Record ``(module, function)`` of every call of a Python function under ``package``."""
    root = str(package.resolve()) + os.sep
    names = {str(path.resolve()): name for name, path in module_names(package).items()}

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            filename = frame.f_code.co_filename
            if filename.startswith(root):
                qualname = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
                calls.append((names.get(filename, filename), qualname))

    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(None)


def trace_step() -> dict[str, Any]:
    """Trace one default MetaOptimizer.step of the importable torch_maml (see the docstring)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import torch_maml as tm

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    x = 10 * torch.rand(25, 20, 1) - 5
    y = (0.1 + 4.9 * torch.rand(25, 1, 1)) * torch.sin(x - torch.pi * torch.rand(25, 1, 1))
    tasks = tm.StackedTasks((x[:, :10], y[:, :10]), (x[:, 10:], y[:, 10:]))

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(model(batch[0]), batch[1])

    meta_opt = tm.MetaOptimizer(
        model,
        loss_fn,
        inner_loop=tm.GradientDescent(steps=5, lr=0.01),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(1e-3),
    )
    package = Path(tm.__file__).resolve().parent
    result: dict[str, Any] = {"package": str(package)}
    for label in ("first step", "second step"):
        calls: list[tuple[str, str]] = []
        with _profiled(package, calls):
            meta_opt.step(tasks)
        plain = [c for c in calls if not c[1].endswith(_COMPREHENSIONS)]
        modules = [module for module, _ in calls]
        result[label] = {
            "calls": len(calls),
            "functions": len(set(calls)),
            "modules": len(set(modules)),
            "switches": switches(modules),
            "functions, no comprehensions": len(set(plain)),
            "switches, no comprehensions": switches([module for module, _ in plain]),
            "sequence of modules": _runs(modules),
            "functions called": sorted({f"{m}.{f}" for m, f in calls}),
            "most frequent switches": [
                f"{a.removeprefix('torch_maml.')} -> {b.removeprefix('torch_maml.')} x{n}"
                for (a, b), n in collections.Counter(
                    (a, b) for a, b in itertools.pairwise(modules) if a != b
                ).most_common(6)
            ],
        }
    return result


_COMPREHENSIONS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>", "<lambda>")


def switches(modules: list[str]) -> int:
    """How many times consecutive calls are in different modules."""
    return sum(a != b for a, b in itertools.pairwise(modules))


def _runs(modules: list[str]) -> list[str]:
    """The modules in call order, each run of calls in one module written once (x count)."""
    runs: list[list[Any]] = []
    for module in modules:
        if runs and runs[-1][0] == module:
            runs[-1][1] += 1
        else:
            runs.append([module, 1])
    return [f"{m.removeprefix('torch_maml.')} x{n}" for m, n in runs]


def _traced(root: Path) -> dict[str, Any]:
    """:func:`trace_step` in a fresh process that imports torch_maml from ``root``."""
    # run in root: the folder of ``python -c`` comes first on sys.path
    environment = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    code = "import json, benchmarks.structure as s; print(json.dumps(s.trace_step()))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"tracing the step under {root} failed:\n{done.stderr[-2000:]}")
    traced: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    expected = (root / "torch_maml").resolve()
    if Path(traced["package"]) != expected:
        raise RuntimeError(f"traced {traced['package']}, not {expected}")
    return traced


def report(root: Path) -> dict[str, Any]:
    package = root / "torch_maml"
    longest = max(functions(package), key=lambda f: f.lines)
    cycles = {
        "all imports": find_cycle(import_graph(package)),
        "module-level imports": find_cycle(import_graph(package, module_level_only=True)),
    }
    return {
        "lines": line_counts(package),
        "longest function": longest._asdict(),
        "import cycle": cycles,
        "trace": _traced(root),
    }


def _print(now: dict[str, Any], base: dict[str, Any], revision: str) -> None:
    modules = sorted(set(now["lines"]) | set(base["lines"]))
    print(f"| module | lines now | lines at {revision} |")
    print("|---|---:|---:|")
    for module in modules:
        print(f"| {module} | {now['lines'].get(module, '-')} | {base['lines'].get(module, '-')} |")
    total_now, total_base = sum(now["lines"].values()), sum(base["lines"].values())
    counts = f"{len(now['lines'])} / {len(base['lines'])} modules"
    print(f"| total ({counts}) | {total_now} | {total_base} |")
    print()
    for label, data in (("now", now), (revision, base)):
        f = data["longest function"]
        print(f"longest function {label}: {f['module']}.{f['name']}, {f['lines']} lines")
    for label, data in (("now", now), (revision, base)):
        for kind, cycle in data["import cycle"].items():
            verdict = "acyclic" if cycle is None else "cycle " + " -> ".join(cycle)
            print(f"import graph {label} ({kind}): {verdict}")
    print()
    print(
        "one MetaOptimizer.step (FiniteSum, GradientDescent(5, 0.01), Constant, 25 stacked tasks):"
    )
    print(
        "| | step | calls | functions | modules | switches "
        "| functions, no comprehensions | switches, no comprehensions |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, data in (("now", now), (revision, base)):
        for step in ("first step", "second step"):
            t = data["trace"][step]
            print(
                f"| {label} | {step} | {t['calls']} | {t['functions']} | {t['modules']} "
                f"| {t['switches']} | {t['functions, no comprehensions']} "
                f"| {t['switches, no comprehensions']} |"
            )
    for label, data in (("now", now), (revision, base)):
        frequent = data["trace"]["second step"]["most frequent switches"]
        print(f"most frequent switches, second step, {label}: " + ", ".join(frequent))
    for label, data in (("now", now), (revision, base)):
        sequence = data["trace"]["second step"]["sequence of modules"]
        print(f"\nmodules in call order, second step, {label}:\n  " + ", ".join(sequence))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base", default=BASE, help=f"git revision to compare with ({BASE})")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    now = report(ROOT)
    with tempfile.TemporaryDirectory() as scratch:
        archive = subprocess.run(
            ["git", "archive", args.base, "torch_maml"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", scratch], input=archive, check=True)
        base = report(Path(scratch))
    _print(now, base, args.base)
    result = {"now": now, "base": base, "base revision": args.base}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
