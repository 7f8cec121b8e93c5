r"""The :class:`MetaOptimizer`: multi-step MAML as a ``torch.optim.Optimizer``.

One meta iteration (Algorithm 1 line 11, Algorithm 2 line 9):

.. math:: w_{k+1} = w_k - \beta_k \frac{1}{|B_k|}\sum_{i \in B_k} \hat G_i(w_k)

where the estimator gives :math:`\hat G_i` and the step-size policy :math:`\beta_k`.
The optimizer holds the choices and the state; the estimator and the execution
layer (:mod:`torch_maml.execution`) compute, :mod:`torch_maml.distributed` averages
over processes, :mod:`torch_maml.diagnosis` explains a NaN.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Literal, NamedTuple, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checks import positive_int
from .diagnosis import locate_nonfinite
from .distributed import (
    agree_on_step,
    all_reduce_estimate,
    all_reduce_mean,
    all_reduce_probe,
    broadcast_parameters,
    process_group,
)
from .errors import CompileWarning, NonFiniteError
from .estimators import DrawsSamples, MetaGradient, MetaGradientEstimator
from .execution import (
    CaptureSetting,
    ChunkSize,
    Inputs,
    StepCapture,
    check_capture,
    check_chunk_size,
    task_layout,
)
from .inner import InnerLoop, Masked
from .inner import adapted_names as inner_adapted_names
from .model import (
    ParamSelection,
    TaskLoss,
    meta_step_mode,
    restoring_buffers,
    select_parameters,
    unwrap_compiled,
)
from .objective import MetaObjective
from .ops import OracleCounts
from .smoothness import SmoothnessEstimate, estimate_smoothness
from .step_size import Setting, StepContext, StepSize, StepSizePolicy
from .tasks import Sampler, SupportQuery, Task, task_kind
from .typing import BatchT, LossFn, ModelT, Params

__all__ = ["MetaBackwardInfo", "MetaOptimizer", "MetaStepInfo", "NanPolicy", "ParamSelection"]

NanPolicy: TypeAlias = Literal["raise", "skip"]
"""What a meta step that meets a NaN or Inf does: raise NonFiniteError, or skip itself."""


class MetaStepInfo(NamedTuple):
    """What one :meth:`MetaOptimizer.step` did."""

    loss: Tensor
    """Mean outer (query) loss after adaptation, at ``w_k`` (before the update); detached."""
    beta: float
    """The outer step size ``beta_k`` used."""
    grad_evals: int
    """Gradient evaluations this step, probe gradients included (Corollaries 6 and 10)."""
    hvp_evals: int
    """Hessian-vector products this step (Corollaries 6 and 10)."""
    lhat: float | None
    """The smoothness estimate ``Lhat(w_k)`` (eq. 14 / 22), if the policy computed one."""
    skipped: bool = False
    """Whether the step was skipped for a NaN or Inf (``nan_policy="skip"``): ``w`` unchanged."""


class MetaBackwardInfo(NamedTuple):
    """What one :meth:`MetaOptimizer.meta_backward` did."""

    loss: Tensor
    """Mean outer (query) loss after adaptation; detached."""
    grad_evals: int
    """Gradient evaluations made."""
    hvp_evals: int
    """Hessian-vector products made."""
    skipped: bool = False
    """Whether no gradient was added for a NaN or Inf (``nan_policy="skip"``)."""


def _checked_state(state_dict: object, params: int) -> dict[str, Any]:
    """The ``meta`` entry of a MetaOptimizer state dict, after checking every entry.

    Raises:
        ValueError: an entry is missing or of the wrong kind, named in the message.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(
            "'state_dict' must be a dict from MetaOptimizer.state_dict() "
            f"(got an object of type {type(state_dict).__name__})"
        )
    missing = [key for key in ("state", "param_groups", "meta") if key not in state_dict]
    if missing:
        raise ValueError(
            f"'state_dict' must come from MetaOptimizer.state_dict() (it has no {missing} entry)"
        )
    meta = state_dict["meta"]
    groups = state_dict["param_groups"]
    if not isinstance(meta, dict):
        raise ValueError("'state_dict[\"meta\"]' must be a dict")
    missing = [
        key
        for key in ("meta_steps", "skipped_steps", "step_size_state", "generator", "config")
        if key not in meta
    ]
    if missing:
        raise ValueError(f"'state_dict[\"meta\"]' has no {missing} entry")
    for key in ("meta_steps", "skipped_steps"):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f'\'state_dict["meta"]["{key}"]\' must be an int >= 0 (got {value!r})')
    if not isinstance(meta["step_size_state"], dict) or not isinstance(meta["config"], dict):
        raise ValueError("'state_dict[\"meta\"]': 'step_size_state' and 'config' must be dicts")
    try:
        torch.Generator().set_state(meta["generator"])
    except (TypeError, RuntimeError) as error:
        raise ValueError(
            f'\'state_dict["meta"]["generator"]\' is not a generator state ({error})'
        ) from None
    if (
        not isinstance(groups, list)
        or len(groups) != 1
        or not isinstance(groups[0], dict)
        or len(groups[0].get("params", ())) != params
    ):
        raise ValueError(
            "'state_dict[\"param_groups\"]' must hold one group of "
            f"{params} parameters, as this optimizer's"
        )
    lr = groups[0].get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise ValueError(
            f'\'state_dict["param_groups"][0]["lr"]\' must be a finite number (got {lr!r})'
        )
    if not isinstance(state_dict["state"], dict):
        raise ValueError("'state_dict[\"state\"]' must be a dict")
    return meta


