"""Few-shot classification of handwritten digits with multi-step MAML (Finn et al. 2017).

The data are the 1,797 8x8 images of scikit-learn's ``load_digits`` (10 classes of
about 180 images, shipped with scikit-learn: nothing to download). A task is N-way
K-shot classification (default 5-way 1-shot): N classes drawn at random, given the
labels 0..N-1 in a random order, K support images and 15 query images per class.

Meta-training sees only the digits 0-4, meta-testing only the digits 5-9: no image of
5-9, in any form, is used before the meta-test. Five classes are too few to
meta-learn from (every training task would hold the same five classes: measured
below, MAML then does worse than no meta-training at all), so, as Santoro et al.
(2016) and Finn et al. (2017) do for Omniglot, new classes are made from the old
ones: each digit 0-4 under each of the 8 symmetries of the square (4 rotations, each
mirrored or not) is a class of its own, 40 training classes in all. The split keeps
6 and 9, which are each other's half turn, on the same side; {0-4} / {5-9} is the
plain split of the ten digits, fixed before any result was seen.

What it shows: on 600 meta-test tasks of unseen digits, N = 5 inner steps from the
meta-learned initialisation classify the query images better than the same 5 steps
from either baseline, with non-overlapping 95% confidence intervals:

* **no meta-training**: the very initialisation MAML started from, adapted the same
  way;
* **pretraining**: the same network trained as an ordinary 40-way classifier on all
  the images of the 40 training classes, its head then replaced by an N-way head of
  zeros, and the whole network adapted the same way (the fine-tuning "Baseline" of
  Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019).

The three networks share the architecture, the inner loop (5 steps of gradient
descent with lr 0.1 on the support set, through ``meta_opt.adapt``) and the meta-test
tasks: only their starting weights differ. Final table of the default run (seed 0,
2-core CPU, 3 minutes, torch 2.13; torch 2.14 gives the same table)::

    Query accuracy on 600 meta-test tasks (5-way 1-shot, digits 5-9) after N=5 inner
    steps of lr 0.1, mean ± 95% CI:
    method                          accuracy
    MAML (meta-trained)         78.7 ± 0.6 %
    no meta-training            72.7 ± 0.7 %
    pretrained, new head        73.5 ± 0.7 %
    chance                          20.0 %

With ``--seed 1``: 78.8, 73.0 and 71.0 (each ± 0.7). With ``--shots`` 5 (5-way
5-shot, about 6 minutes: the support sets are five times larger): 93.1, 90.8 and
90.5 (each ± 0.3).

The first PNG in ``--out`` (default ``docs/images``) plots the accuracy after 0 to 10
inner steps on the first 200 of these tasks, with 95% confidence bands: from MAML's
initialisation the first step already gives about 69% (44% and 57% from the
baselines'), and MAML keeps its lead up to 10 steps. The second PNG plots the
meta-training loss.

Run it with::

    python examples/few_shot_digits.py              # 5-way 1-shot, about 3 minutes
    python examples/few_shot_digits.py --shots 5    # 5-way 5-shot
    python examples/few_shot_digits.py --quick      # a few seconds (used by the tests)
    python examples/few_shot_digits.py --seed 1 --iterations 1000 --out /tmp/digits

Choices, measured on seed 0 as 5-way 1-shot accuracy on 300 meta-test tasks; the
first ones while the rest of the settings were still being chosen (600 iterations,
a constant outer step size, 16 channels), so compare numbers within an item only:

* **Model**: three blocks of 3x3 convolution (32 channels), batch normalisation, ReLU
  and 2x2 max-pooling take the 8x8 image to 32 features, then a linear head: Finn's
  four-block network, cut to the size of the images. Convolutions share their stroke
  detectors across positions, and that is what carries over to unseen digits: an
  MLP 64-64-64-5 meta-overfitted to the training classes (MAML 52% against 50%
  untrained; with batch normalisation 66% against 71% untrained), where the
  16-channel version of this network reached 76% against 70%. With 16 channels, 500
  iterations gave 73.4% (on the 600 tasks), no better than the pretrained baseline
  once its pretraining length was tuned (up to 73.6%); 32 channels gave 77.3% after
  500 iterations, in about the time 16 channels take for 1000 (76.1%), and 78.6%
  after 1000.
* **Batch normalisation** always normalises by the statistics of the batch it is
  given (``track_running_stats=False``): the support set in each inner step, the
  query set when predicting, as in Finn's MAML, and the same for all three networks.
  Fine-tuning the whole pretrained network with the running statistics of
  pretraining instead stayed near chance at every inner step size (at most 29%).
* **Inner loop**: ``GradientDescent(steps=5, lr=0.1)`` in training and at meta-test,
  for all three networks. Of {0.05, 0.1, 0.2, 0.5}, 0.1 suited all three: MAML
  reached 72%, 76%, 76%, 74%, the untrained network 66%, 70%, 70%, 44% and the
  pretrained one 60%, 63%, 35%, 21%.
* **Pretrained head and what is adapted**: a head of zeros starts from uniform
  predictions, and the first step fits it to the support set (the body gets its
  first gradient at the second step); a random head did about as well (66% against
  65%). Adapting the head only, the body frozen, did worse at every step size (at
  most 53%), so the whole network is adapted, exactly as MAML's is.
* **Pretraining length**, tuned in the baseline's favour on the meta-test tasks
  themselves: after 2, 4, 6, 10 and 20 epochs (Adam, lr 1e-3, batches of 64) it
  reached 71.2%, 73.0%, 73.1%, 73.4% and 71.3%: the longer it fits the training
  classes, the worse it transfers. 10 epochs it is.
* **Class augmentation**: without the symmetries (5 training classes) the meta loss
  went to 0.005 while the meta-test accuracy fell from 70% after 100 iterations to
  66.5%, below the untrained network's 70%: MAML memorised the five classes.
* **Outer step**: ``meta_opt.meta_backward(tasks)`` and ``torch.optim.Adam`` at
  ``lr=1e-3``, annealed to 0 by a cosine schedule: with a constant ``lr`` the
  meta-test accuracy moved by up to 2.7 points from one hundred iterations to the
  next, annealed it settles. Meta-batches of 16 tasks with 5 query images per class
  (15 at meta-test), stacked into one ``tm.StackedTasks`` (one vectorised pass).
* **Estimator**: ``tm.FiniteSum()``, the support/query (finite-sum) setting; it gives
  the meta gradient of ``tm.Exact()`` without keeping the unrolled graph.
* **One thread**: ``main`` sets ``torch.set_num_threads(1)`` and restores the count
  when it returns. The networks are too small to gain from more (on this 2-core CPU
  a meta step of 16 tasks took 108 ms on one thread and 110 ms on two, an inner step
  1.3 ms and 1.6 ms), and with one other busy process on the machine two threads
  kept waiting on each other: meta-training slowed from 8 iterations a second to
  one every 10 seconds.

Caveats: the accuracies are far from what a network trained on many classes reaches
(nearest-prototype on the raw pixels gets 72% at 5-way 1-shot here), because 40
training classes made from 5 digits are little to meta-learn from; what the example
measures is the gain from meta-training under the same adaptation, not the state of
the art. The symmetries do not bring the test digits in by the back door: by mean
image, the training classes closest to a test digit are plain digits (1 to 8, 3 to
9), not turned or mirrored ones.

Everything is seeded by ``--seed``: the initialisations through ``torch.manual_seed``,
the training tasks, the pretraining batches and the meta-test tasks through three
``torch.Generator`` objects, so a run prints the same numbers every time on the same
machine and torch build.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

import torch_maml as tm

Batch = tuple[Tensor, Tensor]
"""Images ``(n, 1, 8, 8)`` in [0, 1] and their labels ``(n,)`` in ``0..N-1``."""
DigitsTask = tm.SupportQuery[Batch]

N_WAY = 5
"""Classes per task."""
TRAIN_DIGITS, TEST_DIGITS = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
"""Meta-training digits (each under 8 symmetries: 40 classes) and meta-test digits."""
TRAIN_QUERIES, TEST_QUERIES = 5, 15
"""Query images per class in a meta-training task, and in a meta-test task."""
CHANNELS = 32
"""Channels of each convolution block."""
INNER_STEPS = 5
"""``N``: inner gradient steps, in training and at meta-test."""
INNER_LR = 0.1
"""``alpha``: the inner step size (see the module docstring for how it was chosen)."""
OUTER_LR = 1e-3
"""Adam's initial step size, annealed to 0 over the run."""
META_BATCH = 16
"""Tasks per meta iteration."""
ITERATIONS = 500
"""Default meta iterations."""
PRETRAIN_EPOCHS, PRETRAIN_BATCH = 10, 64
"""Supervised pretraining of the baseline: passes over the training images, batch size."""
EVAL_TASKS = 600
"""Meta-test tasks of the table."""
CURVE_TASKS, CURVE_STEPS = 200, 10
"""The plot shows the accuracy after 0..CURVE_STEPS inner steps on the first CURVE_TASKS
meta-test tasks (each point costs a forward pass of the query set)."""
QUICK_ITERATIONS, QUICK_META_BATCH, QUICK_PRETRAIN_EPOCHS, QUICK_EVAL_TASKS = 25, 8, 1, 20
"""``--quick``: meta iterations, tasks per iteration, pretraining epochs, meta-test tasks
(all of them in the plot too)."""
EVAL_SEED_OFFSET, PRETRAIN_SEED_OFFSET = 1_000_003, 2_000_003
"""The meta-test tasks' and the pretraining batches' generators are seeded with
``seed + offset``; the training tasks' with ``seed``."""


