"""The user's module as ``l(w; batch)``: real models in meta steps.

:class:`tm.TaskLoss` swaps parameters in and restores them exactly; then, through the
optimizer: BatchNorm (train and eval), tied weights, frozen parameters, submodules
called by the loss, a selection of adapted parameters (ANIL), buffers written by a
forward pass, and dtypes. Each meta gradient is checked in float64 against the model
written out by hand and differentiated through the unrolled inner loop with
``torch.autograd``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import (
    ALPHA,
    SAME,
    STEPS,
    TIGHT,
    FixedBatches,
    Pair,
    make_mlp,
    meta_gradient,
    mlp_by_hand,
    mse_loss,
    params_relative_error,
    regression_tasks,
)

TASKS = 4
Forward = Callable[[Sequence[Tensor], Tensor], Tensor]
Tasks = list[tm.SupportQuery[Pair]]
LossFn = Callable[[nn.Module, Pair], Tensor]


def by_hand(
    forward: Forward,
    weights: Sequence[Tensor],
    tasks: Tasks,
    adapted: Sequence[int] | None = None,
    steps: int = STEPS,
) -> list[Tensor]:
    """Mean meta gradient by autograd through the unrolled loop of ``forward``.

    Only the weights whose indices are in ``adapted`` (default: all) take inner steps.
    """
    indices = range(len(weights)) if adapted is None else adapted
    total = [torch.zeros_like(w) for w in weights]
    for task in tasks:
        w0 = [w.detach().clone().requires_grad_(True) for w in weights]
        w = list(w0)
        for _ in range(steps):
            x, y = task.support
            loss = ((forward(w, x) - y) ** 2).mean()
            grads = torch.autograd.grad(loss, [w[i] for i in indices], create_graph=True)
            for i, g in zip(indices, grads, strict=True):
                w[i] = w[i] - ALPHA * g
        x, y = task.query
        meta = torch.autograd.grad(((forward(w, x) - y) ** 2).mean(), w0)
        total = [t + g / len(tasks) for t, g in zip(total, meta, strict=True)]
    return total


def tasks_for(seed: int, dim: int = 1) -> Tasks:
    tasks = regression_tasks(TASKS, torch.Generator().manual_seed(seed), support=8, query=10)
    if dim == 1:
        return tasks
    lift = torch.Generator().manual_seed(seed + 1)
    projection = torch.randn(1, dim, generator=lift, dtype=torch.float64)

    def up(batch: Pair) -> Pair:
        return torch.tanh(batch[0] @ projection), batch[1] @ projection.abs()

    return [tm.SupportQuery(up(t.support), up(t.query)) for t in tasks]


def build(
    model: nn.Module,
    loss_fn: LossFn = mse_loss,
    estimator: tm.MetaGradientEstimator | None = None,
    steps: int = STEPS,
    **options: Any,
) -> tm.MetaOptimizer[nn.Module, Pair]:
    return tm.MetaOptimizer(
        model,
        loss_fn,
        inner_loop=tm.GradientDescent(steps=steps, lr=ALPHA),
        estimator=estimator if estimator is not None else tm.FiniteSum(),
        step_size=tm.Constant(0.1),
        **options,
    )


def meta_grads(
    model: nn.Module,
    tasks: Any,
    estimator: tm.MetaGradientEstimator,
    loss_fn: LossFn = mse_loss,
    **options: Any,
) -> dict[str, Tensor]:
    grads, _ = meta_gradient(
        model, loss_fn, tm.GradientDescent(STEPS, ALPHA), estimator, tasks, **options
    )
    return grads


ESTIMATORS = [tm.FiniteSum(), tm.Exact()]
PATHS = ["list", "stacked", "one by one"]


def as_path(tasks: Tasks, path: str) -> tuple[Any, dict[str, Any]]:
    if path == "stacked":
        return tm.StackedTasks.stack(tasks), {}
    return tasks, {"task_chunk_size": 1 if path == "one by one" else None}


def named(model: nn.Module, values: Sequence[Tensor]) -> dict[str, Tensor]:
    return dict(zip([n for n, _ in model.named_parameters()], values, strict=True))


# ---------------------------------------------------------------- TaskLoss


class Shared(nn.Module):
    """One Linear reachable under two names, and a weight tied between two layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(2, 2).double()
        self.again = self.first  # the same submodule, a second name
        self.other = nn.Linear(2, 2).double()
        self.other.weight = self.first.weight  # tied

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.other(self.again(x))
        return out


