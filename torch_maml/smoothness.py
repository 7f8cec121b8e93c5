r"""Estimating the constants ``L``, ``rho`` and ``b`` of a model and loss from data.

The formulas that use them are in :mod:`torch_maml.formulas`; users find both in
:mod:`torch_maml.theory`. Everything here is Hessian-vector products and gradients,
by the same operations as the meta steps (:class:`~torch_maml.Ops`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .checks import optional_positive_int, positive_float, positive_int
from .errors import NonFiniteError
from .model import (
    ParamSelection,
    TaskLoss,
    batch_statistics_only,
    select_parameters,
    unwrap_compiled,
)
from .ops import Ops
from .tasks import SupportQuery, Task, stack_batches, task_kind
from .trees import flatten
from .typing import LossFn, Params

__all__ = ["SmoothnessEstimate", "estimate_smoothness"]

# The paper's symbols (L, rho...) are kept as names on purpose (N806).
# ruff: noqa: N806


class SmoothnessEstimate(NamedTuple):
    """The constants of the paper, measured at the current weights by :func:`estimate_smoothness`.

    ``L`` and ``rho`` are maxima over every batch measured (both sets of each
    support/query task); ``b`` is a mean over tasks, as eq. 22 takes it.
    """

    L: float
    """Largest absolute Hessian eigenvalue over the batches (power iteration)."""
    rho: float
    """Largest Hessian change per unit of distance found: a lower bound on rho."""
    b: float | None
    """Mean over tasks of ``||grad l_S(w) - grad l_T(w)||`` (None for sampler tasks)."""
    b_max: float | None
    """Largest of those gaps over the tasks (None for sampler tasks)."""
    L_iterations: int
    """Power iterations used by the batch that needed most."""
    L_converged: bool
    """Whether every batch's power iteration met ``tol``."""
    rho_iterations: int
    """Power iterations used by the (batch, restart) that needed most."""
    rho_converged: bool
    """Whether every batch's and restart's iteration for rho met ``tol``."""
    grad_evals: int
    """Gradient evaluations made (for ``b``)."""
    hvp_evals: int
    """Hessian-vector products made (for ``L`` and ``rho``)."""


class _Power(NamedTuple):
    value: float
    iterations: int
    converged: bool


