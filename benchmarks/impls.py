"""The implementations the benchmark compares, each as two functions of a workload.

``step(workload, model, data, steps, beta)`` returns a callable that performs one
meta step (B tasks, N inner gradient steps, the second-order meta gradient, an outer
SGD step of ``beta``) and updates ``model`` in place. ``gradient(workload, model,
data, steps)`` returns the meta gradient of the same step (the mean over the
tasks), by parameter name, for the correctness column. Peers are used as their
documentation shows: higher's ``innerloop_ctx`` and TorchOpt's ``MetaSGD`` with
``extract_state_dict``/``recover_state_dict``, one task at a time, as they run;
parallel-metalearn's ``MAML`` on a ``MAML_Model(backbone, head)``, all tasks in one
``torch.func.vmap`` and one backward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

import torch_maml as tm

from .workloads import Data, Workload

Step = Callable[[], None]
Gradient = dict[str, Tensor]


ESTIMATORS = {"FiniteSum": tm.FiniteSum, "Exact": tm.Exact}
"""The estimators the capture and compile-time benchmarks measure, by name."""


def stacked_tasks(data: Data) -> tm.StackedTasks[tuple[Tensor, Tensor]]:
    """A workload's meta-batch as torch_maml takes it."""
    xs, ys, xq, yq = data
    return tm.StackedTasks((xs, ys), (xq, yq))


def meta_optimizer(
    workload: Workload,
    model: nn.Module,
    steps: int,
    beta: float,
    estimator: Any,
    compile: bool | Mapping[str, Any] = False,
    chunk: tm.execution.ChunkSize = "auto",
    capture: tm.execution.CaptureSetting = "auto",
) -> tm.MetaOptimizer[nn.Module, tuple[Tensor, Tensor]]:
    """torch_maml on ``workload``: ``N = steps`` inner steps, ``Constant(beta)`` outer."""
    return tm.MetaOptimizer(
        model,
        workload.loss_fn,
        inner_loop=tm.GradientDescent(steps=steps, lr=workload.alpha),
        estimator=estimator,
        step_size=tm.Constant(beta),
        compile=compile,
        task_chunk_size=chunk,
        capture=capture,
    )


def torch_maml(
    estimator: Any,
    compile: bool | Mapping[str, Any] = False,
    chunk: tm.execution.ChunkSize = "auto",
    capture: tm.execution.CaptureSetting = "auto",
) -> tuple[Callable[..., Step], Callable[..., Gradient]]:
    """torch_maml's MetaOptimizer.step on stacked tasks, ``task_chunk_size=chunk``.

    ``capture``: the default ``"auto"`` captures CUDA graphs on a GPU (and does nothing
    on the CPU); ``False`` is the eager path.
    """

    def step(workload: Workload, model: nn.Module, data: Data, steps: int, beta: float) -> Step:
        meta_opt = meta_optimizer(workload, model, steps, beta, estimator, compile, chunk, capture)
        tasks = stacked_tasks(data)

        def run() -> None:
            meta_opt.step(tasks)

        return run

    def gradient(workload: Workload, model: nn.Module, data: Data, steps: int) -> Gradient:
        model = copy.deepcopy(model)
        meta_opt = meta_optimizer(workload, model, steps, 1.0, estimator, compile, chunk, capture)
        meta_opt.meta_backward(stacked_tasks(data))
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    return step, gradient


def _func_loop_gradient(workload: Workload, model: nn.Module, data: Data, steps: int) -> Gradient:
    xs, ys, xq, yq = data
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return workload.loss_fn(_Swap(model, p), (x, y))

    def meta_loss(p: dict[str, Tensor], i: int) -> Tensor:
        for _ in range(steps):
            g = grad(loss)(p, xs[i], ys[i])
            p = {n: w - workload.alpha * g[n] for n, w in p.items()}
        return loss(p, xq[i], yq[i])

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(xs.shape[0]):
        g = grad(meta_loss)(params, i)
        total = {n: t + g[n] for n, t in total.items()}
    return {n: t / xs.shape[0] for n, t in total.items()}


