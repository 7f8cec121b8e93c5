"""torch_maml: multi-step MAML for any PyTorch model, with torch.optim's conventions.

Wrap a model and a loss closure in a :class:`MetaOptimizer`; swap its parts through
constructor arguments: an :class:`InnerLoop`, a :class:`MetaGradientEstimator`
(:class:`Exact`, :class:`FiniteSum`, :class:`Resampled`, and :class:`FirstOrder`,
:class:`Reptile`, :class:`HessianFree`, :class:`Implicit`) and a
:class:`StepSizePolicy` (:class:`Constant`, :class:`SmoothnessAdaptive`), as
defined in Ji, Yang & Liang, "Theoretical Convergence of Multi-Step
Model-Agnostic Meta-Learning" (JMLR 2022).
"""

from . import functional, theory
from .errors import CompileWarning, InnerStepSizeWarning, NonFiniteError
from .estimators import (
    Exact,
    FiniteSum,
    FirstOrder,
    HessianFree,
    Implicit,
    MetaGradient,
    MetaGradientEstimator,
    Reptile,
    Resampled,
)
from .functional import TaskLoss
from .inner import Adam, GradientDescent, InnerLoop, Momentum
from .meta_sgd import LearnedStepSizes, MetaSGD
from .objective import MetaObjective
from .optimizer import MetaBackwardInfo, MetaOptimizer, MetaStepInfo, NanPolicy, ParamSelection
from .proximal import Proximal
from .step_size import (
    Constant,
    Setting,
    SmoothnessAdaptive,
    StepContext,
    StepSize,
    StepSizePolicy,
)
from .tasks import Sampler, StackedTasks, SupportQuery, Task

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "CompileWarning",
    "Constant",
    "Exact",
    "FiniteSum",
    "FirstOrder",
    "GradientDescent",
    "HessianFree",
    "Implicit",
    "InnerLoop",
    "InnerStepSizeWarning",
    "LearnedStepSizes",
    "MetaBackwardInfo",
    "MetaGradient",
    "MetaGradientEstimator",
    "MetaObjective",
    "MetaOptimizer",
    "MetaSGD",
    "MetaStepInfo",
    "Momentum",
    "NanPolicy",
    "NonFiniteError",
    "ParamSelection",
    "Proximal",
    "Reptile",
    "Resampled",
    "Sampler",
    "Setting",
    "SmoothnessAdaptive",
    "StackedTasks",
    "StepContext",
    "StepSize",
    "StepSizePolicy",
    "SupportQuery",
    "Task",
    "TaskLoss",
    "__version__",
    "functional",
    "theory",
]