def test_task_loss_swaps_every_place_and_restores_each_exactly_once() -> None:
    """torch.func.functional_call leaves a submodule registered twice holding the swapped
    tensors; TaskLoss puts the module's own parameters back in every place."""
    model = Shared()
    originals = {id(p) for p in model.parameters()}
    names = [n for n, _ in model.named_parameters()]
    assert names == ["first.weight", "first.bias", "other.bias"]
    loss = tm.TaskLoss(model, mse_loss, names)
    params = {n: torch.randn_like(p) for n, p in loss.params().items()}
    x = torch.randn(5, 2, dtype=torch.float64)
    batch = (x, torch.zeros(5, 2, dtype=torch.float64))
    w, b1, b2 = params["first.weight"], params["first.bias"], params["other.bias"]
    expected = F.mse_loss((x @ w.T + b1) @ w.T + b2, batch[1])
    assert torch.allclose(loss(params, batch), expected, rtol=SAME, atol=0)
    assert {id(p) for p in model.parameters()} == originals
    assert model.again.weight is model.first.weight is model.other.weight
    assert isinstance(model.other.weight, nn.Parameter)


def test_task_loss_restores_the_module_when_the_loss_raises() -> None:
    model = make_mlp(0)
    before = list(model.parameters())

    def failing(model: nn.Module, batch: Pair) -> Tensor:
        raise RuntimeError("from the user's loss")

    loss = tm.TaskLoss(model, failing, [n for n, _ in model.named_parameters()])
    with pytest.raises(RuntimeError, match="from the user's loss"):
        loss({n: torch.zeros_like(p) for n, p in loss.params().items()}, None)
    assert all(p is q for p, q in zip(model.parameters(), before, strict=True))


def test_task_loss_swaps_only_the_named_parameters() -> None:
    model = make_mlp(0)
    loss = tm.TaskLoss(model, mse_loss, ["2.weight", "2.bias"])
    assert set(loss.params()) == {"2.weight", "2.bias"}
    x = torch.randn(4, 1, dtype=torch.float64)
    params = {"2.weight": torch.zeros(1, 8, dtype=torch.float64), "2.bias": torch.ones(1).double()}
    # the head outputs 1 whatever the body: the loss of y = 1 is 0
    assert float(loss(params, (x, torch.ones(4, 1, dtype=torch.float64))).detach()) == 0.0


# ---------------------------------------------------------------- BatchNorm


class BatchNormNet(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(1, width)
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 1)
        with torch.no_grad():  # not the defaults, so that a mix-up shows
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)
            for buffer, low, high in (("running_mean", -1, 1), ("running_var", 0.5, 2)):
                getattr(self.norm, buffer).uniform_(low, high)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(torch.tanh(self.norm(self.body(x))))
        return out


