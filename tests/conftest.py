"""Fixtures shared by the test modules; helpers and constants are in tests/problems.py.

Markers (registered in pyproject.toml, see CONTRIBUTING.md):

* ``integration``: runs a subprocess, a compiler or a whole program (torch.compile,
  torchrun, mypy and ruff, the docs site, the examples and benchmarks, a killed
  training run). Part of the default run; ``-m "not integration"`` is the fast loop.
* ``slow``: longer than a few seconds even among those; left out of the default run.
  Every slow test is also an integration test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A generator seeded with 1234, fresh for each test."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """torch._dynamo's caches and counters emptied before and after the test."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# The tests of examples/ and benchmarks/ run whole programs (in-process or in a
# subprocess): integration tests, whichever test module they are in.
INTEGRATION_MODULES = {
    "test_benchmarks.py",
    "test_example_digits.py",
    "test_example_navigation.py",
    "test_example_theory.py",
    "test_examples.py",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
