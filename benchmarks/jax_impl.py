"""The JAX reference implementation of one meta step of second-order multi-step MAML.

For each of the ``B`` tasks, ``N`` inner steps of plain gradient descent with step size
``alpha`` on the support batch (``w_{j+1} = w_j - alpha * grad l(w_j; support)``), then the
query loss at ``w_N``; the meta gradient is the gradient of the mean over tasks of the query
losses with respect to the initial weights ``w``, differentiated through the whole inner loop
(second order); the meta step is then the SGD step ``w <- w - beta * meta_grad``.

The models are the two workloads of :mod:`benchmarks.workloads` written in pure JAX
(``jax.numpy``, ``jax.lax``, ``jax.grad``, ``jax.vmap``, ``jax.jit``), so that they compute
exactly what the PyTorch modules compute. Parameters and data come in and go out as numpy
arrays, the parameters keyed by the names of ``model.named_parameters()`` in torch's layouts
(a linear weight is ``(out, in)``, a convolution's ``(out, in, kh, kw)``, images are NCHW),
each data array with a leading task dimension.

JAX is optional: without it, :func:`available` returns ``False`` and nothing else may be
called. Importing this module enables JAX's 64-bit mode (``jax_enable_x64``) so that
:func:`meta_gradient` can compute in float64; :func:`make_step` casts to float32 explicitly
unless asked for float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax import lax
except ImportError:  # pragma: no cover - depends on the environment
    _HAVE_JAX = False
else:
    _HAVE_JAX = True
    jax.config.update("jax_enable_x64", True)

Params = dict[str, Any]
"""Parameters (JAX arrays) keyed by the torch names."""

Batch = tuple[Any, Any]
"""``(inputs, targets)`` of one task, as JAX arrays."""

NumpyData = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""``(x_support, y_support, x_query, y_query)``, each with a leading task dimension."""

TaskBatching = Literal["vmap", "unroll"]
"""How the tasks of a meta-batch are batched: ``jax.vmap`` or a Python loop unrolled in the jit."""

_BN_EPS = 1e-5


def available() -> bool:
    """Whether JAX could be imported (the other functions need it)."""
    return _HAVE_JAX


def _require_jax() -> None:
    """Raise a clear error where JAX is missing."""
    if not _HAVE_JAX:
        raise ImportError("the JAX implementation needs jax (pip install 'jax[cpu]')")


def _linear(params: Params, name: str, x: Any) -> Any:
    """``x @ W.T + b``, as ``nn.Linear`` with the weight ``(out, in)``."""
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def _sinusoid_loss(params: Params, batch: Batch) -> Any:
    """The MSE of the 1-40-40-1 ReLU MLP of the ``sinusoid`` workload on one task's batch."""
    x, y = batch
    h = jax.nn.relu(_linear(params, "0", x))
    h = jax.nn.relu(_linear(params, "2", h))
    pred = _linear(params, "4", h)
    return jnp.mean((pred - y) ** 2)


def _conv_block(params: Params, name: str, x: Any) -> Any:
    """Conv 3x3 (padding 1), batch norm with batch statistics, ReLU, 2x2 max pooling."""
    x = lax.conv_general_dilated(
        x,
        params[f"{name}.0.weight"],
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    x = x + params[f"{name}.0.bias"][None, :, None, None]
    mean = jnp.mean(x, axis=(0, 2, 3), keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=(0, 2, 3), keepdims=True)  # biased, as torch normalises
    x = (x - mean) / jnp.sqrt(var + _BN_EPS)
    x = (
        x * params[f"{name}.1.weight"][None, :, None, None]
        + params[f"{name}.1.bias"][None, :, None, None]
    )
    x = jax.nn.relu(x)
    return lax.reduce_window(
        x,
        -jnp.inf,
        lax.max,
        window_dimensions=(1, 1, 2, 2),
        window_strides=(1, 1, 2, 2),
        padding="VALID",
    )


def _conv4_loss(params: Params, batch: Batch) -> Any:
    """The cross-entropy of the 4-block convnet of the ``conv4`` workload on one task's batch."""
    x, y = batch
    for block in ("0", "1", "2", "3"):
        x = _conv_block(params, block, x)
    logits = _linear(params, "5", x.reshape(x.shape[0], -1))
    picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


_LOSSES: dict[str, Callable[[Params, Batch], Any]] = {
    "sinusoid": _sinusoid_loss,
    "conv4": _conv4_loss,
}


def _meta_loss_fn(
    workload: str, steps: int, alpha: float, tasks: TaskBatching
) -> Callable[[Params, tuple[Any, ...]], Any]:
    """The mean over tasks of the query losses after ``steps`` inner steps, as a function of w."""
    if workload not in _LOSSES:
        raise ValueError(f"unknown workload {workload!r}; expected one of {sorted(_LOSSES)}")
    if tasks not in ("vmap", "unroll"):
        raise ValueError(f"unknown task batching {tasks!r}; expected 'vmap' or 'unroll'")
    loss = _LOSSES[workload]
    inner_grad = jax.grad(loss)

    def task_loss(params: Params, xs: Any, ys: Any, xq: Any, yq: Any) -> Any:
        for _ in range(steps):  # unrolled: N is small and static
            grads = inner_grad(params, (xs, ys))
            params = {k: w - alpha * grads[k] for k, w in params.items()}
        return loss(params, (xq, yq))

    if tasks == "vmap":
        batched = jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))

        def meta_loss(params: Params, data: tuple[Any, ...]) -> Any:
            return jnp.mean(batched(params, *data))

    else:

        def meta_loss(params: Params, data: tuple[Any, ...]) -> Any:
            losses = [task_loss(params, *(a[i] for a in data)) for i in range(data[0].shape[0])]
            return jnp.mean(jnp.stack(losses))

    return meta_loss