def _describe_component(component: object) -> str:
    """A run-independent description of a component, for state_dict checks."""
    if dataclasses.is_dataclass(component):
        return repr(component)
    return f"{type(component).__module__}.{type(component).__qualname__}"


class MetaOptimizer(torch.optim.Optimizer, Generic[ModelT, BatchT]):
    r"""Multi-step MAML for any ``nn.Module``, with torch.optim's conventions.

    Each :meth:`step` adapts the model to every task of a meta-batch with
    ``inner_loop``, estimates the meta gradient with ``estimator``, and moves the
    model's trainable parameters by ``-beta_k`` times it, ``beta_k`` from ``step_size``:

    .. math:: w_{k+1} = w_k - \beta_k \frac{1}{|B_k|}\sum_{i \in B_k} \hat G_i(w_k)

    The meta parameters ``w`` are the model's parameters with ``requires_grad=True``
    when the optimizer is built; the inner loop adapts all of them, or the selection
    ``adapted``. Other parameters and buffers are used as they are. Freezing,
    replacing or adding parameters afterwards is refused at the next step with an
    error that says so (build a new optimizer for the new set of parameters).
    BatchNorm layers in training mode normalise every batch (each task's, at each
    inner step) with its own statistics and leave their running statistics
    unchanged; in eval mode they use the running statistics.

    Args:
        model: the module whose parameters are meta-learned (updated in place).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``. It is called with
            ``model`` itself, its parameters swapped for the adapted ones, so it may
            call the model or any of its submodules.
        inner_loop: the inner optimiser, e.g. :class:`~torch_maml.GradientDescent`.
        estimator: the meta-gradient estimator: the paper's :class:`~torch_maml.Exact`,
            :class:`~torch_maml.FiniteSum` or :class:`~torch_maml.Resampled`, or
            :class:`~torch_maml.FirstOrder`, :class:`~torch_maml.Reptile`,
            :class:`~torch_maml.HessianFree`, :class:`~torch_maml.Implicit`, or your own.
        step_size: the outer step-size policy: :class:`~torch_maml.Constant` or
            :class:`~torch_maml.SmoothnessAdaptive`. Its ``lr`` is the initial
            ``param_groups[0]["lr"]``.
        generator: the generator that sampler tasks draw from (saved in
            :meth:`state_dict`). Default: a new one seeded from torch's global RNG,
            so ``torch.manual_seed`` makes runs reproducible.
        task_chunk_size: how many tasks to vectorise at once when their batches
            stack: ``"auto"`` (default) bounds memory at four times the per-task
            loop's working set or 256 MiB more, whichever is larger (see
            :mod:`torch_maml.execution`); a number caps the chunk; ``None`` takes all
            tasks at once; 1 runs them one by one.
        compile: compile each meta step's computation with ``torch.compile``
            (``True``, or a dict of its keyword arguments). The first step of each
            shape pays the compilation (tens of seconds: the docs page "How tasks run"
            has measurements); if compilation fails, the optimizer warns once
            (:class:`~torch_maml.CompileWarning`) and runs eagerly.
        adapted: the parameters the inner loop adapts (default: all trainable ones),
            as names or module prefixes (``["head"]`` selects ``head.weight`` and
            ``head.bias``) or a predicate on parameter names. The meta gradient
            still reaches every trainable parameter (ANIL, Raghu et al. 2020, with
            the head selected).
        nan_policy: ``"raise"`` (default): a NaN or Inf in a loss, a gradient or
            the step size raises :class:`~torch_maml.NonFiniteError`, which says
            where it first appeared; ``"skip"``: the step leaves the weights, their
            gradients, the buffers and the step-size policy's state as they were
            (the generator moves on: the next step draws new samples) and reports
            ``skipped=True``; :attr:`skipped_steps` counts them.
        distributed: average the meta gradient over the processes of
            ``torch.distributed``'s default group (``True``) or of a given process
            group, before the update: each process passes its own shard of the
            meta-batch, and all keep the same weights (broadcast from the group's
            first rank when the optimizer is built). Needs an initialised process group.
        capture: run each step's device work as a CUDA graph, replayed: ``"auto"``
            (default) where it applies (CUDA parameters and SupportQuery tasks on the
            same device, not distributed), ``True`` to refuse to run otherwise, ``False``
            never, ``"check"`` to run eagerly with host synchronisation forbidden, as in
            a capture (to find why a configuration of your own does not capture). A
            graph is captured the second time a signature (the tasks' shapes, dtypes
            and devices, the parameters' storage, the modules' training modes) is seen,
            and at most :data:`~torch_maml.execution.CAPTURE_BOUND` are kept; see
            the docs' execution page for what a replay does not see.

    References:
        C. Finn, P. Abbeel, S. Levine. *Model-Agnostic Meta-Learning for Fast
        Adaptation of Deep Networks.* ICML 2017.
        K. Ji, J. Yang, Y. Liang. *Theoretical Convergence of Multi-Step
        Model-Agnostic Meta-Learning.* JMLR 2022.

    Example:
        >>> import torch, torch.nn.functional as F, torch_maml as tm
        >>> model = torch.nn.Linear(1, 1)
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return F.mse_loss(model(x), y)
        >>> meta_opt = tm.MetaOptimizer(
        ...     model, loss_fn,
        ...     inner_loop=tm.GradientDescent(steps=2, lr=0.1),
        ...     estimator=tm.FiniteSum(),
        ...     step_size=tm.Constant(0.01),
        ... )
        >>> x = torch.randn(8, 1)
        >>> info = meta_opt.step([tm.SupportQuery((x[:4], 2 * x[:4]), (x[4:], 2 * x[4:]))])
        >>> info.grad_evals, info.hvp_evals
        (3, 2)
    """

    def __init__(
        self,
        model: ModelT,
        loss_fn: LossFn[ModelT, BatchT],
        *,
        inner_loop: InnerLoop,
        estimator: MetaGradientEstimator,
        step_size: StepSizePolicy,
        generator: torch.Generator | None = None,
        task_chunk_size: ChunkSize = "auto",
        compile: bool | Mapping[str, Any] = False,
        adapted: ParamSelection | None = None,
        nan_policy: NanPolicy = "raise",
        distributed: bool | dist.ProcessGroup = False,
        capture: CaptureSetting = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"'model' must be a torch.nn.Module (got an object of type {type(model).__name__})"
            )
        if unwrap_compiled(model) is not model:
            warnings.warn(
                "'model' is a torch.compile()d module: meta steps differentiate twice "
                "through its forward pass, which a compiled module does not support, so "
                "they run its original module (the same weights); pass compile=True to "
                "compile whole meta steps instead",
                CompileWarning,
                stacklevel=2,
            )
            model = unwrap_compiled(model)
        if not callable(loss_fn):
            raise TypeError(
                "'loss_fn' must be callable as loss_fn(model, batch) "
                f"(got an object of type {type(loss_fn).__name__})"
            )
        for name, component, protocol in (
            ("inner_loop", inner_loop, InnerLoop),
            ("estimator", estimator, MetaGradientEstimator),
            ("step_size", step_size, StepSizePolicy),
        ):
            if not isinstance(component, protocol):
                raise TypeError(
                    f"'{name}' must implement the {protocol.__name__} protocol "
                    f"(got an object of type {type(component).__name__})"
                )
        positive_int("inner_loop.steps", inner_loop.steps)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                "'generator' must be a torch.Generator or None "
                f"(got an object of type {type(generator).__name__})"
            )
        check_chunk_size(task_chunk_size)
        check_capture(capture)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("'model' has no trainable parameters (none with requires_grad=True)")
        if nan_policy not in ("raise", "skip"):
            raise ValueError(f"'nan_policy' must be 'raise' or 'skip' (got {nan_policy!r})")
        names = [name for name, _ in named]
        selected = select_parameters(model, names, adapted)
        inner: InnerLoop = inner_loop
        if len(selected) < len(names):
            inner = Masked(inner_loop, selected)
        adapted_names = inner_adapted_names(inner, names)  # a Masked inner loop's too
        for component in (estimator, step_size):  # what each needs of the inner loop
            check = getattr(component, "check", None)
            if callable(check):
                check(inner)
        self._group = process_group(distributed)

        # Plain tensors, not (name, tensor) pairs: named param groups need torch >= 2.5.
        super().__init__([p for _, p in named], {"lr": step_size.lr})
        self._param_names = names
        self.model = model
        self.inner_loop = inner_loop
        self.estimator = estimator
        self.step_size = step_size
        self.adapted = adapted_names
        """The names of the parameters the inner loop adapts."""
        self.nan_policy: NanPolicy = nan_policy
        self.objective = MetaObjective(
            TaskLoss(model, loss_fn, names),
            inner,
            task_chunk_size=task_chunk_size,
            compile=compile,
        )
        if generator is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        self.meta_steps = 0
        """The number ``k`` of meta steps taken by :meth:`step` (skipped ones not counted)."""
        self.skipped_steps = 0
        """Steps and meta_backward calls skipped for a NaN or Inf (``nan_policy="skip"``)."""
        self.loss_fn = loss_fn
        self._step_size_state: dict[str, Any] = {}
        self._collective_calls = 0  # steps and meta_backward calls, checked across processes
        self.cuda_graphs = StepCapture(capture)
        """The CUDA graphs of captured steps (``capture``): how many, captured how often."""
        self._beta_buffer: Tensor | None = None
        if self._group is not None:
            broadcast_parameters([p for _, p in named], self._group())

    # torch.optim.Optimizer.step takes an optional loss closure; a meta step needs a
    # meta-batch instead, and returns what it did. No signature can be both (the
    # base's overloads return None or float), so this override is deliberately not
    # Liskov-compatible, as torch's own LBFGS.step(closure) is not; calling it with a
    # closure raises a TypeError that says so.
    def step(  # type: ignore[override]
        self,
        tasks: Sequence[Task[BatchT]],
        *,
        probe_tasks: Sequence[Task[BatchT]] | None = None,
    ) -> MetaStepInfo:
        r"""One meta iteration: ``w_{k+1} = w_k - beta_k * mean_i G_i(w_k)``.

        Does not read or write ``p.grad``. The new weights are computed and checked
        before any is written: if anything fails (bad input, a NaN or Inf anywhere,
        the new weights included), the model's parameters and the optimizer's state
        are left as they were.

        Args:
            tasks: the meta-batch ``B_k``: SupportQuery tasks or samplers, one kind.
            probe_tasks: the independent task batch ``B'_k`` on which a
                smoothness-adaptive policy measures gradient norms (default: ``tasks``).

        Returns:
            :class:`MetaStepInfo`: loss, beta, grad_evals, hvp_evals, lhat, skipped.

        Raises:
            NonFiniteError: the loss, the meta gradient, the step size or the new
                weights are NaN or Inf (with ``nan_policy="raise"``).
        """
        self._reject_closure(tasks)
        self._check_model()
        setting = self._setting(tasks, "tasks")
        if probe_tasks is not None and self._setting(probe_tasks, "probe_tasks") != setting:
            raise TypeError("'probe_tasks' must be of the same kind as 'tasks'")
        with _RestoreGenerator(self.generator), meta_step_mode(self.model):
            params = self.objective.loss.params()
            probe_counts = OracleCounts()
            probes = probe_tasks if probe_tasks is not None else tasks
            context = StepContext(
                lr=float(self.param_groups[0]["lr"]),
                step=self.meta_steps,
                inner_loop=self.objective.inner_loop,
                setting=setting,
                probe_grad_norm=lambda size: self._probe_grad_norm(
                    params, probes, size, probe_counts
                ),
                state=copy.deepcopy(self._step_size_state),
                estimate_smoothness=lambda **options: self._estimate_smoothness(
                    probes, probe_counts, options, setting
                ),
            )
            try:
                size = self.step_size(context)
            except _SkipStepError:
                return self._skipped(None, probe_counts)
            if not self._check_step_size(size):
                return self._skipped(None, probe_counts)
            self._beta(params).fill_(size.beta)
            outcome = self._run(self._step_region, tasks)
            if not self._accept(outcome, params, tasks, size.beta):
                return self._skipped(outcome.result, probe_counts)
        self.meta_steps += 1
        self._step_size_state = context.state
        result = outcome.result
        return MetaStepInfo(
            loss=result.loss.clone(),
            beta=size.beta,
            grad_evals=result.grad_evals + probe_counts.grad_evals,
            hvp_evals=result.hvp_evals + probe_counts.hvp_evals,
            lhat=size.lhat,
        )

    def _skipped(self, result: MetaGradient | None, probe_counts: OracleCounts) -> MetaStepInfo:
        """A step that changed nothing (``nan_policy="skip"``); its meta gradient, if any."""
        self.skipped_steps += 1
        loss = result.loss.clone() if result is not None else torch.tensor(float("nan"))
        return MetaStepInfo(
            loss=loss,
            beta=0.0,
            grad_evals=(result.grad_evals if result else 0) + probe_counts.grad_evals,
            hvp_evals=(result.hvp_evals if result else 0) + probe_counts.hvp_evals,
            lhat=None,
            skipped=True,
        )

    def meta_backward(self, tasks: Sequence[Task[BatchT]]) -> MetaBackwardInfo:
        r"""Add the meta gradient ``mean_i G_i(w_k)`` into each parameter's ``.grad``.

        Like ``loss.backward()``: sums into an existing ``.grad`` and creates it
        where it is ``None``, so any ``torch.optim`` optimizer (Adam...) can take
        the outer step. No ``.grad`` changes if it fails.

        Args:
            tasks: the meta-batch: SupportQuery tasks or samplers, one kind.
        """
        self._reject_closure(tasks)
        self._check_model()
        self._setting(tasks, "tasks")
        with _RestoreGenerator(self.generator), meta_step_mode(self.model):
            params = self.objective.loss.params()
            outcome = self._run(self._backward_region, tasks)
            finite = self._accept(outcome, params, tasks, None)
        result = outcome.result
        info = MetaBackwardInfo(result.loss.clone(), result.grad_evals, result.hvp_evals)
        if not finite:
            self.skipped_steps += 1
            return info._replace(skipped=True)
        with torch.no_grad():
            for name, p in self._named_params():
                if p.grad is None:
                    p.grad = result.grads[name].clone()
                else:
                    p.grad.add_(result.grads[name])
        return info

    def adapt(
        self,
        task: Task[BatchT],
        *,
        steps: int | None = None,
        inner_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Params:
        """The weights adapted to one task by the inner loop, from the current ``w``.

        Use them with ``torch.func.functional_call(model, params, args)``. The
        inner loop runs on the task's support set (SupportQuery) or on fresh
        samples of ``inner_size`` (samplers).

        Args:
            task: a SupportQuery task or a sampler.
            steps: number of inner steps (default: ``inner_loop.steps``); more steps
                at test time than in training is common.
            inner_size: samples per step for a sampler (default: the estimator's
                ``sample_sizes.inner``).
            generator: generator for a sampler's draws (default: the optimizer's).

        Returns:
            The adapted parameters by name, detached.
        """
        if not isinstance(task, (SupportQuery, Sampler)):
            raise TypeError(
                "'task' must be a SupportQuery or have a sample(size, generator) method "
                f"(got an object of type {type(task).__name__})"
            )
        self._check_model()
        count = self.inner_loop.steps if steps is None else positive_int("steps", steps)
        if isinstance(task, SupportQuery):
            batches = [task.support] * count
        else:
            size = inner_size if inner_size is not None else self._sample_size("inner")
            if size is None:
                raise ValueError(
                    "adapting to a sampler task needs 'inner_size' (the estimator has none)"
                )
            size = positive_int("inner_size", size)
            draw_from = self.generator if generator is None else generator
            batches = [task.sample(size, generator=draw_from) for _ in range(count)]
        with meta_step_mode(self.model):
            return self.objective.adapt(self.objective.loss.params(), batches)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state: param_groups, meta step count, generator, configuration.

        Resuming needs the model's own ``state_dict`` too, as with any torch optimizer.
        """
        state = super().state_dict()
        state["meta"] = {
            "meta_steps": self.meta_steps,
            "skipped_steps": self.skipped_steps,
            "step_size_state": copy.deepcopy(self._step_size_state),
            "generator": self.generator.get_state(),
            "config": self._config(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, refusing one of another configuration.

        Everything is checked before anything changes: a refused dict leaves the
        optimizer (learning rate, step counts, generator) as it was.

        Raises:
            ValueError: the dict is not a MetaOptimizer's state (an entry is missing or
                of the wrong kind: the message names it), or was saved by a
                MetaOptimizer with other parameters or components (the message lists
                what differs).
        """
        meta = _checked_state(state_dict, len(self._param_names))
        saved, ours = meta["config"], self._config()
        differences = [
            f"{key}: saved {saved.get(key)!r}, this optimizer has {ours[key]!r}"
            for key in ours
            if saved.get(key) != ours[key]
        ]
        if differences:
            raise ValueError(
                "'state_dict' comes from a MetaOptimizer of another configuration: "
                + "; ".join(differences)
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "meta"})
        self.generator.set_state(meta["generator"])
        self.meta_steps = int(meta["meta_steps"])
        self.skipped_steps = int(meta["skipped_steps"])
        # under torch.distributed, a process resumed from another step than the others'
        # is then told apart at its next step
        self._collective_calls = self.meta_steps + self.skipped_steps
        self._step_size_state = copy.deepcopy(dict(meta["step_size_state"]))

    @property
    def step_size_state(self) -> dict[str, Any]:
        """A copy of the step-size policy's state (empty if it keeps none).

        A re-estimating :class:`~torch_maml.SmoothnessAdaptive` keeps its latest ``L``,
        ``rho`` and ``b`` here; :meth:`state_dict` saves it.
        """
        return copy.deepcopy(self._step_size_state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the meta parameters are the model's, in one group.

        Raises:
            TypeError: always, once the optimizer is built.
        """
        if self.param_groups:
            raise TypeError(
                "MetaOptimizer has one parameter group, the model's trainable parameters; "
                "it cannot take another (freeze parameters with requires_grad_(False) instead)"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ internals

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        return list(zip(self._param_names, self.param_groups[0]["params"], strict=True))

    def _config(self) -> dict[str, Any]:
        return {
            "params": [(name, tuple(p.shape), str(p.dtype)) for name, p in self._named_params()],
            "inner_loop": _describe_component(self.inner_loop),
            "estimator": _describe_component(self.estimator),
            "step_size": _describe_component(self.step_size),
            "adapted": list(self.adapted),
        }

    def _check_model(self) -> None:
        """Refuse parameters frozen, replaced or added since the optimizer was built."""
        current = dict(self.model.named_parameters())
        for name, p in self._named_params():
            now = current.get(name)
            if now is not p:
                raise ValueError(
                    f"the model's parameter {name!r} was replaced since the MetaOptimizer was "
                    "built (load_state_dict(..., assign=True), or a new nn.Parameter), so its "
                    "updates would not reach the model; build the MetaOptimizer after "
                    "replacing parameters. No weights were changed"
                )
            if not p.requires_grad:
                raise ValueError(
                    f"the model's parameter {name!r} was frozen (requires_grad=False) since "
                    "the MetaOptimizer was built; build a new MetaOptimizer for the new set "
                    "of trainable parameters. No weights were changed"
                )
        known = set(self._param_names)
        added = [name for name, p in current.items() if p.requires_grad and name not in known]
        if added:
            raise ValueError(
                f"the model has trainable parameters {added} that it did not have when the "
                "MetaOptimizer was built; build a new MetaOptimizer to meta-learn them, or "
                "freeze them (requires_grad_(False)). No weights were changed"
            )

    @staticmethod
    def _reject_closure(tasks: object) -> None:
        if callable(tasks):
            raise TypeError(
                "MetaOptimizer takes a meta-batch of tasks, not a loss closure "
                "(a sequence of SupportQuery tasks or samplers)"
            )

    def _setting(self, tasks: object, name: str) -> Setting:
        """The setting of a meta-batch; under torch.distributed, agreed by every process.

        A process may hold no task (an empty shard): it contributes nothing to the mean.
        """
        kind: str
        if self._group is None or name != "tasks":
            kind = task_kind(tasks, name)
        else:
            empty = (
                isinstance(tasks, Sequence)
                and not isinstance(tasks, (str, bytes))
                and (len(tasks) == 0)
            )
            try:
                mine = None if empty else task_kind(tasks, name)
            except (TypeError, ValueError):
                agree_on_step(self._collective_calls, "failed", self._group())  # others stop too
                raise
            kind = agree_on_step(self._collective_calls, mine, self._group())
            self._collective_calls += 1
        return "finite-sum" if kind == "support-query" else "resampling"

    def _sample_size(self, term: Literal["inner", "outer"]) -> int | None:
        if not isinstance(self.estimator, DrawsSamples):
            return None
        size: int | None = getattr(self.estimator.sample_sizes, term)
        return size

    def _step_region(self, tasks: Sequence[Task[BatchT]], commit: bool) -> _Outcome:
        """The device work of a step: meta gradient, checks, and the masked update.

        No host synchronisation: it can be captured as a CUDA graph. The new weights
        are written only if the loss, the meta gradient and the new weights are all
        finite (``commit``: write them at all; warm-ups of a capture do not).
        """
        params = self.objective.loss.params()
        result = self._estimate(params, tasks, commit)
        beta = self._beta(params)
        new = {name: p - beta * result.grads[name] for name, p in params.items()}
        flags = torch.stack(
            [
                _all_finite([result.loss]),
                _all_finite(result.grads.values()),
                _all_finite(new.values()),
            ]
        )
        if commit:
            ok = flags.all()
            with torch.no_grad():
                for name, p in self._named_params():
                    p.copy_(torch.where(ok, new[name], p))
        return _Outcome(result, flags)

    def _backward_region(self, tasks: Sequence[Task[BatchT]], commit: bool) -> _Outcome:
        """The device work of :meth:`meta_backward`: the meta gradient and its checks."""
        result = self._estimate(self.objective.loss.params(), tasks, commit)
        finite = [_all_finite([result.loss]), _all_finite(result.grads.values())]
        return _Outcome(result, torch.stack([*finite, torch.ones_like(finite[0])]))

    def _estimate(
        self, params: Params, tasks: Sequence[Task[BatchT]], commit: bool
    ) -> MetaGradient:
        """The estimator's meta gradient, averaged over the process group if any."""
        if self._group is not None and len(tasks) == 0:  # an empty shard adds nothing
            return all_reduce_mean(_zero_result(params), 0, self._group())
        with (
            restoring_buffers(self.model),
            self._refusals_shared(
                lambda group: all_reduce_mean(_zero_result(params), 0, group, refused=True)
            ),
        ):
            state = None if commit else self.generator.get_state()
            result = self.estimator.meta_gradient(self.objective, params, tasks, self.generator)
        if state is not None and not torch.equal(state, self.generator.get_state()):
            # a captured step could not draw anew at each replay
            raise RuntimeError("the estimator draws from the generator in Python")
        if self._group is not None:
            result = all_reduce_mean(result, len(tasks), self._group())
        return result

    @contextlib.contextmanager
    def _refusals_shared(self, join: Callable[[dist.ProcessGroup], object]) -> Iterator[None]:
        """Under torch.distributed, a refusal of this process's tasks stops the others too.

        The others wait in the collective that follows the block: ``join(group)`` joins
        it marked refused, so that every other process raises instead of pairing that
        collective with a later step's; then this process raises its own error.
        """
        try:
            yield
        except (TypeError, ValueError):
            if self._group is not None:
                join(self._group())
            raise

    def _run(
        self,
        region: Callable[[Sequence[Task[BatchT]], bool], _Outcome],
        tasks: Sequence[Task[BatchT]],
    ) -> _Outcome:
        """``region(tasks)``, captured as a CUDA graph where that applies."""
        setting = self.cuda_graphs.setting
        on_cuda = self.param_groups[0]["params"][0].device.type == "cuda"
        if setting is False or (setting == "auto" and not on_cuda):
            return region(tasks, True)
        layout, reason = self._layout(tasks)
        return self.cuda_graphs.run(region, tasks, layout, reason)

    def _layout(self, tasks: Sequence[Task[BatchT]]) -> tuple[Inputs | None, str | None]:
        """How a step's tasks become a graph's static inputs, or why they cannot."""
        params = [p for _, p in self._named_params()]
        device = params[0].device
        if device.type != "cuda" or any(p.device != device for p in params):
            return None, f"the parameters are not all on one CUDA device (they are on {device})"
        if self._group is not None:
            return None, "a process group's all-reduce runs between the tasks and the update"
        if task_kind(tasks) != "support-query":
            return None, "sampler tasks draw their batches in Python at every step"
        layout = task_layout(tasks)
        if layout is None:
            return None, "the tasks' batches hold something other than tensors"
        if any(leaf.device != device for leaf in layout.leaves):
            return None, f"the tasks' tensors are not all on {device}"
        modes = tuple(m.training for m in self.model.modules())
        pointers = tuple(p.data_ptr() for p in params)
        return layout._replace(key=(*layout.key, modes, pointers)), None

    def _accept(
        self,
        outcome: _Outcome,
        params: Params,
        tasks: Sequence[Task[BatchT]],
        beta: float | None,
    ) -> bool:
        """Whether a region's result was finite (one host sync); else raise or skip."""
        loss_ok, grads_ok, weights_ok = outcome.flags.tolist()
        if loss_ok and grads_ok and weights_ok:
            return True
        if self.nan_policy == "skip":
            return False
        result = outcome.result
        if not (loss_ok and grads_ok):
            what = "outer loss" if not loss_ok else "meta gradient"
            where = locate_nonfinite(self.objective, params, tasks)
            if not where and self._group is not None:
                where = "another process's tasks"
            raise NonFiniteError(
                f"the meta step produced a non-finite {what} (loss={result.loss.item():.6g})"
                f"{'; it first appears in ' + where if where else ''}; no weights were "
                "changed. Lower the inner or outer step size, or check the data."
            )
        raise NonFiniteError(
            f"the meta step with beta={beta:g} produced non-finite weights (the update "
            "overflowed); no weights were changed. Lower the outer step size, or check the data."
        )

    def _beta(self, params: Params) -> Tensor:
        """The device buffer that holds this step's ``beta`` for the update."""
        device = next(iter(params.values())).device
        if self._beta_buffer is None or self._beta_buffer.device != device:
            self._beta_buffer = torch.zeros((), dtype=torch.float64, device=device)
        return self._beta_buffer

    def _probe_grad_norm(
        self,
        params: Params,
        tasks: Sequence[Task[BatchT]],
        size: int | None,
        counts: OracleCounts,
    ) -> float:
        norms = []
        with self._refusals_shared(lambda group: all_reduce_probe(0.0, 0, group, refused=True)):
            for task in tasks:
                if isinstance(task, SupportQuery):
                    batch = task.query
                else:
                    probe_size = size if size is not None else self._sample_size("outer")
                    if probe_size is None:
                        raise ValueError(
                            "measuring probe gradients on sampler tasks needs a 'probe_size' "
                            "(the estimator has no outer_size)"
                        )
                    batch = task.sample(probe_size, generator=self.generator)
                grads, _ = self.objective.loss_grad(params, batch)
                counts.grad_evals += 1
                norms.append(torch.cat([g.reshape(-1) for g in grads.values()]).norm())
        total = float(torch.stack(norms).sum().to(torch.float64)) if norms else 0.0
        count = len(norms)
        if self._group is not None:
            total, count = all_reduce_probe(total, count, self._group())
            counts.grad_evals += count - len(norms)  # every process's probes
        mean = total / count
        if math.isfinite(mean):
            return mean
        if self.nan_policy == "skip":
            raise _SkipStepError
        raise NonFiniteError(
            f"the probe gradients' mean norm at w_k is {mean} (a NaN or Inf in the probe "
            "tasks' losses or gradients); no weights were changed"
        )

    def _estimate_smoothness(
        self,
        tasks: Sequence[Task[BatchT]],
        counts: OracleCounts,
        options: dict[str, Any],
        setting: Setting,
    ) -> SmoothnessEstimate:
        """:func:`~torch_maml.theory.estimate_smoothness` at ``w_k``, over all processes."""
        nothing = SmoothnessEstimate(0.0, 0.0, None, None, 0, True, 0, True, 0, 0)
        has_b = setting == "finite-sum"
        estimate = nothing  # an empty shard: nothing measured, nothing counted
        if len(tasks) > 0:
            with self._refusals_shared(
                lambda group: all_reduce_estimate(nothing, 0, group, has_b, refused=True)
            ):
                estimate = estimate_smoothness(
                    self.model,
                    self.loss_fn,
                    tasks,
                    adapted=self.adapted,
                    generator=self.generator,
                    **options,
                )
        if self._group is not None:
            estimate = all_reduce_estimate(estimate, len(tasks), self._group(), has_b)
        counts.grad_evals += estimate.grad_evals
        counts.hvp_evals += estimate.hvp_evals
        return estimate

    def _check_step_size(self, size: StepSize) -> bool:
        """Whether ``size`` is usable; False for a NaN or Inf under ``nan_policy="skip"``."""
        if not isinstance(size, StepSize):
            raise TypeError(
                "'step_size' must return a StepSize(beta, lhat) "
                f"(got an object of type {type(size).__name__})"
            )
        beta = size.beta
        if not isinstance(beta, (int, float)) or isinstance(beta, bool):
            raise TypeError(f"'step_size' returned a beta that is not a number (got {beta!r})")
        if not math.isfinite(beta) and self.nan_policy == "skip":
            return False
        if not (beta > 0 and beta < float("inf")):
            raise NonFiniteError(
                f"'step_size' returned beta={beta}: it must be a finite number > 0; "
                "no weights were changed"
            )
        return True


def _zero_result(params: Params) -> MetaGradient:
    """What a process with no task contributes to the mean: nothing."""
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    return MetaGradient(zeros, torch.zeros((), dtype=torch.float64), 0, 0)


def _all_finite(tensors: Iterable[Tensor]) -> Tensor:
    """Whether every element of ``tensors`` is finite, as a bool tensor (no host sync)."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    return torch.isfinite(flat).all()


class _Outcome(NamedTuple):
    """What a step's device work produced: the meta gradient, and three bool flags."""

    result: MetaGradient
    flags: Tensor
    """Finite: ``[loss, meta gradient, new weights]`` (the last is True for meta_backward)."""


class _SkipStepError(Exception):
    """Raised inside a step-size policy's probe to skip the step (``nan_policy="skip"``)."""


class _RestoreGenerator:
    """Context manager: on an exception, put the generator back as it was."""

    def __init__(self, generator: torch.Generator) -> None:
        self._generator = generator
        self._state = generator.get_state()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is not None:
            self._generator.set_state(self._state)
