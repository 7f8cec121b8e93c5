"""The benchmark scripts run, and every path they time computes the same meta gradient.

A smoke run of ``python -m benchmarks.run --quick`` with torch_maml's task paths (and
parallel-metalearn where the ``benchmark`` extra is installed); the timings themselves
are not checked: tests check behaviour, not speed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PATHS = [
    f"torch_maml {estimator}{chunk}"
    for estimator in ("FiniteSum", "Exact")
    for chunk in ("", " chunk=1", " chunk=None")
]


def test_quick_benchmark_run(tmp_path: Path) -> None:
    peers = ["parallel-metalearn"] if importlib.util.find_spec("metalearn") else []
    impls = [*PATHS, *peers]
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--in-process"]
    done = subprocess.run(
        [*command, "--impls", *impls, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = tmp_path.glob("*-cpu.json")
    saved = json.loads(report.read_text())
    results = saved["results"]
    # --quick: sinusoid (25 tasks) and sinusoid-B1 (one task), N=1, each measured once
    assert sorted((r["workload"], r["impl"]) for r in results) == sorted(
        (workload, impl) for workload in ("sinusoid", "sinusoid-B1") for impl in impls
    )
    for result in results:
        assert result["steps"] == 1
        assert result["rel_diff"] < 1e-12, result
        assert result["median_ms"] > 0
        assert result["cpu_ms"] > 0
        assert result["sources"] in saved["environment"]["torch_maml"]  # the code measured
        plan = result["plan"]
        if not result["impl"].startswith("torch_maml"):
            assert plan is None
        elif result["impl"].endswith("chunk=1"):
            assert (plan["setting"], plan["size"]) == (1, 1)
        elif result["impl"].endswith("chunk=None"):
            assert (plan["setting"], plan["size"]) == (None, result["tasks"])
        else:
            assert plan["setting"] == "auto"
            assert 1 <= plan["size"] <= result["tasks"]
    markdown = next(tmp_path.glob("*-cpu.md")).read_text()
    assert "| sinusoid-B1 | 1 | 1 | torch_maml Exact chunk=None | 1 |" in markdown
    assert "## paths:" in markdown
    assert "## peers:" in markdown  # --impls replaces each suite's own list


def _row(impl: str, cpu_ms: float, diff: float = 0.0) -> dict[str, Any]:
    return {
        "impl": impl,
        "workload": "conv4",
        "steps": 5,
        "tasks": 8,
        "device": "cpu",
        "median_ms": 2 * cpu_ms,  # a busy machine: the ratios divide CPU times
        "cpu_ms": cpu_ms,
        "first_step_s": 1.0,
        "peak_mib": 10.0,
        "rel_diff": diff,
        "plan": None,
    }


def test_table_ratios() -> None:
    """auto against the faster fixed path; every row against parallel-metalearn."""
    from benchmarks.run import table

    rows = [
        _row("torch_maml Exact", 330.0),
        _row("torch_maml Exact chunk=1", 300.0),
        _row("torch_maml Exact chunk=None", 400.0),
        _row("torch_maml FiniteSum", 100.0),
        _row("parallel-metalearn", 200.0, 0.1),
    ]
    lines = table(rows).splitlines()
    cells = {line.split(" | ")[3]: line.split(" | ")[5:9] for line in lines[2:]}
    assert cells["torch_maml Exact"] == ["660.0", "330.0", "1.65", "1.10"]
    assert cells["torch_maml Exact chunk=1"] == ["600.0", "300.0", "1.50", "-"]
    assert cells["torch_maml FiniteSum"] == ["200.0", "100.0", "0.50", "-"]  # no fixed paths
    assert cells["parallel-metalearn"] == ["400.0", "200.0", "1.00", "-"]
    assert lines[-1].endswith("| 1.0e-01 |")


def test_smoothness_benchmark_paths_agree() -> None:
    """Both paths of estimate_smoothness run and give the same L (timings not checked)."""
    from benchmarks import smoothness

    result = smoothness.main(["--quick"])
    assert result["L_rel_diff"] < 1e-10
    assert result["vectorised_s"] > 0
    assert result["one_by_one_s"] > 0


def test_structure_report_reads_a_package(tmp_path: Path) -> None:
    """Line counts, the longest function and import cycles of a small made-up package."""
    from benchmarks import structure

    package = tmp_path / "torch_maml"
    package.mkdir()
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text(
        "def short():\n    return 1\n\n\nclass K:\n    def long(self):\n"
        "        def inner():\n            return 2\n\n        return inner()\n"
    )
    (package / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    assert structure.line_counts(package) == {
        "torch_maml": 1,
        "torch_maml.a": 10,
        "torch_maml.b": 3,
    }
    assert max(structure.functions(package), key=lambda f: f.lines) == structure.Function(
        "torch_maml.a", "K.long", 5
    )
    assert structure.find_cycle(structure.import_graph(package)) is None
    (package / "a.py").write_text("import torch_maml.b\n")  # a -> b -> a, inside a function
    assert structure.find_cycle(structure.import_graph(package)) == [
        "torch_maml.a",
        "torch_maml.b",
        "torch_maml.a",
    ]
    assert structure.find_cycle(structure.import_graph(package, module_level_only=True)) is None
    assert structure.switches(["x", "x", "y", "x", "x"]) == 2
