"""The examples in the package's docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import torch_maml

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(torch_maml.__path__, prefix="torch_maml.")
    if not name.rsplit(".", 1)[-1].startswith("_")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_name_is_documented() -> None:
    for name in torch_maml.__all__:
        obj = getattr(torch_maml, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # modules, the version string, type aliases
        assert (obj.__doc__ or "").strip(), name
