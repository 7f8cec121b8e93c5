r"""Meta-SGD: inner steps with learned per-parameter step sizes (Li et al. 2017).

Each adapted weight ``w`` gets a step-size tensor ``a`` of its shape, and the inner
loop takes elementwise steps with it:

.. math:: w_{j+1} = w_j - a \odot \nabla_w l_i(w_j; \mathrm{batch}_j)

The step sizes are meta parameters, meta-learned with the weights: the meta
gradient of the outer loss reaches them through every step.

Two pieces work together. :class:`LearnedStepSizes` wraps the user's module and
holds one step-size :class:`~torch.nn.Parameter` per trainable parameter of it, so
that the step sizes are trainable parameters of the model the
:class:`~torch_maml.MetaOptimizer` sees: every estimator, and ``torch.optim``
through :meth:`~torch_maml.MetaOptimizer.meta_backward`, then treats them as any
other meta parameter, and ``state_dict`` saves them with the model. Its parameter
``module.<name>`` (the user's parameter ``<name>``) has the step size
``step_sizes.<name>``. :class:`MetaSGD` is the inner loop: it reads each weight's
step size from the parameters by that naming, and passes the step sizes on
unchanged (the task loss does not use them, so their own inner gradient is zero).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic

import torch
from torch import nn

from .checks import positive_float, positive_int
from .typing import InnerState, ModelT, Params

__all__ = ["LearnedStepSizes", "MetaSGD"]

WEIGHTS = "module."
"""The prefix of the wrapped module's parameters in :class:`LearnedStepSizes`."""
STEP_SIZES = "step_sizes."
"""The prefix of the step sizes in :class:`LearnedStepSizes`."""


class LearnedStepSizes(nn.Module, Generic[ModelT]):
    r"""A module with a learnable inner step size per trainable parameter (Meta-SGD).

    Holds ``module`` as ``self.module`` and, for each of its parameters with
    ``requires_grad=True``, a step-size parameter of the same shape, filled with
    ``lr``: the user's parameter ``<name>`` is ``module.<name>`` here and its step
    size is ``step_sizes.<name>`` (the step sizes mirror the module's tree).
    :meth:`forward` calls ``module``. Pass the wrapper to the
    :class:`~torch_maml.MetaOptimizer`, with :class:`MetaSGD` as its inner loop, and
    call it (or ``model.module``) in the loss closure. It is generic in the module's
    type: ``LearnedStepSizes[nn.Sequential]`` types ``model.module``.

    Parameters frozen when the module is wrapped get no step size; wrap the module
    once its trainable parameters are the ones to adapt.

    Args:
        module: the user's module.
        lr: the initial value of every step size, > 0. Default: 0.01.

    References:
        Z. Li, F. Zhou, F. Chen, H. Li. *Meta-SGD: Learning to Learn Quickly for
        Few-Shot Learning.* arXiv:1707.09835, 2017.

    Example:
        >>> import torch, torch_maml as tm
        >>> model = tm.LearnedStepSizes(torch.nn.Linear(2, 1), lr=0.1)
        >>> print(*(name for name, _ in model.named_parameters()))
        module.weight module.bias step_sizes.weight step_sizes.bias
        >>> model.step_sizes.weight
        Parameter containing:
        tensor([[0.1000, 0.1000]], requires_grad=True)
    """

    def __init__(self, module: ModelT, lr: float = 0.01) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                "'module' must be a torch.nn.Module "
                f"(got an object of type {type(module).__name__})"
            )
        lr = positive_float("lr", lr)
        trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("'module' has no trainable parameters (none with requires_grad=True)")
        super().__init__()
        self.module: ModelT = module
        self.step_sizes = nn.Module()
        self.lr = lr
        """The initial value of the step sizes."""
        for name, p in trainable:
            *path, leaf = name.split(".")
            node = self.step_sizes
            for part in path:
                child = node._modules.get(part)
                if child is None:
                    child = nn.Module()
                    node.add_module(part, child)
                node = child
            step_size = torch.full_like(p.detach(), lr, memory_format=torch.contiguous_format)
            node.register_parameter(leaf, nn.Parameter(step_size))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)``."""
        return self.module(*args, **kwargs)

    def named_step_sizes(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, step size)`` pairs, by the name of the parameter in ``module``."""
        yield from self.step_sizes.named_parameters()


