r"""The operations every meta-gradient algorithm is built from, and what it returns.

An algorithm (:mod:`torch_maml.algorithms`, or a user's own) is written once, for
one task, against an :class:`Ops`: the task loss's gradient, one inner step, the
vector-Jacobian product of a step, a Hessian-vector product, autograd through the
unrolled loop, and inner products and scalings that stay per task. The execution
layer (:mod:`torch_maml.execution`) hands it either

* an :class:`Ops` for one task, on plain tensors, or
* an :class:`Ops` for a chunk of tasks, vectorised: every tensor the algorithm sees
  has a leading task dimension, the loss is evaluated for all tasks at once with
  :func:`torch.func.vmap`, and the derivatives are taken by ``torch.autograd`` on the
  sum of the per-task losses (task ``i``'s loss depends on row ``i`` alone, so its
  gradient is row ``i`` of the result).

An algorithm that combines tensors only elementwise and reduces them only through
:meth:`Ops.dot`, :meth:`Ops.norm`, :meth:`Ops.scale`, :meth:`Ops.where` and
:meth:`Ops.any` computes the same thing in both. Derivatives are reverse mode
throughout, Hessian-vector products reverse over reverse (forward over reverse fails
on ``F.mse_loss`` in some torch releases).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias, cast

import torch
from torch import Tensor
from torch.func import grad as torch_grad
from torch.func import grad_and_value, vjp, vmap

from . import trees
from .inner import InnerLoop, adapted_names, elementwise
from .model import TaskLoss
from .typing import Batch, InnerState, Params

__all__ = [
    "FunctionalOps",
    "HostSyncError",
    "MetaGradient",
    "Ops",
    "OracleCounts",
    "Pullback",
    "Step",
]

NO_DEPENDENCE = (
    "'loss_fn' returned a loss that does not depend on the adapted parameters "
    "(it has no grad); does it detach, or ignore the model?"
)

Cotangent: TypeAlias = tuple[Params, InnerState]
Pullback: TypeAlias = Callable[[Cotangent], Cotangent]
"""The transposed Jacobian of one inner step: ``(v_w', v_s') -> (v_w, v_s)``."""


class HostSyncError(RuntimeError):
    """A captured or compiled meta step asked for a tensor's value on the host.

    ``Tensor.item``, ``bool(tensor)`` and the like make the host wait for the device,
    which a CUDA graph cannot, and which a compiled graph cannot trace.
    """


class MetaGradient(NamedTuple):
    """An estimator's result for a meta-batch, or an algorithm's for one task."""

    grads: Params
    """The meta gradient ``G`` by parameter name (for a meta-batch: the mean over its tasks)."""
    loss: Tensor
    """The outer (query) loss after adaptation, detached (for a meta-batch: the mean)."""
    grad_evals: int
    """Gradient evaluations made (per task, for an algorithm's result)."""
    hvp_evals: int
    """Hessian-vector products made (per task, for an algorithm's result)."""


@dataclass
class OracleCounts:
    """A running count of oracle calls: gradients and Hessian-vector products."""

    grad_evals: int = 0
    hvp_evals: int = 0


class Step(NamedTuple):
    """One inner step: the new iterate and state, the loss it moved on, its linearisation."""

    params: Params
    """``w_{j+1}``, detached."""
    state: InnerState
    """``s_{j+1}``, detached."""
    value: Tensor
    """``l(w_j; batch_j)``, detached (one per task when vectorised)."""
    pullback: Pullback | None
    """The step's transposed Jacobian on ``batch_j``, if asked for."""


class Ops:
    """The operations on one task, or on a chunk of tasks vectorised along dimension 0.

    Args:
        loss: the task loss ``l(w; batch)`` (None: only the per-task algebra is used).
        inner_loop: the inner optimiser (None: only :meth:`value`, :meth:`grad`,
            :meth:`hvp` and the algebra are used).
        batched: whether tensors carry a leading task dimension.
        keep_graphs: whether :meth:`step` keeps the graph of each step it linearises
            (fast, memory like autograd through the unrolled loop) or recomputes the
            step when its pullback is called (memory of one step).
    """

    def __init__(
        self,
        loss: TaskLoss | None,
        inner_loop: InnerLoop | None,
        *,
        batched: bool,
        keep_graphs: bool = False,
    ) -> None:
        self._loss = loss
        self._inner_loop = inner_loop
        self.batched = batched
        self.keep_graphs = keep_graphs
        names = () if loss is None else loss.names
        self.adapted = names if inner_loop is None else adapted_names(inner_loop, names)
        """The names of the parameters the inner loop moves."""
        self._init: Callable[[Params], InnerState] | None = None
        self._update: Callable[..., tuple[Params, InnerState]] | None = None
        if inner_loop is not None:  # per task, unless each element is updated alone
            vectorise = batched and not elementwise(inner_loop)
            self._init = vmap(inner_loop.init) if vectorise else inner_loop.init
            self._update = vmap(inner_loop.update) if vectorise else inner_loop.update
        self._evaluate: Callable[[Params, Batch], Tensor] | None = None
        if loss is not None:
            self._evaluate = vmap(loss, randomness="different") if batched else loss

    @property
    def loss(self) -> TaskLoss:
        """The task loss."""
        if self._loss is None:
            raise RuntimeError("these operations were built without a loss")
        return self._loss

    @property
    def inner_loop(self) -> InnerLoop:
        """The inner optimiser."""
        if self._inner_loop is None:
            raise RuntimeError("these operations were built without an inner loop")
        return self._inner_loop

    # ------------------------------------------------------------ per-task algebra

    def dot(self, a: Params, b: Params) -> Tensor:
        """``<a, b>`` over all parameters: a scalar per task."""
        if self.batched:
            terms = [(a[n] * b[n]).reshape(a[n].shape[0], -1).sum(1) for n in a]
        else:
            terms = [(a[n] * b[n]).sum() for n in a]
        return torch.stack(terms).sum(0)

    def norm(self, a: Params) -> Tensor:
        """``||a||`` over all parameters: a scalar per task."""
        return self.dot(a, a).sqrt()

    def scale(self, a: Params, s: Tensor) -> Params:
        """``s * a`` for a scalar ``s`` per task."""
        return {n: self._broadcast(s, t) * t for n, t in a.items()}

    def where(self, condition: Tensor, a: Params, b: Params) -> Params:
        """``a`` for the tasks where ``condition`` (a bool per task) holds, else ``b``."""
        return {n: torch.where(self._broadcast(condition, t), t, b[n]) for n, t in a.items()}

    def any(self, condition: Tensor) -> bool:
        """Whether ``condition`` (a bool per task) holds for some task (a host sync)."""
        return bool(condition.any())

    def _values(self, params: Params, batch: Batch) -> Tensor:
        """The loss of ``batch`` at ``params``: one per task when vectorised."""
        if self._evaluate is None:
            raise RuntimeError("these operations were built without a loss")
        return self._evaluate(params, batch)

    def _broadcast(self, s: Tensor, like: Tensor) -> Tensor:
        return s.reshape(-1, *([1] * (like.ndim - 1))) if self.batched else s

    # ------------------------------------------------------------ the oracles

    def value(self, params: Params, batch: Batch) -> Tensor:
        """``l(w; batch)``, without a graph (one per task when vectorised)."""
        with torch.no_grad():
            return self._values(params, batch)

    def grad(self, params: Params, batch: Batch) -> tuple[Params, Tensor]:
        """``(grad l(w; batch), l(w; batch))`` with respect to every parameter, detached.

        Raises:
            ValueError: the loss does not depend on the adapted parameters at all.
        """
        with torch.enable_grad():
            weights = trees.requiring_grad(params)
            value = self._values(weights, batch)
            grads = self._loss_grads(value, weights, create_graph=False)
        return grads, value.detach()

    def init(self, params: Params) -> InnerState:
        """The inner loop's state ``s_0`` at ``w_0 = params``, detached."""
        return trees.detach(self._step_init(params))

    def step(
        self, params: Params, state: InnerState, batch: Batch, *, linearize: bool = False
    ) -> Step:
        """One inner step on ``batch``: ``update(w_j, grad l(w_j; batch), s_j)``.

        With ``linearize``, the result carries the step's pullback on ``batch``: the
        kept graph of this step (``keep_graphs``), or a recomputation of it that
        replays the random draws this step made (dropout), so that both agree.
        """
        if linearize and self.keep_graphs:
            with torch.enable_grad():
                inputs = (trees.requiring_grad(params), trees.requiring_grad(state))
                value, outputs = self._differentiable_step(*inputs, batch)

            def kept(cotangent: Cotangent) -> Cotangent:
                result: Cotangent = _vjp(outputs, inputs, cotangent)
                return result

            return Step(trees.detach(outputs[0]), trees.detach(outputs[1]), value, kept)

        randomness = _Randomness(params) if linearize else None
        with torch.enable_grad():
            weights = trees.detach(params)
            for name in self.adapted:
                weights[name] = weights[name].requires_grad_(True)
            value = self._values(weights, batch)
            grads = self._loss_grads(value, {n: weights[n] for n in self.adapted}, False)
        with torch.no_grad():
            new_params, new_state = self._step_update(
                trees.detach(params), grads, trees.detach(state)
            )
        pullback = None
        if randomness is not None:

            def recomputed(cotangent: Cotangent) -> Cotangent:
                with randomness.replayed():
                    return self.step_vjp(params, state, batch, cotangent)

            pullback = recomputed
        return Step(new_params, new_state, value.detach(), pullback)

    def step_vjp(
        self, params: Params, state: InnerState, batch: Batch, cotangent: Cotangent
    ) -> Cotangent:
        """The vector-Jacobian product of one inner step, its gradient taken on ``batch``.

        For gradient descent, ``(v, ()) -> (v - alpha * H(w_j; batch) v, ())``.
        """
        with torch.enable_grad():
            inputs = (trees.requiring_grad(params), trees.requiring_grad(state))
            _, outputs = self._differentiable_step(*inputs, batch)
            result: Cotangent = _vjp(outputs, inputs, cotangent)
        return result

    def init_vjp(self, params: Params, cot_state: InnerState) -> Params:
        """``grad_w <init(w), v_s>``: the share of the gradient that reaches ``w`` via ``s_0``."""
        with torch.enable_grad():
            weights = trees.requiring_grad(params)
            state = self._step_init(weights)
            grads: Params = _vjp(state, weights, cot_state)
        return grads

    def hvp(self, params: Params, batch: Batch, vector: Params) -> Params:
        """``H(w; batch) v``, the exact Hessian-vector product (reverse over reverse)."""
        with torch.enable_grad():
            weights = trees.requiring_grad(params)
            value = self._values(weights, batch)
            grads = self._loss_grads(value, weights, create_graph=True)
            product: Params = _vjp(grads, weights, vector)
        return product

    def unrolled(
        self, params: Params, inner_batches: Sequence[Batch], outer_batch: Batch
    ) -> tuple[Params, Tensor]:
        """``(d l(w_N(w); outer) / dw, l(w_N; outer))`` by autograd through the steps.

        The Hessian of each step is taken on the batch that moved the iterate.
        """
        with torch.enable_grad():
            start = trees.requiring_grad(params)
            weights, state = start, self._step_init(start)
            for batch in inner_batches:
                _, (weights, state) = self._differentiable_step(weights, state, batch)
            value = self._values(weights, outer_batch)
            grads = self._loss_grads(value, start, create_graph=False)
        return grads, value.detach()

    # ------------------------------------------------------------ internals

    def _step_init(self, params: Params) -> InnerState:
        if self._init is None:
            raise RuntimeError("these operations were built without an inner loop")
        return self._init(params)

    def _step_update(
        self, params: Params, grads: Params, state: InnerState
    ) -> tuple[Params, InnerState]:
        if self._update is None:
            raise RuntimeError("these operations were built without an inner loop")
        return self._update(params, grads, state)

    def _differentiable_step(
        self, params: Params, state: InnerState, batch: Batch
    ) -> tuple[Tensor, tuple[Params, InnerState]]:
        value = self._values(params, batch)
        grads = self._loss_grads(value, {n: params[n] for n in self.adapted}, True)
        return value.detach(), self._step_update(params, grads, state)

    @staticmethod
    def _loss_grads(value: Tensor, inputs: Params, create_graph: bool) -> Params:
        """``d sum(value) / d inputs``; zeros for inputs the loss does not use.

        Raises:
            ValueError: the loss uses none of ``inputs``.
        """
        if not value.requires_grad:
            raise ValueError(NO_DEPENDENCE)
        found = torch.autograd.grad(
            value.sum(), list(inputs.values()), create_graph=create_graph, allow_unused=True
        )
        if all(g is None for g in found):
            raise ValueError(NO_DEPENDENCE)
        return {
            name: torch.zeros_like(t) if g is None else g
            for (name, t), g in zip(inputs.items(), found, strict=True)
        }


def _vjp(outputs: Any, inputs: Any, cotangent: Any) -> Any:
    """``sum <outputs, cotangent>`` differentiated with respect to ``inputs`` (pytrees).

    Inputs the outputs do not depend on get zeros.
    """
    out_leaves = trees.leaves(outputs)
    cot_leaves = trees.leaves(cotangent)
    in_leaves = trees.leaves(inputs)
    pairs = [(o, c) for o, c in zip(out_leaves, cot_leaves, strict=True) if o.requires_grad]
    wanted = [i for i, leaf in enumerate(in_leaves) if leaf.requires_grad]
    found: Sequence[Tensor | None] = [None] * len(wanted)
    if pairs and wanted:
        found = torch.autograd.grad(
            [o for o, _ in pairs],
            [in_leaves[i] for i in wanted],
            grad_outputs=[c for _, c in pairs],
            allow_unused=True,
        )
    grads = [torch.zeros_like(leaf) for leaf in in_leaves]
    for i, g in zip(wanted, found, strict=True):
        if g is not None:
            grads[i] = g
    return trees.rebuild(inputs, iter(grads))


class _Randomness:
    """The random number generators' states before a step, to replay its draws."""

    def __init__(self, params: Params) -> None:
        self.cpu = torch.get_rng_state()
        devices = {t.device for t in params.values() if t.device.type == "cuda"}
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        self.cuda = {} if capturing else {d: torch.cuda.get_rng_state(d) for d in devices}

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=list(self.cuda), device_type="cuda"):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


