"""Few-shot sinusoid regression with multi-step MAML (Finn, Abbeel & Levine, ICML 2017).

Each task is a sine wave ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]`` and
phase ``~ U[0, pi]``, observed at ``K = 10`` support points and ``K = 10`` query points,
``x ~ U[-5, 5]``. A 1-40-40-1 ReLU network is meta-trained so that ``N = 5`` steps of
gradient descent on a new task's support points fit its query points well.

What it shows: on 100 held-out tasks, the meta-learned initialisation on its own fits
no particular task (its pre-adaptation MSE stays large), but five inner steps from it
cut the query MSE about tenfold; the same network at its random initialisation, adapted
the same way, barely improves. The network is meta-trained twice from the same
initialisation on the same tasks, once with each second-order estimator, ``FiniteSum``
(the HVP recursion, memory flat in N) and ``Exact`` (autograd through the unrolled
loop): their meta gradients are equal up to rounding, so the two runs end with the
same numbers, at different costs. (``FirstOrder``, which drops the Hessian product,
is not used here.)
The final table gives the mean query MSE before and after adaptation for each, and two
plots go to ``--out`` (default ``docs/images``): a held-out task before and after
adaptation (``sinusoid_adaptation.png``), and the query MSE against the number of
adaptation steps, 0 to 10 (``sinusoid_mse_vs_steps.png``).

Run it with::

    python examples/sinusoid.py             # about 30 seconds on a 2-core CPU
    python examples/sinusoid.py --quick     # a few seconds (used by the test suite)
    python examples/sinusoid.py --iterations 2000 --seed 1 --estimators finite-sum
    python examples/sinusoid.py --outer step --outer-lr 0.05

Choices:

* Estimator :class:`torch_maml.FiniteSum`: the tasks are support/query sets (the
  finite-sum case), inner steps and Hessians on the support set, the outer gradient on
  the query set. It gives the same meta gradient as :class:`torch_maml.Exact`.
* Inner step size 0.01, Finn's. A larger one adapts more per step but trained worse
  here: with 0.03 the post-adaptation MSE after the default run was 0.68 instead of
  0.31, and with 0.1 five steps from the random initialisation already diverge (inputs
  up to 5 in magnitude and amplitudes up to 5 make the loss sharp).
* Outer optimiser: ``meta_opt.meta_backward(tasks)`` writes the meta gradient into
  ``p.grad`` and ``torch.optim.Adam`` takes the step, as in Finn et al., but with
  ``lr=1e-2`` instead of Finn's ``1e-3``, which is tuned for Finn's 70,000 iterations.
  Measured on this example (seed 0, torch 2.13 CPU), post-adaptation MSE after the
  default 500 iterations: Adam at 1e-2: 0.31, Adam at 1e-3: 0.84, Constant(0.05): 0.58.
  The library's own update, ``meta_opt.step`` with ``tm.Constant(beta)`` (plain meta
  gradient descent), is available with ``--outer step``; it trains about as fast as
  Adam while it lasts, but a fixed step is not scaled to the gradient: with beta = 0.1
  the meta loss was 0.49 at iteration 450, and one meta-batch's large gradient then
  threw it back to 1.71 by iteration 500 (post-adaptation MSE 1.02). A step that
  produces a NaN is refused (``NonFiniteError``, the weights left as they were;
  ``examples/custom_component.py`` shows one, and a fix). Adam's step is bounded by its
  ``lr`` per parameter whatever the gradient's size, and did not fail in these runs.

Everything is seeded by ``--seed``: the initialisation through ``torch.manual_seed``,
the training tasks through one ``torch.Generator`` and the held-out tasks through
another, so a run prints the same numbers every time on the same machine and torch
build.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

import torch_maml as tm

Batch = tuple[Tensor, Tensor]
SinusoidTask = tm.SupportQuery[Batch]
SinusoidMetaOptimizer = tm.MetaOptimizer[nn.Sequential, Batch]

K_SHOT = 10
"""Support points per task, and query points per task."""
INNER_STEPS = 5
"""``N``: inner gradient steps, in training and at evaluation."""
INNER_LR = 0.01
"""``alpha``: Finn's inner step size (see the module docstring for why not larger)."""
META_BATCH = 25
"""Tasks per meta iteration (Finn's)."""
EVAL_TASKS = 100
"""Held-out tasks the final table averages over."""
EVAL_SEED_OFFSET = 1_000_003
"""The held-out tasks' generator is seeded with ``seed + EVAL_SEED_OFFSET``."""
ITERATIONS = 500
"""Default meta iterations: about 15 seconds per estimator on a 2-core CPU."""
QUICK_ITERATIONS, QUICK_META_BATCH, QUICK_EVAL_TASKS = 100, 5, 50
"""``--quick``: iterations, tasks per iteration and held-out tasks."""
DEFAULT_OUTER_LR = {"adam": 1e-2, "step": 0.05}
"""The outer step size of each ``--outer`` choice when ``--outer-lr`` is not given."""
ESTIMATORS = {"finite-sum": tm.FiniteSum, "exact": tm.Exact}
"""``--estimators``: the meta-gradient estimators the network is meta-trained with."""
PLOT_STEPS = 10
"""The MSE-against-steps plot adapts with 0 to this many inner steps."""