def batch_norm_by_hand(eps: float, running: tuple[Tensor, Tensor] | None) -> Forward:
    def forward(w: Sequence[Tensor], x: Tensor) -> Tensor:
        w1, b1, gamma, beta, w2, b2 = w
        h = x @ w1.T + b1
        if running is None:  # training mode: the batch's own statistics
            mean, var = h.mean(0), h.var(0, unbiased=False)
        else:
            mean, var = running
        h = (h - mean) / torch.sqrt(var + eps) * gamma + beta
        return torch.tanh(h) @ w2.T + b2

    return forward


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=["FiniteSum", "Exact"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm_meta_gradient_and_running_stats(
    estimator: tm.MetaGradientEstimator, path: str, mode: str
) -> None:
    model = BatchNormNet()
    model.train(mode == "train")
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    tasks = tasks_for(seed=1)
    running = (
        None if mode == "train" else (buffers["norm.running_mean"], buffers["norm.running_var"])
    )
    expected = by_hand(batch_norm_by_hand(model.norm.eps, running), list(model.parameters()), tasks)

    data, options = as_path(tasks, path)
    grads = meta_grads(model, data, estimator, **options)

    assert params_relative_error(grads, named(model, expected)) < TIGHT
    for name, before in buffers.items():  # running statistics untouched, in both modes
        assert torch.equal(dict(model.named_buffers())[name], before), name
    assert model.norm.track_running_stats  # restored after the step


def test_batch_norm_adapt_and_step_leave_running_stats() -> None:
    model = BatchNormNet()
    tasks = tasks_for(seed=2)
    before = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = build(model)
    optimizer.step(tasks)
    optimizer.adapt(tasks[0])
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    model(tasks[0].support[0])  # an ordinary forward pass outside still updates them
    assert not torch.equal(
        dict(model.named_buffers())["norm.running_mean"], before["norm.running_mean"]
    )


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.BatchNorm1d(3, track_running_stats=False), (5, 3)),
        (nn.BatchNorm1d(3, affine=False, track_running_stats=False), (5, 3, 4)),
        (nn.BatchNorm2d(3, track_running_stats=False, eps=1e-3), (4, 3, 2, 5)),
        (nn.BatchNorm1d(3), (5, 3)),  # in training mode: batch statistics too
    ],
    ids=["1d", "1d no affine, sequence", "2d", "1d with running stats"],
)
def test_batch_norm_by_formula_is_the_kernel_to_rounding(layer: nn.Module, shape: Any) -> None:
    """Values, gradients and second derivatives, with respect to input and affine weights."""
    layer = layer.double()
    generator = torch.Generator().manual_seed(0)
    if getattr(layer, "affine", False):
        with torch.no_grad():
            for p in layer.parameters():
                p.uniform_(0.5, 1.5, generator=generator)
    x = torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
    inputs = [x, *layer.parameters()]

    def derivatives() -> list[Tensor]:
        out = layer(x)
        value = (out.tanh() * torch.arange(out.numel()).reshape(out.shape)).sum()
        first = torch.autograd.grad(value, inputs, create_graph=True)
        second = torch.autograd.grad(torch.stack([g.square().sum() for g in first]).sum(), inputs)
        return [out.detach(), *(g.detach() for g in first), *second]

    kernel = derivatives()
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    with tm.model.batch_norm_by_formula(layer):
        formula = derivatives()
    assert "forward" not in layer.__dict__  # the module's own forward again
    for a, b in zip(formula, kernel, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(b, buffers[n]) for n, b in layer.named_buffers())  # none updated


def test_batch_norm_by_formula_leaves_running_statistics_layers_and_own_forwards() -> None:
    evaluated, own = nn.BatchNorm1d(3).eval(), nn.BatchNorm1d(3)
    own.forward = own.forward  # type: ignore[method-assign]  # set on the instance
    set_before = own.__dict__["forward"]
    with tm.model.batch_norm_by_formula(nn.Sequential(evaluated, own)):
        assert "forward" not in evaluated.__dict__  # normalises by running statistics
        assert own.__dict__["forward"] is not set_before
    assert own.__dict__["forward"] is set_before


class CallCounter(nn.Module):
    """An MLP whose forward pass counts its calls in a buffer, in place."""

    calls: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp(0)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        self.calls.add_(1)
        out: Tensor = self.net(x)
        return out


@pytest.mark.parametrize("path", PATHS)
def test_buffers_written_by_the_forward_pass_are_restored_after_a_step(path: str) -> None:
    model = CallCounter()
    tasks = tasks_for(seed=3)
    data, options = as_path(tasks, path)
    optimizer = build(model, **options)
    optimizer.step(data)
    optimizer.meta_backward(data)
    optimizer.adapt(tasks[0])
    assert float(model.calls) == 0.0
    model(tasks[0].support[0])
    assert float(model.calls) == 1.0  # outside a meta step, the forward pass is the user's


# ---------------------------------------------------------------- tied weights


class TiedAutoencoder(nn.Module):
    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.encoder = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, dim)
        self.decoder.weight = self.encoder.weight  # one parameter, two places
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.decoder(torch.tanh(self.encoder(x)))
        return out


def tied_by_hand(w: Sequence[Tensor], x: Tensor) -> Tensor:
    weight, b1, b2 = w
    return torch.tanh(x @ weight.T + b1) @ weight.T + b2


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=["FiniteSum", "Exact"])
@pytest.mark.parametrize("path", PATHS)
def test_tied_weights_adapt_and_update_as_one(
    estimator: tm.MetaGradientEstimator, path: str
) -> None:
    model = TiedAutoencoder()
    names = [n for n, _ in model.named_parameters()]
    assert names == ["encoder.weight", "encoder.bias", "decoder.bias"]
    tasks = tasks_for(seed=4, dim=4)
    expected = by_hand(tied_by_hand, list(model.parameters()), tasks)
    data, options = as_path(tasks, path)
    grads = meta_grads(model, data, estimator, **options)
    assert params_relative_error(grads, named(model, expected)) < TIGHT