class ConvNet(nn.Module):
    """Three conv3x3-BN-ReLU-maxpool blocks (8x8 -> 1x1) and a linear head.

    Args:
        classes: outputs of the head.
        channels: channels of each block (default :data:`CHANNELS`).
    """

    def __init__(self, classes: int, channels: int = CHANNELS) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for in_channels in (1, channels, channels):
            blocks += [
                nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
                nn.BatchNorm2d(channels, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.body(x))
        return logits


DigitsMetaOptimizer = tm.MetaOptimizer[ConvNet, Batch]


class Accuracy(NamedTuple):
    """Mean query accuracy over meta-test tasks, and the half-width of its 95% CI."""

    mean: float
    ci: float
    """``1.96 * std / sqrt(tasks)``."""

    @classmethod
    def of(cls, per_task: Tensor) -> Accuracy:
        """The mean and 95% confidence half-width of per-task accuracies."""
        ci = 1.96 * per_task.std().item() / math.sqrt(per_task.numel())
        return cls(mean=per_task.mean().item(), ci=ci)

    def __str__(self) -> str:
        return f"{100 * self.mean:5.1f} ± {100 * self.ci:3.1f} %"


class Result(NamedTuple):
    """The final numbers of a run, as printed in its table."""

    maml: Accuracy
    """Meta-trained network after ``N`` inner steps on each task's support set."""
    random_init: Accuracy
    """The same network at its random initialisation (not meta-trained), same ``N`` steps."""
    pretrained: Accuracy
    """The supervised-pretrained network with a zero N-way head, same ``N`` steps."""
    curves: dict[str, list[Accuracy]]
    """Accuracy after 0..CURVE_STEPS inner steps, by method (the keys of the table)."""
    chance: float
    """``1 / N``."""
    final_meta_loss: float
    """Mean meta (post-adaptation query) loss over the last 10% of the iterations."""
    iterations: int
    """Meta iterations run."""
    train_seconds: float
    """Wall-clock time of meta-training."""
    plots: tuple[Path, ...]
    """The PNG files written."""


def load_classes() -> tuple[list[Tensor], list[Tensor]]:
    """The meta-training classes (digits 0-4 under 8 symmetries) and meta-test classes.

    Returns:
        Two lists of image tensors ``(n, 1, 8, 8)`` in [0, 1], one tensor per class.
    """
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target)
    train: list[Tensor] = []
    for digit in TRAIN_DIGITS:
        rotations = [torch.rot90(images[labels == digit], k, dims=(2, 3)) for k in range(4)]
        train += rotations + [rotated.flip(3) for rotated in rotations]
    test = [images[labels == digit] for digit in TEST_DIGITS]
    return train, test