class Evaluation(NamedTuple):
    """Mean query MSE over the held-out tasks, before and after adaptation."""

    pre: float
    post: float


class Trained(NamedTuple):
    """One meta-training run, with one estimator."""

    evaluation: Evaluation
    """Its held-out query MSE before and after ``N`` inner steps."""
    final_meta_loss: float
    """Mean meta (post-adaptation query) loss over the last progress window of training."""
    seconds: float
    """Wall-clock time of the training loop."""


class Result(NamedTuple):
    """The final numbers of a run, as printed in its table."""

    meta_pre_mse: float
    """Meta-trained model (the first of ``--estimators``), as is, on the query points."""
    meta_post_mse: float
    """Meta-trained model after ``N`` inner steps on each task's support points."""
    baseline_pre_mse: float
    """The same network at its random initialisation (not meta-trained), as is."""
    baseline_post_mse: float
    """The random initialisation after ``N`` inner steps."""
    final_meta_loss: float
    """Mean meta loss over the last progress window of the first estimator's training."""
    iterations: int
    """Meta iterations run."""
    train_seconds: float
    """Wall-clock time of the first estimator's training loop."""
    runs: dict[str, Trained]
    """Every estimator's run, by ``--estimators`` name."""
    plots: list[Path]
    """The PNG files written."""


def make_model() -> nn.Sequential:
    """Finn's regression network: 1-40-40-1 with ReLU."""
    return nn.Sequential(
        nn.Linear(1, 40),
        nn.ReLU(),
        nn.Linear(40, 40),
        nn.ReLU(),
        nn.Linear(40, 1),
    )


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """Mean squared error of ``model`` on one ``(x, y)`` batch."""
    x, y = batch
    return F.mse_loss(model(x), y)


def sample_tasks(count: int, generator: torch.Generator, k: int = K_SHOT) -> list[SinusoidTask]:
    """``count`` sinusoid tasks with ``k`` support and ``k`` query points each."""
    shape = (count, 1, 1)
    amplitude = torch.empty(shape, dtype=torch.float32).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(shape, dtype=torch.float32).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(count, 2 * k, 1, dtype=torch.float32).uniform_(-5.0, 5.0, generator=generator)
    y = amplitude * torch.sin(x - phase)
    return [
        tm.SupportQuery(support=(x[i, :k], y[i, :k]), query=(x[i, k:], y[i, k:]))
        for i in range(count)
    ]


def make_meta_optimizer(
    model: nn.Sequential, outer_lr: float, estimator: str = "finite-sum"
) -> SinusoidMetaOptimizer:
    """The MetaOptimizer of this example: N = 5 inner steps, the estimator, Constant.

    The ``Constant`` step size is what ``meta_opt.step`` uses (``--outer step``);
    ``meta_backward`` (``--outer adam``) only computes the gradient and ignores it.
    """
    return tm.MetaOptimizer(
        model,
        loss_fn,
        inner_loop=tm.GradientDescent(steps=INNER_STEPS, lr=INNER_LR),
        estimator=ESTIMATORS[estimator](),
        step_size=tm.Constant(outer_lr),
    )


def train(
    meta_opt: SinusoidMetaOptimizer,
    *,
    iterations: int,
    meta_batch: int,
    outer: str,
    outer_lr: float,
    generator: torch.Generator,
    print_every: int,
    label: str,
) -> float:
    """Meta-train ``meta_opt.model``; return the mean meta loss of the last window."""
    adam = torch.optim.Adam(meta_opt.model.parameters(), lr=outer_lr) if outer == "adam" else None
    window: list[float] = []
    last_mean = math.nan
    start = time.perf_counter()
    progress = tqdm(range(1, iterations + 1), desc=label, unit="it", leave=False, disable=None)
    for iteration in progress:
        tasks = sample_tasks(meta_batch, generator)
        if adam is None:
            loss = meta_opt.step(tasks).loss
        else:
            adam.zero_grad()
            loss = meta_opt.meta_backward(tasks).loss
            adam.step()
        window.append(loss.item())
        if iteration % print_every == 0 or iteration == iterations:
            last_mean = sum(window) / len(window)
            elapsed = time.perf_counter() - start
            progress.set_postfix(meta_loss=f"{last_mean:.4f}")
            tqdm.write(
                f"{label}: iteration {iteration:5d}/{iterations}  meta loss {last_mean:7.4f}"
                f"  ({elapsed:5.1f} s)"
            )
            window.clear()
    progress.close()
    return last_mean


