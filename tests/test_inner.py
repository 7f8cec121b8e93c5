"""GradientDescent: the update of eq. 1 and its argument checks."""

from __future__ import annotations

import math

import pytest
import torch

import torch_maml as tm


def test_update_is_one_gradient_descent_step() -> None:
    inner = tm.GradientDescent(steps=3, lr=0.25)
    params = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor(3.0)}
    grads = {"a": torch.tensor([4.0, -8.0], dtype=torch.float64), "b": torch.tensor(1.0)}
    state = inner.init(params)
    new, new_state = inner.update(params, grads, state)
    assert state == ()
    assert new_state == ()
    assert torch.equal(new["a"], torch.tensor([0.0, 4.0], dtype=torch.float64))
    assert torch.equal(new["b"], torch.tensor(2.75))
    assert torch.equal(params["a"], torch.tensor([1.0, 2.0], dtype=torch.float64))  # not in place


def test_is_an_inner_loop_and_immutable() -> None:
    inner = tm.GradientDescent(steps=2, lr=1)
    assert isinstance(inner, tm.InnerLoop)
    assert isinstance(inner.lr, float)
    with pytest.raises(AttributeError):
        inner.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"steps": 0, "lr": 0.1}, ValueError, "'steps' must be a positive int \\(got 0\\)"),
        ({"steps": -2, "lr": 0.1}, ValueError, "'steps' must be a positive int \\(got -2\\)"),
        ({"steps": 2.0, "lr": 0.1}, TypeError, "'steps' must be a positive int \\(got 2.0\\)"),
        ({"steps": True, "lr": 0.1}, TypeError, "'steps' must be a positive int \\(got True\\)"),
        ({"steps": 1, "lr": 0.0}, ValueError, "'lr' must be a finite number > 0 \\(got 0.0\\)"),
        ({"steps": 1, "lr": -0.1}, ValueError, "'lr' must be a finite number > 0 \\(got -0.1\\)"),
        (
            {"steps": 1, "lr": math.nan},
            ValueError,
            "'lr' must be a finite number > 0 \\(got nan\\)",
        ),
        ({"steps": 1, "lr": "0.1"}, TypeError, "'lr' must be a finite number > 0 \\(got '0.1'\\)"),
        (
            {"steps": 1, "lr": 0.1, "L": 0},
            ValueError,
            "'L' must be a finite number > 0 \\(got 0.0\\)",
        ),
    ],
)
def test_bad_arguments_are_named(
    kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        tm.GradientDescent(**kwargs)  # type: ignore[arg-type]
