"""torch_maml: multi-step MAML for any PyTorch model, with torch.optim's conventions.

Wrap a model and a loss closure in a :class:`MetaOptimizer`; swap its parts through
constructor arguments: an :class:`InnerLoop`, a :class:`MetaGradientEstimator`
(:class:`Exact`, :class:`FiniteSum`, :class:`Resampled`, and :class:`FirstOrder`,
:class:`Reptile`, :class:`HessianFree`, :class:`Implicit`) and a
:class:`StepSizePolicy` (:class:`Constant`, :class:`SmoothnessAdaptive`), as
defined in Ji, Yang & Liang, "Theoretical Convergence of Multi-Step
Model-Agnostic Meta-Learning" (JMLR 2022).
"""

from . import algorithms, execution, functional, theory
from .errors import (
    CaptureWarning,
    CompileWarning,
    InnerStepSizeWarning,
    NonFiniteError,
    VectorizationWarning,
)
from .estimators import (
    DrawsSamples,
    Exact,
    FiniteSum,
    FirstOrder,
    HessianFree,
    Implicit,
    MetaGradient,
    MetaGradientEstimator,
    Reptile,
    Resampled,
    SampleSizes,
)
from .inner import (
    Adam,
    GradientDescent,
    GradientDescentSteps,
    InnerLoop,
    Masked,
    Momentum,
    ProximalSteps,
    SelectsParameters,
)
from .meta_sgd import LearnedStepSizes, MetaSGD
from .model import TaskLoss
from .objective import MetaObjective
from .ops import Ops, OracleCounts
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
from .tasks import (
    Sampler,
    StackedTaskData,
    StackedTasks,
    SupportQuery,
    Task,
    TaskData,
    support_query_data,
)

__version__ = "0.1.0"

__all__ = [
    "Adam",
    "CaptureWarning",
    "CompileWarning",
    "Constant",
    "DrawsSamples",
    "Exact",
    "FiniteSum",
    "FirstOrder",
    "GradientDescent",
    "GradientDescentSteps",
    "HessianFree",
    "Implicit",
    "InnerLoop",
    "InnerStepSizeWarning",
    "LearnedStepSizes",
    "Masked",
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
    "Ops",
    "OracleCounts",
    "ParamSelection",
    "Proximal",
    "ProximalSteps",
    "Reptile",
    "Resampled",
    "SampleSizes",
    "Sampler",
    "SelectsParameters",
    "Setting",
    "SmoothnessAdaptive",
    "StackedTaskData",
    "StackedTasks",
    "StepContext",
    "StepSize",
    "StepSizePolicy",
    "SupportQuery",
    "Task",
    "TaskData",
    "TaskLoss",
    "VectorizationWarning",
    "__version__",
    "algorithms",
    "execution",
    "functional",
    "support_query_data",
    "theory",
]