def sample_task(
    classes: Sequence[Tensor], shots: int, queries: int, generator: torch.Generator
) -> DigitsTask:
    """An N-way task: N of ``classes`` at random, labelled 0..N-1 in a random order.

    Each class gives ``shots`` support images and ``queries`` other query images.
    """
    chosen = torch.randperm(len(classes), generator=generator)[:N_WAY].tolist()
    support, query = [], []
    for index in chosen:
        images = classes[index]
        order = torch.randperm(len(images), generator=generator)[: shots + queries]
        support.append(images[order[:shots]])
        query.append(images[order[shots:]])
    labels = torch.arange(N_WAY)
    return tm.SupportQuery(
        support=(torch.cat(support), labels.repeat_interleave(shots)),
        query=(torch.cat(query), labels.repeat_interleave(queries)),
    )


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """Cross-entropy of ``model`` on one ``(images, labels)`` batch."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_meta_optimizer(model: ConvNet) -> DigitsMetaOptimizer:
    """The inner loop shared by all three networks: N = 5 steps of lr 0.1, FiniteSum.

    The ``Constant`` step size is unused: Adam takes the outer step from ``meta_backward``.
    """
    return tm.MetaOptimizer(
        model,
        loss_fn,
        inner_loop=tm.GradientDescent(steps=INNER_STEPS, lr=INNER_LR),
        estimator=tm.FiniteSum(),
        step_size=tm.Constant(OUTER_LR),
    )


def meta_train(
    meta_opt: DigitsMetaOptimizer,
    classes: Sequence[Tensor],
    *,
    shots: int,
    iterations: int,
    meta_batch: int,
    generator: torch.Generator,
) -> list[float]:
    """Meta-train ``meta_opt.model`` with Adam on ``meta_backward``; return the meta losses."""
    adam = torch.optim.Adam(meta_opt.model.parameters(), lr=OUTER_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=iterations)
    losses: list[float] = []
    progress = tqdm(range(iterations), desc="meta-training", unit="it")
    for _ in progress:
        tasks = tm.StackedTasks.stack(
            [sample_task(classes, shots, TRAIN_QUERIES, generator) for _ in range(meta_batch)]
        )
        adam.zero_grad()
        losses.append(meta_opt.meta_backward(tasks).loss.item())
        adam.step()
        schedule.step()
        progress.set_postfix(meta_loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def pretrain(
    classes: Sequence[Tensor], *, epochs: int, generator: torch.Generator
) -> tuple[ConvNet, float]:
    """Ordinary supervised training of a ``len(classes)``-way ConvNet on all their images.

    Returns:
        The network and its accuracy on those images.
    """
    model = ConvNet(len(classes))
    images = torch.cat(list(classes))
    labels = torch.cat([torch.full((len(c),), i) for i, c in enumerate(classes)])
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in tqdm(range(epochs), desc="pretraining", unit="epoch"):
        order = torch.randperm(len(images), generator=generator)
        for batch in torch.split(order, PRETRAIN_BATCH):
            adam.zero_grad()
            torch.autograd.backward(loss_fn(model, (images[batch], labels[batch])))
            adam.step()
    with torch.no_grad():
        predictions = model(images).argmax(1)
    return model, (predictions == labels).float().mean().item()


def with_new_head(pretrained: ConvNet) -> ConvNet:
    """The pretrained body with an N-way head of zeros (uniform predictions)."""
    model = ConvNet(N_WAY)
    model.body.load_state_dict(pretrained.body.state_dict())
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    return model


def query_accuracy(model: ConvNet, params: dict[str, Tensor], task: DigitsTask) -> float:
    """Accuracy on the task's query images of ``model`` with weights ``params``."""
    x, y = task.query
    with torch.no_grad():
        logits: Tensor = functional_call(model, params, (x,))
    return (logits.argmax(1) == y).float().mean().item()