class _Swap(nn.Module):
    """``model`` called with other weights, by functional_call (for the loss closures)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.inner, self.params = model, params

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = functional_call(self.inner, self.params, (x,))
        return out


def func_loop() -> tuple[Callable[..., Step], Callable[..., Gradient]]:
    """A plain per-task loop with torch.func: grad of the unrolled query loss, task by task."""

    def step(workload: Workload, model: nn.Module, data: Data, steps: int, beta: float) -> Step:
        def run() -> None:
            g = _func_loop_gradient(workload, model, data, steps)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.sub_(beta * g[n])

        return run

    return step, _func_loop_gradient


def higher_impl() -> tuple[Callable[..., Step], Callable[..., Gradient]]:
    """The higher library 0.2: ``innerloop_ctx`` per task, query losses backpropagated."""
    import higher  # optional, untyped

    def accumulate(workload: Workload, model: nn.Module, data: Data, steps: int) -> None:
        xs, ys, xq, yq = data
        inner = torch.optim.SGD(model.parameters(), lr=workload.alpha)
        for i in range(xs.shape[0]):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (
                fmodel,
                diffopt,
            ):
                for _ in range(steps):
                    diffopt.step(workload.loss_fn(fmodel, (xs[i], ys[i])))
                torch.autograd.backward(workload.loss_fn(fmodel, (xq[i], yq[i])) / xs.shape[0])

    def step(workload: Workload, model: nn.Module, data: Data, steps: int, beta: float) -> Step:
        outer = torch.optim.SGD(model.parameters(), lr=beta)

        def run() -> None:
            outer.zero_grad()
            accumulate(workload, model, data, steps)
            outer.step()

        return run

    def gradient(workload: Workload, model: nn.Module, data: Data, steps: int) -> Gradient:
        model = copy.deepcopy(model)
        accumulate(workload, model, data, steps)
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    return step, gradient


def torchopt_impl() -> tuple[Callable[..., Step], Callable[..., Gradient]]:
    """TorchOpt 0.7: ``MetaSGD`` inner steps, state extracted and recovered per task."""
    import torchopt  # optional

    def accumulate(workload: Workload, model: nn.Module, data: Data, steps: int) -> None:
        xs, ys, xq, yq = data
        inner = torchopt.MetaSGD(model, lr=workload.alpha)
        state = torchopt.extract_state_dict(model)
        for i in range(xs.shape[0]):
            for _ in range(steps):
                inner.step(workload.loss_fn(model, (xs[i], ys[i])))
            torch.autograd.backward(workload.loss_fn(model, (xq[i], yq[i])) / xs.shape[0])
            torchopt.recover_state_dict(model, state)

    def step(workload: Workload, model: nn.Module, data: Data, steps: int, beta: float) -> Step:
        outer = torch.optim.SGD(model.parameters(), lr=beta)

        def run() -> None:
            outer.zero_grad()
            accumulate(workload, model, data, steps)
            outer.step()

        return run

    def gradient(workload: Workload, model: nn.Module, data: Data, steps: int) -> Gradient:
        model = copy.deepcopy(model)
        accumulate(workload, model, data, steps)
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    return step, gradient


class _Layers(nn.Sequential):
    """A sequence of layers that accepts (and ignores) parallel-metalearn's keywords.

    ``MAML_Model`` calls its backbone and head as ``module(x, training=..., num_step=...)``,
    as the library's own backbones accept.
    """

    def forward(self, input: Tensor, **kwargs: Any) -> Tensor:
        """The layers applied in turn to ``input``; ``kwargs`` are ignored."""
        for layer in self:
            input = layer(input)
        return input


def parallel_metalearn() -> tuple[Callable[..., Step], Callable[..., Gradient]]:
    """parallel-metalearn 0.5: ``MAML`` with ``InnerSGD``, all tasks in one vmap chunk.

    The workload's model (an ``nn.Sequential``) is split into the library's
    ``MAML_Model(backbone, head)``: all layers but the last, and the last one, sharing
    the model's parameters. The inner step size is fixed (``learn_lr=False``: plain
    MAML). It is a parameter of the inner optimiser created in torch's default dtype:
    for a float64 model it is converted and set again to ``alpha`` (else it stays
    float32's 0.0099999998, a relative error of 2e-8 in the meta gradient).

    On conv4 its meta gradient is off (relative difference 6e-3 at N=1, 9e-2 at N=5 in
    float64; its ``backend="sequential"`` agrees to rounding): torch 2.13-2.15 give
    wrong second derivatives for the weights before an affine batch or layer
    normalisation when ``torch.func.grad`` runs under ``torch.func.vmap`` and the
    result is differentiated again, as this library's vmap backend does.
    """
    from metalearn.algorithms import MAML  # optional, untyped
    from metalearn.inner_optimizers import InnerSGD
    from metalearn.loss import BaseLoss
    from metalearn.model_wrappers import MAML_Model

    class Criterion(BaseLoss):  # type: ignore[misc]  # an untyped base class
        """The workload's criterion on the model's logits, as a parallel-metalearn loss."""

        def __init__(self, criterion: Callable[[Tensor, Tensor], Tensor]) -> None:
            super().__init__()
            self.criterion = criterion

        def forward(
            self, out_dict: dict[str, Tensor], targets: Tensor, model_states: Any = None, **_: Any
        ) -> tuple[Tensor, Tensor]:
            loss = self.criterion(out_dict["logits"], targets)
            return loss, loss.detach()  # (loss, metric)

    def build(
        workload: Workload, model: nn.Module, steps: int, beta: float, device: torch.device
    ) -> tuple[Any, Callable[[Data], None], dict[str, str]]:
        layers = list(model.children())
        wrapped = MAML_Model(backbone=_Layers(*layers[:-1]), head=_Layers(layers[-1]))
        dtype = next(model.parameters()).dtype
        inner = InnerSGD(
            initial_fast_weights=wrapped.get_fast_weights(),
            inner_lr=workload.alpha,
            first_order=False,
            learn_lr=False,
        ).to(dtype)
        with torch.no_grad():
            for lr in inner.parameters():
                lr.fill_(workload.alpha)
        maml = MAML(
            model=wrapped,
            optimizer=torch.optim.SGD(wrapped.parameters(), lr=beta),
            inner_optimizer=inner,
            support_loss_fn=Criterion(workload.criterion),
            inner_steps=steps,
            chunk_size=workload.tasks,
            device=device,
        )
        names = {id(p): n for n, p in model.named_parameters()}
        renamed = {n: names[id(p)] for n, p in wrapped.named_parameters()}

        def run(data: Data) -> None:
            maml.step(iter([data]))

        return wrapped, run, renamed

    def step(workload: Workload, model: nn.Module, data: Data, steps: int, beta: float) -> Step:
        _, run, _ = build(workload, model, steps, beta, data[0].device)

        def one() -> None:
            run(data)

        return one

    def gradient(workload: Workload, model: nn.Module, data: Data, steps: int) -> Gradient:
        model = copy.deepcopy(model)
        wrapped, run, renamed = build(workload, model, steps, 0.0, data[0].device)
        run(data)
        return {renamed[n]: p.grad for n, p in wrapped.named_parameters() if p.grad is not None}

    return step, gradient


IMPLEMENTATIONS: dict[str, Callable[[], tuple[Callable[..., Step], Callable[..., Gradient]]]] = {
    "torch_maml FiniteSum": lambda: torch_maml(tm.FiniteSum()),
    "torch_maml FiniteSum compiled": lambda: torch_maml(tm.FiniteSum(), compile=True),
    "torch_maml FiniteSum eager": lambda: torch_maml(tm.FiniteSum(), capture=False),
    "torch_maml Exact eager": lambda: torch_maml(tm.Exact(), capture=False),
    "torch_maml FiniteSum chunk=1": lambda: torch_maml(tm.FiniteSum(), chunk=1),
    "torch_maml FiniteSum chunk=None": lambda: torch_maml(tm.FiniteSum(), chunk=None),
    "torch_maml Exact": lambda: torch_maml(tm.Exact()),
    "torch_maml Exact chunk=1": lambda: torch_maml(tm.Exact(), chunk=1),
    "torch_maml Exact chunk=None": lambda: torch_maml(tm.Exact(), chunk=None),
    "parallel-metalearn": parallel_metalearn,
    "torch.func loop": func_loop,
    "higher": higher_impl,
    "TorchOpt": torchopt_impl,
}
"""Name -> factory of ``(step, gradient)``; JAX is added by run.py when available."""
