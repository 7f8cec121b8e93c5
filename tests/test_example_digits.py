"""examples/few_shot_digits.py runs and shows what it claims, in its seeded ``--quick`` mode.

examples/ is not a package: the example is loaded from its file, as a user would run it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.problems import load_example


@pytest.fixture(scope="module")
def digits() -> ModuleType:
    return load_example("few_shot_digits")


def test_digits_quick_run_adapts_to_unseen_digits(
    digits: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = digits.main(["--quick", "--out", str(tmp_path)])

    # The plots exist and are PNG files with something in them.
    assert len(result.plots) == 2
    for plot in result.plots:
        assert plot.parent == tmp_path
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plot.stat().st_size > 10_000

    # Seeded, hence deterministic: on the reference machine (torch 2.13 CPU) the quick
    # run's 20 tasks give, after 5 inner steps, 76.2 +- 3.6% for MAML, 73.5 +- 4.4%
    # without meta-training and 68.5 +- 3.6% for the pretrained network, chance being
    # 20%. Its 25 iterations do not separate MAML from the baselines (the default
    # run's 500 do, by 4 points or more), so the test checks what holds with a wide
    # margin: all three learn the unseen digits from one image each, far above chance.
    assert result.chance == pytest.approx(0.2)
    for accuracy in (result.maml, result.random_init, result.pretrained):
        assert accuracy.mean > 2.5 * result.chance
        assert 0 < accuracy.ci < 0.1
    # Labels are shuffled from task to task, so before adaptation no network does
    # better than chance: the accuracy comes from the inner steps. The pretrained
    # network's zero head ties all logits, so it is exactly at chance.
    curves = result.curves
    assert set(curves) == {"MAML (meta-trained)", "no meta-training", "pretrained, new head"}
    for curve in curves.values():
        assert len(curve) == digits.CURVE_STEPS + 1
        assert curve[0].mean < 0.3
        assert curve[digits.INNER_STEPS].mean > curve[0].mean + 0.3
    assert curves["pretrained, new head"][0].mean == pytest.approx(0.2, abs=1e-6)
    # The curve walks one adapt(task, steps=1) at a time; after N of them it reaches
    # the table's adapt(task) on every task, hence the same accuracy.
    table = (result.maml, result.random_init, result.pretrained)
    for accuracy, curve in zip(table, curves.values(), strict=True):
        assert curve[digits.INNER_STEPS].mean == pytest.approx(accuracy.mean, abs=1e-6)

    out = capsys.readouterr().out
    assert "Query accuracy on 20 meta-test tasks (5-way 1-shot" in out
    for name, accuracy in zip(curves, table, strict=True):
        row = next(line for line in out.splitlines() if line.startswith(name))
        assert f"{100 * accuracy.mean:.1f} ± {100 * accuracy.ci:.1f} %" in row
    assert "chance" in out


@pytest.mark.parametrize("argv", [["--shots", "0"], ["--iterations", "0"], ["--seed", "x"]])
def test_digits_rejects_bad_arguments(
    digits: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        digits.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
