"""The package's own static checks, run as tests so that CI enforces them.

``mypy --strict`` covers torch_maml/, tests/ (including tests/typing_cases: a user's
package that must type-check, and usage that must be rejected), examples/ and the docs
site's build extensions (docs/_ext); ruff checks lint and formatting, of benchmarks/
too. Both are configured in pyproject.toml.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)


def test_mypy_strict() -> None:
    result = run(
        sys.executable, "-m", "mypy", "--strict", "torch_maml", "tests", "examples", "docs/_ext"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    paths = ("torch_maml", "tests", "examples", "benchmarks", "docs/_ext")
    lint = run(ruff, "check", *paths)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    formatting = run(ruff, "format", "--check", *paths)
    assert formatting.returncode == 0, formatting.stdout + formatting.stderr