def evaluate(
    meta_opt: SinusoidMetaOptimizer, tasks: Sequence[SinusoidTask], steps: int = INNER_STEPS
) -> Evaluation:
    """Mean query MSE of ``meta_opt.model`` before and after ``steps`` inner steps."""
    model = meta_opt.model
    pre = post = 0.0
    for task in tasks:
        x_query, y_query = task.query
        with torch.no_grad():
            pre += F.mse_loss(model(x_query), y_query).item()
        if steps > 0:
            adapted = meta_opt.adapt(task, steps=steps)
            with torch.no_grad():
                post += F.mse_loss(functional_call(model, adapted, (x_query,)), y_query).item()
    post = post if steps > 0 else pre
    return Evaluation(pre=pre / len(tasks), post=post / len(tasks))


def plot_adaptation(
    trained: SinusoidMetaOptimizer, baseline: SinusoidMetaOptimizer, path: Path, seed: int
) -> None:
    """A held-out sine wave, its support points, and the fits before and after adaptation."""
    generator = torch.Generator().manual_seed(seed)
    amplitude, phase = 3.0, 1.0
    x_support = torch.empty(K_SHOT, 1).uniform_(-5.0, 5.0, generator=generator)
    task = tm.SupportQuery(
        (x_support, amplitude * torch.sin(x_support - phase)), (x_support, x_support)
    )
    x = torch.linspace(-5, 5, 200).unsqueeze(1)
    figure, axes = plt.subplots(figsize=(8.6, 4))
    axes.plot(x, amplitude * torch.sin(x - phase), color="black", label="true function")
    axes.scatter(
        x_support, task.support[1], color="black", zorder=3, label=f"{K_SHOT} support points"
    )
    with torch.no_grad():
        axes.plot(x, trained.model(x), "--", color="tab:blue", label="MAML, before adaptation")
        fitted = functional_call(trained.model, trained.adapt(task), (x,))
        axes.plot(x, fitted, color="tab:blue", label=f"MAML, after {INNER_STEPS} steps")
        fitted = functional_call(baseline.model, baseline.adapt(task), (x,))
        axes.plot(x, fitted, color="tab:gray", label=f"random init, after {INNER_STEPS} steps")
    axes.set(xlabel="x", ylabel="y", title="A held-out sinusoid task")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside: no curve hidden
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_mse_vs_steps(
    curves: dict[str, list[float]], path: Path, trained_steps: int = INNER_STEPS
) -> None:
    """Mean held-out query MSE against the number of adaptation steps, per model."""
    figure, axes = plt.subplots(figsize=(7.4, 4))
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "v")]
    for (label, curve), (line, marker) in zip(curves.items(), styles, strict=False):
        axes.plot(range(len(curve)), curve, line, marker=marker, markersize=4, label=label)
    axes.axvline(
        trained_steps, color="gray", linestyle=":", label=f"N = {trained_steps} (training)"
    )
    axes.set(
        xlabel="adaptation steps",
        ylabel="mean query MSE (held-out tasks)",
        yscale="log",
        title="Query MSE against adaptation steps",
    )
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside: no curve hidden
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        description="Meta-train a sinusoid regressor with multi-step MAML (Finn et al. 2017)."
    )
    parser.add_argument(
        "--iterations", type=int, default=None, help="meta iterations (default: 500, quick: 100)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default: 0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a run of a few seconds: 100 iterations of 5 tasks, 50 held-out tasks",
    )
    parser.add_argument(
        "--outer",
        choices=sorted(DEFAULT_OUTER_LR),
        default="adam",
        help="outer update: meta_backward + Adam (default), or meta_opt.step with Constant",
    )
    parser.add_argument(
        "--outer-lr",
        type=float,
        default=None,
        help="outer step size (default: 1e-2 for adam, 0.05 for step)",
    )
    parser.add_argument(
        "--estimators",
        nargs="+",
        choices=sorted(ESTIMATORS),
        default=["finite-sum", "exact"],
        help="meta-train once with each, from the same initialisation (default: both)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("docs/images"), help="where the PNG plots go"
    )
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        parser.error(f"--iterations must be at least 1 (got {args.iterations})")
    if args.outer_lr is not None and not args.outer_lr > 0:
        parser.error(f"--outer-lr must be > 0 (got {args.outer_lr})")
    return args


