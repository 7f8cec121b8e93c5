"""Fault tolerance: a run killed mid-training and resumed from its checkpoint.

The training script is ``tests/fault_run.py``, run in real subprocesses. A run is killed
by SIGKILL after its checkpoint of step KILL_AFTER; resumed from that checkpoint (model,
MetaOptimizer, Adam, StepLR and the script's task generator), it must end with bitwise
the same weights as an uninterrupted run, which runs alongside the killed one. Resumed
without the MetaOptimizer's state (whose generator draws the Resampled estimator's
batches), it must not: the comparison can fail.

Each process spends about 2.5 s importing torch and torch._dynamo, and 0.1 s training.
"""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
KILL_AFTER = 3
TIMEOUT = 120.0


def command(checkpoint: Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tests.fault_run",
        "--checkpoint",
        str(checkpoint),
        "--steps",
        str(STEPS),
        *flags,
    ]


def step_lines(first: int) -> list[str]:
    return [f"step {k}" for k in range(first, STEPS + 1)] + ["done"]


def run_to_end(checkpoint: Path, *flags: str) -> list[str]:
    """Run the script to completion; its stdout lines."""
    done = subprocess.run(
        command(checkpoint, *flags),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def final_weights(checkpoint: Path) -> dict[str, Tensor]:
    weights: dict[str, Tensor] = torch.load(f"{checkpoint}.final", weights_only=True)
    return weights


def checkpoint_step(checkpoint: Path) -> int:
    state: dict[str, Any] = torch.load(checkpoint, weights_only=True)
    return int(state["step"])


def read_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def run_and_kill(checkpoint: Path, stderr: IO[str]) -> None:
    """Run the script, SIGKILL it once it prints ``step KILL_AFTER``, check it died of it."""
    with subprocess.Popen(
        command(checkpoint, "--sleep", "1"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            seen: list[str] = []
            while not seen or seen[-1] != f"step {KILL_AFTER}":
                line = lines.get(timeout=TIMEOUT)
                assert line is not None, f"the run ended before it was killed: {seen}"
                seen.append(line)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=TIMEOUT)
            reader.join(timeout=TIMEOUT)
    stderr.seek(0)
    assert proc.returncode == -signal.SIGKILL, stderr.read()


class Resumed:
    """A resume of a copy of the killed run's checkpoint, started at once."""

    def __init__(self, killed: Path, checkpoint: Path, *flags: str) -> None:
        shutil.copyfile(killed, checkpoint)
        self.checkpoint = checkpoint
        self.proc = subprocess.Popen(
            command(checkpoint, "--resume", *flags),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self) -> tuple[list[str], dict[str, Tensor]]:
        """Wait for it: its stdout lines and final weights."""
        stdout, stderr = self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, stdout + stderr
        return stdout.splitlines(), final_weights(self.checkpoint)


class Runs:
    """An uninterrupted run and a killed one, side by side; then two resumes of the latter.

    The uninterrupted run goes alongside the killed one, and the two resumes (one
    faithful, one without the MetaOptimizer's state) alongside each other: two
    processes at a time, most of each spent importing torch.
    """

    def __init__(self, tmp: Path) -> None:
        reference = tmp / "uninterrupted.pt"
        uninterrupted = subprocess.Popen(
            command(reference),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.killed = tmp / "killed.pt"
        try:
            with open(tmp / "killed.stderr", "w+") as stderr:
                run_and_kill(self.killed, stderr)
        except BaseException:
            uninterrupted.kill()
            uninterrupted.communicate(timeout=TIMEOUT)
            raise
        stdout, err = uninterrupted.communicate(timeout=TIMEOUT)
        assert uninterrupted.returncode == 0, stdout + err
        assert stdout.splitlines() == step_lines(1), stdout + err
        self.reference = final_weights(reference)
        self.killed_at = checkpoint_step(self.killed)
        self.killed_finished = Path(f"{self.killed}.final").exists()
        resumes = [
            Resumed(self.killed, tmp / "resumed.pt"),
            Resumed(self.killed, tmp / "forgetful.pt", "--forget-meta-state"),
        ]
        try:
            self.resumed = resumes[0].finish()
            self.forgetful = resumes[1].finish()
        finally:
            for resume in resumes:
                if resume.proc.poll() is None:
                    resume.proc.kill()
                resume.proc.communicate(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    tmp = tmp_path_factory.mktemp("faults")
    try:
        yield Runs(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_killed_run_resumes_to_bitwise_the_same_weights(runs: Runs) -> None:
    assert not runs.killed_finished
    assert KILL_AFTER <= runs.killed_at < STEPS

    lines, weights = runs.resumed
    assert lines == step_lines(runs.killed_at + 1)
    assert weights.keys() == runs.reference.keys()
    for name, tensor in runs.reference.items():
        assert torch.equal(weights[name], tensor), name


def test_resuming_without_the_meta_optimizer_state_diverges(runs: Runs) -> None:
    lines, weights = runs.forgetful
    assert lines == step_lines(runs.killed_at + 1)
    assert weights.keys() == runs.reference.keys()
    assert not all(torch.equal(weights[name], t) for name, t in runs.reference.items())