@dataclass(frozen=True)
class MetaSGD:
    r"""``steps`` inner steps with learned elementwise step sizes (Meta-SGD).

    For a model wrapped in :class:`LearnedStepSizes`, each weight ``module.<name>``
    steps with its own step size ``a = step_sizes.<name>``, elementwise:

    .. math:: w_{j+1} = w_j - a \odot \nabla_w l_i(w_j; \mathrm{batch}_j)

    and the step sizes pass through unchanged. With every step size equal to
    ``alpha`` it is :class:`~torch_maml.GradientDescent`; the meta gradient then
    has, besides GradientDescent's for the weights, the derivative of the outer loss
    with respect to each step size. :class:`~torch_maml.Exact`,
    :class:`~torch_maml.FiniteSum` and :class:`~torch_maml.Resampled` all compute it
    (the recursion differentiates each step with respect to the step sizes too);
    :class:`~torch_maml.SmoothnessAdaptive` refuses this inner loop.

    With ``adapted=`` (ANIL), select each adapted weight's step size along with it,
    e.g. ``adapted=["module.head", "step_sizes.head"]``; the other step sizes then
    get no meta gradient.

    Args:
        steps: the number ``N`` of inner steps, >= 1.

    Raises:
        ValueError: from ``init`` and ``update``, when the parameters are not those
            of a :class:`LearnedStepSizes` model (a name without the ``module.``
            or ``step_sizes.`` prefix), or an adapted weight comes without its step
            size. A :class:`~torch_maml.MetaOptimizer` raises it before changing any
            weight.

    References:
        Z. Li, F. Zhou, F. Chen, H. Li. *Meta-SGD: Learning to Learn Quickly for
        Few-Shot Learning.* arXiv:1707.09835, 2017.

    Example:
        >>> import torch, torch.nn.functional as F, torch_maml as tm
        >>> model = tm.LearnedStepSizes(torch.nn.Linear(1, 1), lr=0.1)
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return F.mse_loss(model(x), y)
        >>> meta_opt = tm.MetaOptimizer(
        ...     model, loss_fn,
        ...     inner_loop=tm.MetaSGD(steps=2),
        ...     estimator=tm.FiniteSum(),
        ...     step_size=tm.Constant(0.01),
        ... )
        >>> x = torch.randn(2, 8, 1)  # two tasks of 8 points: 4 support, 4 query
        >>> tasks = tm.StackedTasks((x[:, :4], 2 * x[:, :4]), (x[:, 4:], 2 * x[:, 4:]))
        >>> info = meta_opt.step(tasks)
        >>> bool((model.step_sizes.weight != 0.1).all())  # meta-learned with the weights
        True
    """

    steps: int

    elementwise: ClassVar[bool] = True
    """Its update acts on each element alone (vectorised over tasks as it is)."""

    def __post_init__(self) -> None:
        positive_int("steps", self.steps)

    def init(self, params: Params) -> InnerState:
        """No state; checks that ``params`` pair each weight with its step size."""
        _step_size_names(params)
        return ()

    def update(self, params: Params, grads: Params, state: InnerState) -> tuple[Params, InnerState]:
        """``w - a * grad`` for each weight ``w`` and its step size ``a``; ``a`` unchanged."""
        pairs = _step_size_names(params)
        return {
            name: p - params[pairs[name]] * grads[name] if name in pairs else p
            for name, p in params.items()
        }, state


def _step_size_names(params: Params) -> dict[str, str]:
    """The name of each weight's step size, by the weight's name; checked."""
    pairs = {}
    for name, weight in params.items():
        if name.startswith(STEP_SIZES):
            continue
        if not name.startswith(WEIGHTS):
            raise ValueError(
                "MetaSGD needs the model wrapped in LearnedStepSizes "
                "(model = tm.LearnedStepSizes(net, lr=0.01)), whose parameters are named "
                f"'module.*' (weights) and 'step_sizes.*' (got a parameter named {name!r})"
            )
        step_size = STEP_SIZES + name[len(WEIGHTS) :]
        if step_size not in params:
            raise ValueError(
                f"MetaSGD: the weight {name!r} has no step size {step_size!r} among the "
                "adapted parameters: with adapted=..., select each weight's step size with "
                "it (e.g. adapted=['module.head', 'step_sizes.head']); a parameter frozen "
                "when the model was wrapped in LearnedStepSizes has no step size"
            )
        if params[step_size].shape != weight.shape:
            raise ValueError(
                f"MetaSGD: the step size {step_size!r} has shape "
                f"{tuple(params[step_size].shape)}, its weight {name!r} has shape "
                f"{tuple(weight.shape)}"
            )
        pairs[name] = step_size
    if not pairs:
        raise ValueError(
            "MetaSGD adapts no weight: the adapted parameters are all step sizes "
            "(select the weights too, e.g. adapted=['module.head', 'step_sizes.head'])"
        )
    return pairs
