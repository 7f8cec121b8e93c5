"""The documentation site builds with ``mkdocs build --strict`` and documents the API.

The site is built once, into a temporary directory (never into the repository), by
the same command a user runs: ``python -m mkdocs build --strict``. Strict mode makes
every warning an error: a broken link or anchor, a cross-reference in a docstring
that does not resolve, a page missing from the navigation. An integration test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import torch_maml

pytestmark = pytest.mark.integration

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install '.[docs]'")
pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is not installed")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"mkdocs build --strict failed (exit {result.returncode}):\n"
        f"{result.stdout}\n{result.stderr}"
    )
    return site_dir


def page(site: Path, name: str) -> str:
    path = site / name / "index.html"
    assert path.is_file(), f"the site has no page {name}/"
    return path.read_text(encoding="utf-8")


def test_the_api_reference_documents_the_optimizer(site: Path) -> None:
    html = page(site, "api/optimizer")
    assert 'id="torch_maml.MetaOptimizer"' in html
    assert 'id="torch_maml.MetaOptimizer.meta_backward"' in html
    assert "meta_backward" in html
    assert "Add the meta gradient" in html  # meta_backward's docstring, rendered


def test_every_public_name_has_a_heading_in_the_api_reference(site: Path) -> None:
    anchors: set[str] = set()
    for html_file in (site / "api").rglob("index.html"):
        anchors.update(re.findall(r'id="(torch_maml[\w.]*)"', html_file.read_text("utf-8")))
    names = [name for name in torch_maml.__all__ if name != "__version__"]
    missing = [
        name
        for name in names
        if f"torch_maml.{name}" not in anchors
        and not any(anchor.endswith(f".{name}") for anchor in anchors)
    ]
    assert not missing, f"add these public names to a page of docs/api/: {missing}"


def test_docstrings_show_no_raw_rest_markup(site: Path) -> None:
    for html_file in (site / "api").rglob("index.html"):
        html = html_file.read_text("utf-8")
        for markup in (":class:`", ":func:`", ":meth:`", ":math:`", ".. math::"):
            assert markup not in html, f"{markup!r} left as is in {html_file.relative_to(site)}"


def test_the_site_loads_nothing_from_the_network(site: Path) -> None:
    remote = re.compile(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=\"(?:https?:)?//")
    for html_file in site.rglob("*.html"):
        match = remote.search(html_file.read_text("utf-8"))
        assert match is None, f"{html_file.relative_to(site)} loads {match.group(0)!r}"