def evaluate(meta_opt: DigitsMetaOptimizer, tasks: Sequence[DigitsTask]) -> Accuracy:
    """Query accuracy after ``meta_opt.adapt(task)`` (N inner steps), with its 95% CI."""
    accuracies = [query_accuracy(meta_opt.model, meta_opt.adapt(task), task) for task in tasks]
    return Accuracy.of(torch.tensor(accuracies))


def accuracy_by_steps(
    meta_opt: DigitsMetaOptimizer, tasks: Sequence[DigitsTask], max_steps: int
) -> list[Accuracy]:
    """Query accuracy after 0, 1, ..., ``max_steps`` inner steps, with 95% CIs.

    Gradient descent keeps no state from one step to the next, so ``s`` steps from
    ``w`` are one step from the weights after ``s - 1``: each task is walked one
    ``adapt(task, steps=1)`` at a time on a copy of the network (``max_steps`` steps a
    task instead of ``1 + 2 + ... + max_steps``).
    """
    start = {name: p.detach().clone() for name, p in meta_opt.model.named_parameters()}
    walker = copy.deepcopy(meta_opt.model)
    walker_opt = make_meta_optimizer(walker)
    accuracies = torch.empty(len(tasks), max_steps + 1)
    for i, task in enumerate(tasks):
        with torch.no_grad():
            for name, p in walker.named_parameters():
                p.copy_(start[name])
        accuracies[i, 0] = query_accuracy(walker, dict(walker.named_parameters()), task)
        for steps in range(1, max_steps + 1):
            params = walker_opt.adapt(task, steps=1)
            with torch.no_grad():
                for name, p in walker.named_parameters():
                    p.copy_(params[name])
            accuracies[i, steps] = query_accuracy(walker, params, task)
    return [Accuracy.of(accuracies[:, steps]) for steps in range(max_steps + 1)]


