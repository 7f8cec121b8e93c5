"""torch_maml: multi-step MAML for any PyTorch model, with torch.optim's conventions.

Wrap a model and a loss closure in a :class:`MetaOptimizer`; swap its parts through
constructor arguments: an :class:`InnerLoop`, a :class:`MetaGradientEstimator`
(:class:`Exact`, :class:`FiniteSum`, :class:`Resampled`) and a
:class:`StepSizePolicy` (:class:`Constant`, :class:`SmoothnessAdaptive`), as
defined in Ji, Yang & Liang, "Theoretical Convergence of Multi-Step
Model-Agnostic Meta-Learning" (JMLR 2022).
"""

from . import functional, theory
from .errors import CompileWarning, InnerStepSizeWarning, NonFiniteError
from .estimators import Exact, FiniteSum, MetaGradient, MetaGradientEstimator, Resampled
from .functional import TaskLoss
from .inner import GradientDescent, InnerLoop
from .objective import MetaObjective
from .optimizer import MetaBackwardInfo, MetaOptimizer, MetaStepInfo, NanPolicy, ParamSelection
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
    "CompileWarning",
    "Constant",
    "Exact",
    "FiniteSum",
    "GradientDescent",
    "InnerLoop",
    "InnerStepSizeWarning",
    "MetaBackwardInfo",
    "MetaGradient",
    "MetaGradientEstimator",
    "MetaObjective",
    "MetaOptimizer",
    "MetaStepInfo",
    "NanPolicy",
    "NonFiniteError",
    "ParamSelection",
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
