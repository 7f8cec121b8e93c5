"""Real models: BatchNorm (train and eval), tied weights, frozen parameters, submodules
called by the loss, a selection of adapted parameters (ANIL), and dtypes.

Each meta gradient is checked in float64 against the model written out by hand and
differentiated through the unrolled inner loop with ``torch.autograd``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_maml as tm
from tests.problems import params_relative_error, regression_tasks

ALPHA, STEPS, TASKS = 0.1, 3, 4
Forward = Callable[[Sequence[Tensor], Tensor], Tensor]
Tasks = list[tm.SupportQuery[tuple[Tensor, Tensor]]]


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

    def up(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return torch.tanh(batch[0] @ projection), batch[1] @ projection.abs()

    return [tm.SupportQuery(up(t.support), up(t.query)) for t in tasks]


def mse(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


LossFn = Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]


def build(
    model: nn.Module,
    loss_fn: LossFn = mse,
    estimator: tm.MetaGradientEstimator | None = None,
    steps: int = STEPS,
    **options: Any,
) -> tm.MetaOptimizer[nn.Module, tuple[Tensor, Tensor]]:
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
    loss_fn: LossFn = mse,
    **options: Any,
) -> dict[str, Tensor]:
    optimizer = build(model, loss_fn, estimator, **options)
    optimizer.zero_grad()
    optimizer.meta_backward(tasks)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


ESTIMATORS = [tm.FiniteSum(), tm.Exact()]
PATHS = ["list", "stacked", "one by one"]


def as_path(tasks: Tasks, path: str) -> tuple[Any, dict[str, Any]]:
    if path == "stacked":
        return tm.StackedTasks.stack(tasks), {}
    return tasks, {"task_chunk_size": 1 if path == "one by one" else None}


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


def batch_norm_by_hand(
    eps: float, running: tuple[Tensor, Tensor] | None
) -> Callable[[Sequence[Tensor], Tensor], Tensor]:
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
    names = [n for n, _ in model.named_parameters()]

    data, options = as_path(tasks, path)
    grads = meta_grads(model, data, estimator, **options)

    assert params_relative_error(grads, dict(zip(names, expected, strict=True))) < 1e-10
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
    assert params_relative_error(grads, dict(zip(names, expected, strict=True))) < 1e-10


def test_tied_weights_stay_tied_after_a_step() -> None:
    model = TiedAutoencoder()
    optimizer = build(model)
    before = model.encoder.weight.detach().clone()
    optimizer.step(tasks_for(seed=5, dim=4))
    assert model.decoder.weight is model.encoder.weight
    assert not torch.equal(model.encoder.weight, before)


# ---------------------------------------------------------------- frozen parameters


def mlp_by_hand(w: Sequence[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = w
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def make_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


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
    assert params_relative_error(grads, want) < 1e-10

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


def two_part_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    assert isinstance(model, TwoPart)
    x, y = batch
    return F.mse_loss(model.head(model.body(x)), y)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=["FiniteSum", "Exact"])
@pytest.mark.parametrize("path", PATHS)
def test_loss_calling_submodules_directly(estimator: tm.MetaGradientEstimator, path: str) -> None:
    model = TwoPart()
    tasks = tasks_for(seed=9)
    names = [n for n, _ in model.named_parameters()]
    expected = by_hand(mlp_by_hand, list(model.parameters()), tasks)
    data, options = as_path(tasks, path)
    grads = meta_grads(model, data, estimator, loss_fn=two_part_loss, **options)
    assert params_relative_error(grads, dict(zip(names, expected, strict=True))) < 1e-10


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
    names = [n for n, _ in model.named_parameters()]
    expected = by_hand(mlp_by_hand, list(model.parameters()), tasks, adapted=[2, 3])
    data, options = as_path(tasks, path)
    grads = meta_grads(model, data, estimator, loss_fn=two_part_loss, adapted=adapted, **options)
    assert params_relative_error(grads, dict(zip(names, expected, strict=True))) < 1e-10
    body = [grads["body.0.weight"], grads["body.0.bias"]]
    assert all(bool(g.abs().sum() > 0) for g in body)  # the meta gradient reaches the body


def test_adapting_the_head_only_differs_from_adapting_all() -> None:
    tasks = tasks_for(seed=11)
    head = meta_grads(TwoPart(), tasks, tm.FiniteSum(), loss_fn=two_part_loss, adapted=["head"])
    every = meta_grads(TwoPart(), tasks, tm.FiniteSum(), loss_fn=two_part_loss)
    assert params_relative_error(head, every) > 1e-3


class FixedSampler:
    """A sampler that returns the same batch whatever is asked: S_j = D_j = T."""

    def __init__(self, batch: tuple[Tensor, Tensor]) -> None:
        self.batch = batch

    def sample(self, size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return self.batch


@pytest.mark.parametrize("path", ["list", "one by one"])
def test_adapting_the_head_only_with_resampled(path: str) -> None:
    # With every draw the same batch, eq. 7 is the meta gradient of the task
    # SupportQuery(batch, batch): Resampled must equal the hand-written reference.
    tasks = tasks_for(seed=12)
    samplers = [FixedSampler(t.support) for t in tasks]
    names = [n for n, _ in TwoPart().named_parameters()]
    same = [tm.SupportQuery(t.support, t.support) for t in tasks]
    expected = by_hand(mlp_by_hand, list(TwoPart().parameters()), same, adapted=[2, 3])
    options = {"task_chunk_size": 1} if path == "one by one" else {}
    grads = meta_grads(
        TwoPart(), samplers, tm.Resampled(8, 8, 8), two_part_loss, adapted=["head"], **options
    )
    assert params_relative_error(grads, dict(zip(names, expected, strict=True))) < 1e-10


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


@pytest.mark.parametrize("model_kind", ["batch norm", "head only"])
def test_compiled_path_handles_batch_norm_and_selections(model_kind: str) -> None:
    import warnings

    import torch._dynamo

    tasks = tm.StackedTasks.stack(tasks_for(seed=16))
    results = []
    for compile in (False, {"backend": "eager"}):
        torch._dynamo.reset()
        if model_kind == "batch norm":
            model: nn.Module = BatchNormNet()
            options: dict[str, Any] = {}
        else:
            model, options = make_mlp(17), {"adapted": ["2"]}
        with warnings.catch_warnings():
            warnings.simplefilter("error", tm.CompileWarning)
            results.append(
                meta_grads(
                    model, tasks, tm.FiniteSum(), task_chunk_size=None, compile=compile, **options
                )
            )
    torch._dynamo.reset()
    assert params_relative_error(results[1], results[0]) < 1e-12