class FunctionalOps(Ops):
    """The same operations on one task, by ``torch.func`` transforms alone.

    What ``compile=True`` runs: the execution layer vmaps a whole per-task algorithm
    over the tasks of a chunk with these operations and compiles the result, which
    ``torch.compile`` traces into one graph (it compiles torch.func's transforms
    natively, where it would stop at every ``torch.autograd.grad``). Tensors are one
    task's, so the per-task algebra is plain. :meth:`any` cannot look at a value
    while the algorithm is traced: it raises, and an algorithm that stops on a host
    decision runs eagerly.

    Args:
        loss: the task loss.
        inner_loop: the inner optimiser.
        keep_graphs: whether :meth:`step` returns the step's own pullback (kept by
            ``torch.func.vjp``) or one that recomputes the step.
    """

    def __init__(self, loss: TaskLoss, inner_loop: InnerLoop, *, keep_graphs: bool) -> None:
        super().__init__(loss, inner_loop, batched=False, keep_graphs=keep_graphs)

    def any(self, condition: Tensor) -> bool:
        """Refused: a compiled algorithm cannot decide on a tensor's value."""
        raise HostSyncError(
            "Ops.any needs the value of a tensor, which a compiled meta step does not have"
        )

    def value(self, params: Params, batch: Batch) -> Tensor:
        """``l(w; batch)``."""
        return self._values(params, batch)

    def grad(self, params: Params, batch: Batch) -> tuple[Params, Tensor]:
        """``(grad l(w; batch), l(w; batch))`` with respect to every parameter."""
        grads, value = grad_and_value(self._dependent_values)(params, batch)
        return grads, value

    def init(self, params: Params) -> InnerState:
        """The inner loop's state ``s_0`` at ``w_0 = params``."""
        return self._step_init(params)

    def step(
        self, params: Params, state: InnerState, batch: Batch, *, linearize: bool = False
    ) -> Step:
        """One inner step on ``batch``, with its pullback if asked for (see :class:`Ops`)."""

        def step(p: Params, s: InnerState) -> tuple[tuple[Params, InnerState], Tensor]:
            value, outputs = self._differentiable_step(p, s, batch)
            return outputs, value

        if linearize and self.keep_graphs:
            linearised = cast(tuple[Any, Any, Any], vjp(step, params, state, has_aux=True))
            (new_params, new_state), kept, value = linearised  # stubs omit the aux output
            return Step(new_params, new_state, value, kept)
        (new_params, new_state), value = step(params, state)
        pullback = None
        if linearize:

            def recomputed(cotangent: Cotangent) -> Cotangent:
                return self.step_vjp(params, state, batch, cotangent)

            pullback = recomputed
        return Step(new_params, new_state, value, pullback)

    def step_vjp(
        self, params: Params, state: InnerState, batch: Batch, cotangent: Cotangent
    ) -> Cotangent:
        """The vector-Jacobian product of one inner step, its gradient taken on ``batch``."""

        def step(p: Params, s: InnerState) -> tuple[Params, InnerState]:
            return self._differentiable_step(p, s, batch)[1]

        result: Cotangent = vjp(step, params, state)[1](cotangent)
        return result

    def init_vjp(self, params: Params, cot_state: InnerState) -> Params:
        """``grad_w <init(w), v_s>``."""
        grads: Params = vjp(self._step_init, params)[1](cot_state)[0]
        return grads

    def hvp(self, params: Params, batch: Batch, vector: Params) -> Params:
        """``H(w; batch) v``, reverse over reverse."""

        def gradient(p: Params) -> Params:
            grads: Params = torch_grad(self._dependent_values)(p, batch)
            return grads

        product: Params = vjp(gradient, params)[1](vector)[0]
        return product

    def unrolled(
        self, params: Params, inner_batches: Sequence[Batch], outer_batch: Batch
    ) -> tuple[Params, Tensor]:
        """``(d l(w_N(w); outer) / dw, l(w_N; outer))`` through the unrolled steps."""

        def meta_loss(start: Params) -> Tensor:
            weights, state = start, self._step_init(start)
            for batch in inner_batches:
                _, (weights, state) = self._differentiable_step(weights, state, batch)
            return self._dependent_values(weights, outer_batch)

        grads, value = grad_and_value(meta_loss)(params)
        return grads, value

    def _differentiable_step(
        self, params: Params, state: InnerState, batch: Batch
    ) -> tuple[Tensor, tuple[Params, InnerState]]:
        def adapted_loss(adapted: Params) -> Tensor:
            return self._dependent_values({**params, **adapted}, batch)

        grads, value = grad_and_value(adapted_loss)({n: params[n] for n in self.adapted})
        return value, self._step_update(params, grads, state)

    def _dependent_values(self, params: Params, batch: Batch) -> Tensor:
        """:meth:`_values`, to be differentiated with respect to ``params``.

        Inside a ``torch.func`` gradient transform, ``requires_grad`` says whether the
        value depends on the transform's inputs (a loss that requires grad only through
        some other tensor does not); ``torch.func`` would return zeros. The check runs
        when the function is traced: compiled code that meets it falls back to the
        eager path, which raises the same error as without compilation.

        Raises:
            ValueError: the loss does not depend on ``params``.
        """
        value = self._values(params, batch)
        if not value.requires_grad:
            raise ValueError(NO_DEPENDENCE)
        return value