def estimate_smoothness(
    model: nn.Module,
    loss_fn: LossFn[Any, Any],
    tasks: Sequence[Task[Any]],
    *,
    adapted: ParamSelection | None = None,
    sample_size: int | None = None,
    iterations: int = 200,
    tol: float = 1e-9,
    restarts: int = 3,
    radius: float | None = None,
    generator: torch.Generator | None = None,
) -> SmoothnessEstimate:
    r"""Estimate ``L``, ``rho`` and ``b`` of a model and loss at its current weights.

    Never forms a Hessian: everything is Hessian-vector products (reverse over
    reverse) on each batch:
    the support and the query set of every :class:`~torch_maml.SupportQuery` task,
    one draw of ``sample_size`` samples of every sampler task.

    * ``L``: the largest :math:`|\lambda|` of the Hessian, by power iteration
      :math:`v \leftarrow Hv / \|Hv\|`, reading :math:`\|Hv\|`, which increases to
      :math:`\max|\lambda|` (its error shrinks like :math:`(\lambda_2/\lambda_1)^{2k}`).
    * ``rho``: along a unit direction :math:`v`, with :math:`h` = ``radius``,

      .. math:: d(v) = \frac{\nabla^2 l(w + hv)\,v - \nabla^2 l(w - hv)\,v}{2h},
          \qquad \|d(v)\| \le \frac{\|\nabla^2 l(w+hv) - \nabla^2 l(w-hv)\|}{2h} \le \rho

      so every :math:`\|d(v)\|` is a lower bound on rho, whatever ``h``. The
      direction is improved by the power iteration :math:`v \leftarrow d(v)/\|d(v)\|`
      from ``restarts`` random starts, and the largest value seen is kept. It finds
      the local rho exactly on losses whose third derivative is constant (cubics);
      elsewhere it is an estimate from below.
    * ``b`` (support/query tasks): :math:`\|\nabla l_{S_i}(w) - \nabla l_{T_i}(w)\|`,
      exactly, averaged (``b``) and maximised (``b_max``) over the tasks (Assumption 5).

    Batches whose tensors have equal shapes (the support sets of same-shaped tasks,
    their query sets) are measured together, vectorised over batches;
    the others one by one. ``hvp_evals`` counts every batch's products, including
    those of batches that converged before the last of their group.

    The paper's constants are suprema over all weights; these are measured at the
    model's current weights (re-estimate as training moves them, see
    :meth:`~torch_maml.SmoothnessAdaptive.from_data`). BatchNorm layers in training
    mode use batch statistics and keep their running ones unchanged, as in a meta step.

    Args:
        model: the module, at the weights to measure.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``, as for the MetaOptimizer.
        tasks: a non-empty sequence of SupportQuery tasks or samplers.
        adapted: the parameters with respect to which to differentiate (names,
            module prefixes or a predicate, as ``MetaOptimizer(adapted=...)``;
            default: all trainable parameters).
        sample_size: samples per batch of sampler tasks (required for them).
        iterations: the most power iterations per batch (and per restart for rho).
        tol: convergence: the estimate changes by at most ``tol`` relative between
            two iterations.
        restarts: random starting directions per batch for rho.
        radius: the distance ``h`` of the difference for rho. Default:
            :math:`\epsilon^{1/3}\max(1, \|w\|)`, :math:`\epsilon` the dtype's
            machine epsilon (the step that balances rounding and truncation).
        generator: where the random directions come from (default: a generator
            seeded with 0, so that estimates are reproducible).

    Returns:
        :class:`SmoothnessEstimate`.

    Raises:
        NonFiniteError: a loss, gradient or Hessian-vector product is NaN or Inf.

    Example:
        >>> import torch, torch.nn.functional as F, torch_maml as tm
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> est = tm.theory.estimate_smoothness(
        ...     model, lambda m, b: F.mse_loss(m(b[0]), b[1]), [tm.SupportQuery((x, y), (x, y))]
        ... )
        >>> round(est.rho, 6), est.b
        (0.0, 0.0)
    """
    kind = task_kind(tasks)
    model = unwrap_compiled(model)
    iterations = positive_int("iterations", iterations)
    tol = positive_float("tol", tol)
    restarts = positive_int("restarts", restarts)
    if radius is not None:
        radius = positive_float("radius", radius)
    sample_size = optional_positive_int("sample_size", sample_size)
    if kind == "sampler" and sample_size is None:
        raise ValueError("estimate_smoothness needs a 'sample_size' for sampler tasks (got None)")
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("'model' has no trainable parameters (none with requires_grad=True)")
    names = select_parameters(model, trainable, adapted)
    loss = TaskLoss(model, loss_fn, names)  # the other parameters stay the model's own
    counts = [0, 0]  # gradient evaluations, Hessian-vector products

    with batch_statistics_only(model):
        start = loss.params()
        one = Ops(loss, None, batched=False)
        if radius is None:
            eps = torch.finfo(next(iter(start.values())).dtype).eps
            radius = eps ** (1 / 3) * max(1.0, _norm(start))

        batches: list[tuple[str, Any]] = []
        b_values: list[float] = []
        for index, task in enumerate(tasks):
            if isinstance(task, SupportQuery):
                batches += [(f"the support set of task {index}", task.support)]
                batches += [(f"the query set of task {index}", task.query)]
                support, _ = one.grad(start, task.support)
                query, _ = one.grad(start, task.query)
                counts[0] += 2
                gap = _norm({n: support[n] - query[n] for n in names})
                _check_finite(gap, f"the support/query gradient gap of task {index}")
                b_values.append(gap)
            else:
                assert sample_size is not None
                batches.append((f"a sample of task {index}", task.sample(sample_size, generator)))

        # Random starts drawn batch by batch, in one order whatever the grouping below.
        L_starts = [_random_unit(start, generator) for _ in batches]
        rho_starts = [[_random_unit(start, generator) for _ in range(restarts)] for _ in batches]
        eps = torch.finfo(next(iter(start.values())).dtype).eps
        L_runs: list[_Power] = []
        rho_runs: list[_Power] = []
        for group in _stackable_groups([batch for _, batch in batches]):
            hessian = _Hessians(loss, [batches[i] for i in group])
            group_L = _power(
                functools.partial(hessian, start),
                _stack([L_starts[i] for i in group]),
                iterations,
                tol,
            )
            L_runs += group_L
            # Rounding alone makes ||d(v)|| about eps * L / h: below a hundred times that,
            # the Hessian does not change measurably (a quadratic) and iterating is moot.
            floors = [100 * eps * run.value / radius for run in group_L]
            for restart in range(restarts):
                rho_runs += _power(
                    hessian.change(start, radius),
                    _stack([rho_starts[i][restart] for i in group]),
                    iterations,
                    tol,
                    floors,
                )
            counts[1] += hessian.products

    return SmoothnessEstimate(
        L=max(run.value for run in L_runs),
        rho=max(run.value for run in rho_runs),
        b=sum(b_values) / len(b_values) if b_values else None,
        b_max=max(b_values) if b_values else None,
        L_iterations=max(run.iterations for run in L_runs),
        L_converged=all(run.converged for run in L_runs),
        rho_iterations=max(run.iterations for run in rho_runs),
        rho_converged=all(run.converged for run in rho_runs),
        grad_evals=counts[0],
        hvp_evals=counts[1],
    )