def test_tied_weights_stay_tied_after_a_step() -> None:
    model = TiedAutoencoder()
    optimizer = build(model)
    before = model.encoder.weight.detach().clone()
    optimizer.step(tasks_for(seed=5, dim=4))
    assert model.decoder.weight is model.encoder.weight
    assert not torch.equal(model.encoder.weight, before)


# ---------------------------------------------------------------- frozen parameters


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=["FiniteSum", "Exact"])
@pytest.mark.parametrize("path", PATHS)
def test_frozen_parameters_are_never_adapted_nor_updated(
    estimator: tm.MetaGradientEstimator, path: str
) -> None:
    model = make_mlp(6)
    first = model[0]
    assert isinstance(first, nn.Linear)
    first.bias.requires_grad_(False)
    frozen = first.bias.detach().clone()
    tasks = tasks_for(seed=7)
    weights = list(model.parameters())

    def forward(w: Sequence[Tensor], x: Tensor) -> Tensor:  # the bias as a constant
        w1, w2, b2 = w
        return mlp_by_hand([w1, frozen, w2, b2], x)

    trainable = [w for w in weights if w.requires_grad]
    expected = by_hand(forward, trainable, tasks)
    data, options = as_path(tasks, path)
    grads = meta_grads(model, data, estimator, **options)
    assert sorted(grads) == ["0.weight", "2.bias", "2.weight"]
    want = dict(zip(["0.weight", "2.weight", "2.bias"], expected, strict=True))
    assert params_relative_error(grads, want) < TIGHT

    optimizer = build(model, estimator=estimator)
    optimizer.step(tasks)
    assert torch.equal(first.bias, frozen)
    assert first.bias.grad is None
    assert "0.bias" not in optimizer.adapt(tasks[0])  # frozen: the model's own, never adapted


# ---------------------------------------------------------------- submodules in the loss