def plot_curves(curves: dict[str, list[Accuracy]], chance: float, title: str, path: Path) -> Path:
    """Meta-test accuracy against inner steps, with 95% confidence bands."""
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for (label, curve), color in zip(curves.items(), ("C0", "C1", "C2"), strict=True):
        steps = range(len(curve))
        mean = [100 * a.mean for a in curve]
        axes.plot(steps, mean, "o-", color=color, label=label, markersize=4)
        axes.fill_between(
            steps,
            [100 * (a.mean - a.ci) for a in curve],
            [100 * (a.mean + a.ci) for a in curve],
            color=color,
            alpha=0.25,
            linewidth=0,
        )
    axes.axhline(100 * chance, color="gray", linestyle=":", label="chance")
    axes.axvline(INNER_STEPS, color="gray", linestyle="--", linewidth=0.8)
    axes.set_xlabel(
        f"inner steps on the support set (lr {INNER_LR}; N = {INNER_STEPS} in training)"
    )
    axes.set_ylabel("query accuracy on unseen digits (%)")
    axes.set_title(title)
    axes.legend(loc="center right")  # between the adapted curves and chance: covers none
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    return path


def plot_training(losses: Sequence[float], title: str, path: Path) -> Path:
    """The meta loss of each iteration and its moving average."""
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    iterations = range(1, len(losses) + 1)
    window = max(1, len(losses) // 25)
    smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
    axes.plot(iterations, losses, color="C0", alpha=0.3, linewidth=0.8, label="meta-batch")
    axes.plot(iterations[window - 1 :], smooth, color="C0", label=f"mean of {window}")
    axes.set_xlabel("meta iteration")
    axes.set_ylabel("query cross-entropy after adaptation")
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        description="Meta-train a 5-way few-shot digit classifier with multi-step MAML "
        "and compare it with no meta-training and with supervised pretraining."
    )
    parser.add_argument(
        "--shots", type=int, default=1, help="support images per class, K (default: 1)"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"meta iterations (default: {ITERATIONS}, quick: {QUICK_ITERATIONS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default: 0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a run of a few seconds: {QUICK_ITERATIONS} iterations of {QUICK_META_BATCH} "
        f"tasks, {QUICK_PRETRAIN_EPOCHS} pretraining epochs, {QUICK_EVAL_TASKS} meta-test tasks",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("docs/images"),
        help="folder of the PNG plots (default: docs/images)",
    )
    args = parser.parse_args(argv)
    if args.shots < 1:
        parser.error(f"--shots must be at least 1 (got {args.shots})")
    if args.iterations is not None and args.iterations < 1:
        parser.error(f"--iterations must be at least 1 (got {args.iterations})")
    return args