def run(args: argparse.Namespace) -> Result:
    """Meta-train, evaluate, plot and print the table; see :func:`main`."""
    iterations: int = args.iterations or (QUICK_ITERATIONS if args.quick else ITERATIONS)
    meta_batch = QUICK_META_BATCH if args.quick else META_BATCH
    eval_tasks = QUICK_EVAL_TASKS if args.quick else EVAL_TASKS
    outer: str = args.outer
    outer_lr: float = args.outer_lr or DEFAULT_OUTER_LR[outer]
    estimators: list[str] = list(dict.fromkeys(args.estimators))

    torch.manual_seed(args.seed)
    initial = make_model()
    baseline_opt = make_meta_optimizer(copy.deepcopy(initial), outer_lr)  # never meta-trained
    held_out = sample_tasks(eval_tasks, torch.Generator().manual_seed(args.seed + EVAL_SEED_OFFSET))

    print(
        f"MAML on sinusoids: {iterations} iterations x {meta_batch} tasks, "
        f"N={INNER_STEPS} inner steps of lr {INNER_LR}, outer {outer} lr {outer_lr}, "
        f"seed {args.seed}",
        flush=True,
    )
    runs: dict[str, Trained] = {}
    optimizers: dict[str, SinusoidMetaOptimizer] = {}
    for name in estimators:  # the same initialisation and training tasks for each
        meta_opt = make_meta_optimizer(copy.deepcopy(initial), outer_lr, name)
        start = time.perf_counter()
        final_loss = train(
            meta_opt,
            iterations=iterations,
            meta_batch=meta_batch,
            outer=outer,
            outer_lr=outer_lr,
            generator=torch.Generator().manual_seed(args.seed),
            print_every=max(1, iterations // 10),
            label=name,
        )
        seconds = time.perf_counter() - start
        runs[name] = Trained(evaluate(meta_opt, held_out), final_loss, seconds)
        optimizers[name] = meta_opt
    untrained = evaluate(baseline_opt, held_out)

    args.out.mkdir(parents=True, exist_ok=True)
    plots = [args.out / "sinusoid_adaptation.png", args.out / "sinusoid_mse_vs_steps.png"]
    first = estimators[0]
    plot_adaptation(optimizers[first], baseline_opt, plots[0], args.seed + 7)
    curves = {
        **{
            f"MAML ({name})": [evaluate(o, held_out, k).post for k in range(PLOT_STEPS + 1)]
            for name, o in optimizers.items()
        },
        "random init": [evaluate(baseline_opt, held_out, k).post for k in range(PLOT_STEPS + 1)],
    }
    plot_mse_vs_steps(curves, plots[1])

    print(f"\nMean query MSE on {eval_tasks} held-out tasks ({INNER_STEPS} inner steps):")
    print(f"{'model':<28}{'pre-adaptation':>16}{'post-adaptation':>17}{'training s':>12}")
    for name, trained in runs.items():
        e = trained.evaluation
        print(f"{'MAML, ' + name:<28}{e.pre:>16.4f}{e.post:>17.4f}{trained.seconds:>12.1f}")
    print(f"{'random init baseline':<28}{untrained.pre:>16.4f}{untrained.post:>17.4f}")
    if len(optimizers) > 1:
        weights = [
            torch.cat([p.detach().reshape(-1) for p in o.model.parameters()])
            for o in optimizers.values()
        ]
        difference = max(float((w - weights[0]).norm() / weights[0].norm()) for w in weights)
        print(
            f"relative difference of the meta-trained weights across estimators: {difference:.1e}"
        )
    print("plots: " + ", ".join(str(p) for p in plots))
    return Result(
        meta_pre_mse=runs[first].evaluation.pre,
        meta_post_mse=runs[first].evaluation.post,
        baseline_pre_mse=untrained.pre,
        baseline_post_mse=untrained.post,
        final_meta_loss=runs[first].final_meta_loss,
        iterations=iterations,
        train_seconds=runs[first].seconds,
        runs=runs,
        plots=plots,
    )


def main(argv: list[str] | None = None) -> Result:
    """Run the example with the command line ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The final numbers of the table, and the training's last meta loss and time.
    """
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