class TwoPart(nn.Module):
    """No forward of its own: the loss closure calls its parts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.double()


def two_part_loss(model: nn.Module, batch: Pair) -> Tensor:
    assert isinstance(model, TwoPart)
    x, y = batch
    return F.mse_loss(model.head(model.body(x)), y)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=["FiniteSum", "Exact"])
@pytest.mark.parametrize("path", PATHS)
def test_loss_calling_submodules_directly(estimator: tm.MetaGradientEstimator, path: str) -> None:
    model = TwoPart()
    tasks = tasks_for(seed=9)
    expected = by_hand(mlp_by_hand, list(model.parameters()), tasks)
    data, options = as_path(tasks, path)
    grads = meta_grads(model, data, estimator, loss_fn=two_part_loss, **options)
    assert params_relative_error(grads, named(model, expected)) < TIGHT


# ---------------------------------------------------------------- ANIL: adapt the head only


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=["FiniteSum", "Exact"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "adapted",
    [["head"], ["head.weight", "head.bias"], lambda name: name.startswith("head.")],
    ids=["prefix", "names", "predicate"],
)
def test_adapting_the_head_only(
    estimator: tm.MetaGradientEstimator, path: str, adapted: tm.ParamSelection
) -> None:
    model = TwoPart()
    tasks = tasks_for(seed=10)
    expected = by_hand(mlp_by_hand, list(model.parameters()), tasks, adapted=[2, 3])
    data, options = as_path(tasks, path)
    grads = meta_grads(model, data, estimator, loss_fn=two_part_loss, adapted=adapted, **options)
    assert params_relative_error(grads, named(model, expected)) < TIGHT
    body = [grads["body.0.weight"], grads["body.0.bias"]]
    assert all(bool(g.abs().sum() > 0) for g in body)  # the meta gradient reaches the body


def test_adapting_the_head_only_differs_from_adapting_all() -> None:
    tasks = tasks_for(seed=11)
    head = meta_grads(TwoPart(), tasks, tm.FiniteSum(), loss_fn=two_part_loss, adapted=["head"])
    every = meta_grads(TwoPart(), tasks, tm.FiniteSum(), loss_fn=two_part_loss)
    assert params_relative_error(head, every) > 1e-3


@pytest.mark.parametrize("path", ["list", "one by one"])
def test_adapting_the_head_only_with_resampled(path: str) -> None:
    # With every draw the same batch, eq. 7 is the meta gradient of the task
    # SupportQuery(batch, batch): Resampled must equal the hand-written reference.
    tasks = tasks_for(seed=12)
    samplers = [FixedBatches({8: t.support}) for t in tasks]
    same = [tm.SupportQuery(t.support, t.support) for t in tasks]
    expected = by_hand(mlp_by_hand, list(TwoPart().parameters()), same, adapted=[2, 3])
    options = {"task_chunk_size": 1} if path == "one by one" else {}
    grads = meta_grads(
        TwoPart(), samplers, tm.Resampled(8, 8, 8), two_part_loss, adapted=["head"], **options
    )
    assert params_relative_error(grads, named(TwoPart(), expected)) < TIGHT


def test_adapt_returns_every_parameter_with_the_body_unchanged() -> None:
    model = TwoPart()
    optimizer = build(model, loss_fn=two_part_loss, adapted=["head"])
    adapted = optimizer.adapt(tasks_for(seed=13)[0])
    assert torch.equal(adapted["body.0.weight"], model.get_parameter("body.0.weight"))
    assert not torch.equal(adapted["head.weight"], model.head.weight)


@pytest.mark.parametrize(
    ("adapted", "error", "message"),
    [
        (["tail"], ValueError, r"'adapted' entry 'tail' selects no trainable parameter"),
        (["body.0.bias"], ValueError, r"requires_grad=False, which is never adapted"),
        (lambda name: False, ValueError, r"'adapted' selects no trainable parameter"),
        ("head", TypeError, r"'adapted' must be a collection of parameter names"),
        ([1], TypeError, r"'adapted' must be a collection of parameter names"),
    ],
)
def test_bad_selections(adapted: Any, error: type[Exception], message: str) -> None:
    model = TwoPart()
    model.get_parameter("body.0.bias").requires_grad_(False)
    with pytest.raises(error, match=message):
        build(model, loss_fn=two_part_loss, steps=1, adapted=adapted)


def test_selection_is_part_of_the_configuration() -> None:
    head_only = build(TwoPart(), loss_fn=two_part_loss, adapted=["head"])
    every = build(TwoPart(), loss_fn=two_part_loss)
    with pytest.raises(ValueError, match="adapted"):
        head_only.load_state_dict(every.state_dict())


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("path", ["list", "stacked"])
def test_model_dtype_is_kept(dtype: torch.dtype, path: str) -> None:
    model = make_mlp(14).to(dtype)
    tasks = [
        tm.SupportQuery(
            (t.support[0].to(dtype), t.support[1].to(dtype)),
            (t.query[0].to(dtype), t.query[1].to(dtype)),
        )
        for t in tasks_for(seed=15)
    ]
    data, options = as_path(tasks, path)
    optimizer = build(model, **options)
    before = [p.detach().clone() for p in model.parameters()]
    info = optimizer.step(data)
    assert info.loss.dtype == dtype
    for p, old in zip(model.parameters(), before, strict=True):
        assert p.dtype == dtype
        assert not torch.equal(p, old)
    assert all(w.dtype == dtype for w in optimizer.adapt(tasks[0]).values())


# ---------------------------------------------------------------- compiled


@pytest.mark.integration
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("model_kind", ["batch norm", "head only"])
def test_compiled_path_handles_batch_norm_and_selections(model_kind: str) -> None:
    from torch._dynamo.utils import counters

    tasks = tm.StackedTasks.stack(tasks_for(seed=16))
    results = []
    for compile in (False, {"backend": "eager"}):
        if model_kind == "batch norm":
            model: nn.Module = BatchNormNet()
            options: dict[str, Any] = {}
        else:
            model, options = make_mlp(17), {"adapted": ["2"]}
        with warnings.catch_warnings():
            warnings.simplefilter("error", tm.CompileWarning)
            results.append(  # the second call runs compiled code, the first eagerly
                meta_grads(
                    model,
                    tasks,
                    tm.FiniteSum(),
                    calls=2,
                    task_chunk_size=None,
                    compile=compile,
                    **options,
                )
            )
    assert counters["stats"]["unique_graphs"] == 1
    assert params_relative_error(results[1], results[0]) < SAME
