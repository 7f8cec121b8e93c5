"""The benchmark script runs and its torch_maml rows agree with the float64 reference.

A smoke run of two implementations (the peers need the ``benchmark`` extra; the
timings themselves are not checked: tests check behaviour, not speed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_run(tmp_path: Path) -> None:
    impls = ["torch_maml FiniteSum", "torch_maml Exact"]
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--impls", *impls]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = tmp_path.glob("*.json")
    results = json.loads(report.read_text())["results"]
    assert [r["impl"] for r in results] == impls
    for result in results:
        assert result["workload"] == "sinusoid"
        assert result["rel_diff"] < 1e-12
        assert result["median_ms"] > 0
    assert "| sinusoid | 1 | torch_maml FiniteSum |" in done.stdout


def test_smoothness_benchmark_paths_agree() -> None:
    """Both paths of estimate_smoothness run and give the same L (timings not checked)."""
    from benchmarks import smoothness

    result = smoothness.main(["--quick"])
    assert result["L_rel_diff"] < 1e-10
    assert result["vectorised_s"] > 0
    assert result["one_by_one_s"] > 0