def _to_jax(
    params: dict[str, np.ndarray], data: NumpyData, dtype: Any
) -> tuple[Params, tuple[Any, ...]]:
    """Parameters and data as JAX arrays: floats in ``dtype``, integer labels as int32."""

    def cast(a: np.ndarray) -> Any:
        a = np.asarray(a)
        return jnp.asarray(a, dtype=jnp.int32 if np.issubdtype(a.dtype, np.integer) else dtype)

    return {k: cast(v) for k, v in params.items()}, tuple(cast(a) for a in data)


def make_step(
    workload: str,
    params: dict[str, np.ndarray],
    data: NumpyData,
    steps: int,
    alpha: float,
    beta: float,
    float64: bool = False,
    *,
    tasks: TaskBatching = "vmap",
) -> Callable[[], None]:
    """A function that performs one meta step on its own copy of the parameters.

    The step is jit-compiled and (by default) vmapped over tasks. Each call replaces the copy
    with its updated value and blocks until the computation is done, so that it can be timed.
    The first call compiles.

    Args:
        workload: ``"sinusoid"`` or ``"conv4"``.
        params: The initial parameters, keyed by the torch names, in torch's layouts.
        data: ``(x_support, y_support, x_query, y_query)`` with a leading task dimension.
        steps: The number of inner steps ``N``.
        alpha: The inner step size.
        beta: The outer (meta) step size.
        float64: Compute in float64 rather than float32.
        tasks: ``"vmap"`` batches the tasks with ``jax.vmap``; ``"unroll"`` loops over them in
            Python inside the jit. With per-task weights, vmap turns every convolution of the
            inner loop into a grouped one (``feature_group_count=B``), which XLA:CPU runs far
            more slowly than ``B`` plain ones: ``"unroll"`` is the faster choice for ``conv4``
            on CPU, at the cost of a longer compilation.

    Returns:
        The meta step, a function of no arguments.
    """
    _require_jax()
    dtype = jnp.float64 if float64 else jnp.float32
    state, batch = _to_jax(params, data, dtype)
    meta_grad = jax.grad(_meta_loss_fn(workload, steps, alpha, tasks))

    @jax.jit
    def update(params: Params, data: tuple[Any, ...]) -> Params:
        grads = meta_grad(params, data)
        return {k: w - beta * grads[k] for k, w in params.items()}

    def step() -> None:
        nonlocal state
        state = jax.block_until_ready(update(state, batch))

    return step


def meta_gradient(
    workload: str,
    params: dict[str, np.ndarray],
    data: NumpyData,
    steps: int,
    alpha: float,
    *,
    tasks: TaskBatching = "vmap",
) -> dict[str, np.ndarray]:
    """The meta gradient (of the mean over tasks of the query losses), computed in float64.

    Args:
        workload: ``"sinusoid"`` or ``"conv4"``.
        params: The parameters, keyed by the torch names, in torch's layouts.
        data: ``(x_support, y_support, x_query, y_query)`` with a leading task dimension.
        steps: The number of inner steps ``N``.
        alpha: The inner step size.
        tasks: How the tasks are batched, as for :func:`make_step`.

    Returns:
        The gradient with respect to each parameter, keyed by the torch names, in float64.
    """
    _require_jax()
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError("JAX's 64-bit mode (jax_enable_x64) is off: float64 is not available")
    weights, batch = _to_jax(params, data, jnp.float64)
    grads = jax.jit(jax.grad(_meta_loss_fn(workload, steps, alpha, tasks)))(weights, batch)
    return {k: np.asarray(g, dtype=np.float64) for k, g in grads.items()}
