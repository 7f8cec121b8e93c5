"""torch.distributed: 2 processes (gloo, CPU) end with the weights of 1 process that takes
the whole meta-batch, in float64 to 1e-10, through ``examples/distributed.py``.

5 tasks per meta-batch: shards of 3 and 2 tasks, so a plain average of the two
processes' means would be wrong; the probe gradients of SmoothnessAdaptive are
averaged over the processes too. Every torchrun job must exit with status 0: an abort
at exit after the work is done is a failure (``tests/distributed_reduce.py`` checks the
cause, a tensor left with gloo after a reduction returned). The torchrun tests are
integration tests; the checks of the ``distributed`` argument run in the fast loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.problems import EXAMPLES, torchrun

ROOT = EXAMPLES.parent
EXAMPLE = str(EXAMPLES / "distributed.py")
OPTIONS = ["--quick", "--dtype", "float64"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    saved: dict[str, torch.Tensor] = torch.load(out, weights_only=True)
    return saved


@pytest.mark.integration
@pytest.mark.parametrize("outer", ["constant", "adaptive"])
def test_two_processes_match_one_on_the_whole_meta_batch(tmp_path: Path, outer: str) -> None:
    alone = [sys.executable, EXAMPLE, "--outer", outer, *OPTIONS, "--out", str(tmp_path / "1")]
    subprocess.run(alone, cwd=ROOT, capture_output=True, timeout=300, check=True)
    torchrun(EXAMPLE, "--outer", outer, *OPTIONS, "--out", str(tmp_path / "2"))
    one, two = weights(tmp_path / "1"), weights(tmp_path / "2")
    assert one.keys() == two.keys()
    flat_one = torch.cat([one[n].reshape(-1) for n in one])
    flat_two = torch.cat([two[n].reshape(-1) for n in one])
    assert flat_one.dtype == torch.float64
    assert float((flat_two - flat_one).norm() / flat_one.norm()) < 1e-10


@pytest.mark.integration
def test_smoothness_estimates_combine_over_processes(tmp_path: Path) -> None:
    """Maxima of L, rho and b_max; b weighted by shard size; counts summed; nothing left."""
    done = torchrun("-m", "tests.distributed_reduce")
    output = f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.count("done") == 2, output
    # torch_maml's reductions leave no tensor with gloo once they return (else a barrier
    # right after could keep it until the interpreter shuts down, and abort the exit).
    assert "tensors still held by the backend after their reduction: 0" in done.stdout, output
    line = next(text for text in done.stdout.splitlines() if text.startswith("{"))
    combined = json.loads(line)
    assert combined["L"] == 5.0
    assert combined["rho"] == 7.0
    assert combined["b_max"] == 6.0
    assert combined["b"] == pytest.approx((1.0 * 2 + 4.0 * 3) / 5, rel=1e-15)
    assert combined["grad_evals"] == 2 * 5
    assert combined["hvp_evals"] == 100 * 5


def test_the_distributed_argument_is_checked() -> None:
    from torch_maml.distributed import process_group

    assert process_group(False) is None
    with pytest.raises(TypeError, match=r"'distributed' must be a bool or a torch\.distributed"):
        process_group("gloo")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"'distributed' needs torch\.distributed to be initialised"
    ):
        process_group(True)


@pytest.mark.integration
def test_uneven_steps_give_one_outcome_on_every_process(tmp_path: Path) -> None:
    """An empty shard, a refused shard and a process resumed one step behind."""
    torchrun("-m", "tests.distributed_steps", str(tmp_path))
    seen = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    refused_here = (
        "ValueError: 'tasks[0].support' holds an empty tensor (shape (0, 1)): every batch "
        "needs at least one sample"
    )
    refused_there = (
        "RuntimeError: torch.distributed: another process's tasks were refused at this step "
        "(see its error); no process changed its weights"
    )
    for key in ("refused", "refused, adaptive"):
        assert seen[0][key] == refused_there
        assert seen[1][key] == refused_here
    for rank, made in ((0, 4), (1, 2)):
        report = seen[rank]
        assert report["empty shard equals one process"]
        assert report["refused changed nothing"]
        assert report["paired after refusal"]
        assert report["stale changed nothing"]
        assert report["refused, adaptive, changed nothing"]
        assert report["adaptive paired after refusal"]
        assert report["stale checkpoint"] == (
            "RuntimeError: torch.distributed: the processes are at different meta steps (this "
            f"one has made {made} steps, others between 2 and 4); a process skipped a step or "
            "failed one, so their collectives no longer pair up. Every process must call step "
            "(or meta_backward) the same number of times"
        )