def _stackable_groups(batches: Sequence[Any]) -> list[list[int]]:
    """Indices of the batches, grouped so that each group's batches stack (or alone)."""
    groups: dict[Any, list[int]] = {}
    for index, batch in enumerate(batches):
        leaves, spec = flatten(batch)
        if all(isinstance(leaf, Tensor) for leaf in leaves):
            key: Any = (str(spec), tuple((x.shape, x.dtype, x.device) for x in leaves))
        else:
            key = index  # a non-tensor leaf: not vectorised
        groups.setdefault(key, []).append(index)
    return list(groups.values())


class _Hessians:
    """Hessian-vector products on a group of batches, vectorised over them, counted.

    Vectors carry a leading dimension, one row per batch; the points may too.
    """

    def __init__(self, loss: TaskLoss, batches: list[tuple[str, Any]]):
        self.where = [where for where, _ in batches]
        self.batches = [batch for _, batch in batches]
        self.stacked = stack_batches(self.batches) if len(batches) > 1 else None
        self.ops = Ops(loss, None, batched=self.stacked is not None)
        self.products = 0

    def __call__(self, at: Params, v: Params, each: bool = False) -> Params:
        """``H_g(at) v_g`` for every batch ``g``; ``at`` has a row per batch if ``each``."""
        if self.stacked is None:
            point = {n: t[0] for n, t in at.items()} if each else at
            single = self.ops.hvp(point, self.batches[0], {n: t[0] for n, t in v.items()})
            out = {n: t.unsqueeze(0) for n, t in single.items()}
        else:
            rows = len(self.batches)
            points = at if each else {n: t.expand(rows, *t.shape) for n, t in at.items()}
            out = self.ops.hvp(points, self.stacked, v)
        self.products += len(self.where)
        bad = ~torch.isfinite(_norms(out))
        if bool(bad.any()):
            where = self.where[int(bad.nonzero()[0])]
            raise NonFiniteError(
                f"estimate_smoothness: a Hessian-vector product on {where} is not finite "
                "at the weights"
            )
        return out

    def change(self, at: Params, h: float) -> Callable[[Params], Params]:
        """``v -> (H(at + h v) v - H(at - h v) v) / (2 h)``, per batch."""

        def difference(v: Params) -> Params:
            plus = self({n: at[n] + h * v[n] for n in at}, v, each=True)
            minus = self({n: at[n] - h * v[n] for n in at}, v, each=True)
            return {n: (plus[n] - minus[n]) / (2 * h) for n in at}

        return difference


def _random_unit(like: Params, generator: torch.Generator) -> Params:
    """A random direction of unit norm, shaped like ``like``."""
    v = {
        n: torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)
        for n, t in like.items()
    }
    scale = _norm(v)
    return {n: t / scale for n, t in v.items()}


def _stack(vectors: list[Params]) -> Params:
    return {n: torch.stack([v[n] for v in vectors]) for n in vectors[0]}


def _norms(rows: Params) -> Tensor:
    """The norm of each row (leading index) of a stack of parameter dicts, in float64."""
    squares = [t.double().pow(2).reshape(t.shape[0], -1).sum(1) for t in rows.values()]
    return torch.stack(squares).sum(0).sqrt()


def _norm(tree: Params) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tree.values()))


def _check_finite(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(f"estimate_smoothness: {where} is not finite ({value}) at the weights")


def _power(
    operator: Callable[[Params], Params],
    v: Params,
    iterations: int,
    tol: float,
    floors: list[float] | None = None,
) -> list[_Power]:
    """Power iterations ``v <- A(v) / ||A(v)||``, one per row of ``v``: the largest ``||A(v)||``.

    A row has converged when the largest ``||A(v)||`` it has seen grew by at most
    ``tol`` relative over the last two iterations (two, so that an iteration cycling
    between two directions stops), or when ``||A(v)||`` is at most its floor. Every
    row iterates until the last converges; each reports where it converged.
    """
    rows = next(iter(v.values())).shape[0]
    floors = floors if floors is not None else [0.0] * rows
    results: list[_Power | None] = [None] * rows
    bests = [torch.zeros(rows, dtype=torch.float64)]
    for iteration in range(1, iterations + 1):
        out = operator(v)
        values = _norms(out)
        bests.append(torch.maximum(bests[-1], values))
        for row in range(rows):
            if results[row] is not None:
                continue
            best = float(bests[-1][row])
            settled = iteration >= 3 and best - float(bests[-3][row]) <= tol * best
            if float(values[row]) <= floors[row] or settled:
                results[row] = _Power(best, iteration, True)
        if all(result is not None for result in results):
            break
        scale = values.clamp_min(torch.finfo(torch.float64).tiny)
        v = {n: t / scale.reshape(-1, *[1] * (t.ndim - 1)).to(t) for n, t in out.items()}
    return [
        result if result is not None else _Power(float(bests[-1][row]), iterations, False)
        for row, result in enumerate(results)
    ]