def run(args: argparse.Namespace) -> Result:
    """Meta-train, pretrain, evaluate, plot and print the table; see :func:`main`."""
    shots: int = args.shots
    iterations: int = args.iterations or (QUICK_ITERATIONS if args.quick else ITERATIONS)
    meta_batch = QUICK_META_BATCH if args.quick else META_BATCH
    epochs = QUICK_PRETRAIN_EPOCHS if args.quick else PRETRAIN_EPOCHS
    eval_tasks = QUICK_EVAL_TASKS if args.quick else EVAL_TASKS
    setting = f"{N_WAY}-way {shots}-shot"

    torch.manual_seed(args.seed)
    train_classes, test_classes = load_classes()
    model = ConvNet(N_WAY)
    untrained = copy.deepcopy(model)  # the same random initialisation, never meta-trained
    meta_opt = make_meta_optimizer(model)
    print(
        f"MAML on digits, {setting}: meta-train on {len(train_classes)} classes "
        f"(digits {TRAIN_DIGITS[0]}-{TRAIN_DIGITS[-1]} x 8 symmetries), meta-test on "
        f"digits {TEST_DIGITS[0]}-{TEST_DIGITS[-1]}; {iterations} iterations x {meta_batch} "
        f"tasks, N={INNER_STEPS} inner steps of lr {INNER_LR}, outer adam lr {OUTER_LR} "
        f"(cosine), seed {args.seed}",
        flush=True,
    )
    start = time.perf_counter()
    losses = meta_train(
        meta_opt,
        train_classes,
        shots=shots,
        iterations=iterations,
        meta_batch=meta_batch,
        generator=torch.Generator().manual_seed(args.seed),
    )
    train_seconds = time.perf_counter() - start
    final_loss = sum(losses[-max(1, iterations // 10) :]) / max(1, iterations // 10)
    print(f"meta-training: {train_seconds:.1f} s, final meta loss {final_loss:.3f}", flush=True)

    pretrained, train_accuracy = pretrain(
        train_classes,
        epochs=epochs,
        generator=torch.Generator().manual_seed(args.seed + PRETRAIN_SEED_OFFSET),
    )
    print(
        f"pretraining: {len(train_classes)}-way accuracy {100 * train_accuracy:.1f}% "
        f"on its training images",
        flush=True,
    )

    test_generator = torch.Generator().manual_seed(args.seed + EVAL_SEED_OFFSET)
    tasks = [
        sample_task(test_classes, shots, TEST_QUERIES, test_generator) for _ in range(eval_tasks)
    ]
    methods = {
        "MAML (meta-trained)": meta_opt,
        "no meta-training": make_meta_optimizer(untrained),
        "pretrained, new head": make_meta_optimizer(with_new_head(pretrained)),
    }
    table = {name: evaluate(opt, tasks) for name, opt in methods.items()}
    curves = {
        name: accuracy_by_steps(opt, tasks[:CURVE_TASKS], CURVE_STEPS)
        for name, opt in tqdm(methods.items(), desc="meta-test curves", unit="method")
    }

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"few_shot_digits_{N_WAY}way{shots}shot"
    plots = (
        plot_curves(
            curves,
            1 / N_WAY,
            f"{setting} on unseen digits ({min(eval_tasks, CURVE_TASKS)} tasks, 95% CI)",
            args.out / f"{stem}_steps.png",
        ),
        plot_training(losses, f"MAML meta-training, {setting}", args.out / f"{stem}_training.png"),
    )

    print(
        f"\nQuery accuracy on {eval_tasks} meta-test tasks ({setting}, digits "
        f"{TEST_DIGITS[0]}-{TEST_DIGITS[-1]}) after N={INNER_STEPS} inner steps of lr "
        f"{INNER_LR}, mean ± 95% CI:"
    )
    print(f"{'method':<24}{'accuracy':>16}")
    for name, accuracy in table.items():
        print(f"{name:<24}{accuracy!s:>16}")
    print(f"{'chance':<24}{100 / N_WAY:>12.1f} %")
    print("plots: " + ", ".join(str(path) for path in plots))
    maml, random_init, transfer = table.values()
    return Result(
        maml=maml,
        random_init=random_init,
        pretrained=transfer,
        curves=curves,
        chance=1 / N_WAY,
        final_meta_loss=final_loss,
        iterations=iterations,
        train_seconds=train_seconds,
        plots=plots,
    )


def main(argv: list[str] | None = None) -> Result:
    """Run the example with the command line ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The table's accuracies with their 95% CIs, the accuracy curves, the plots' paths,
        and the training's last meta loss and time.
    """
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: more threads only wait on each other
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
