"""``examples/theory_reproduction.py`` in its seeded ``--quick`` mode shows what it claims."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.problems import load_example


def test_theory_reproduction_quick_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("theory_reproduction")
    report = tmp_path / "report.md"
    result = example.main(["--quick", "--out", str(tmp_path), "--report", str(report)])

    # 1. Quadratics (L = 1): with N = 1, alpha L = 1 is 2.4 times the bound and trains;
    # with N = 5, alpha L = 2.5 makes the inner steps themselves diverge (|1 - alpha L| > 1).
    sweep = {(p.family, p.steps, p.alpha_l): p for p in result.sweep}
    above = sweep[("quadratic", 1, 1.0)]
    assert above.bound_multiple > 2
    assert above.run.diverged_at is None
    assert above.run.final < 0.5 * above.run.start
    assert sweep[("quadratic", 5, 2.5)].run.diverged_at is not None
    # 2. Oracle calls per meta step: exactly B (N + 1) gradients and B N HVPs.
    for point in result.cost:
        assert point.grad_evals == example.META_BATCH * (point.steps + 1)
        assert point.hvp_evals == example.META_BATCH * point.steps
    # 3. The largest constant step diverges, the smoothness-adaptive ones do not.
    policies = {p.label: p.run for p in result.policies}
    assert policies["Constant(1.0)"].diverged_at is not None
    for label in ("SmoothnessAdaptive (theorem)", "SmoothnessAdaptive (derived)"):
        assert policies[label].diverged_at is None
        assert policies[label].final < policies[label].start
    # 4. The estimates against the closed forms.
    quadratic, cubic = result.constants
    assert abs(quadratic.estimated_l - 1.0) < 1e-6
    assert quadratic.estimated_rho < 1e-8
    assert quadratic.estimated_b == pytest.approx(quadratic.true_b, rel=1e-10)
    assert abs(cubic.estimated_rho - cubic.true_rho) / cubic.true_rho < 1e-6
    assert abs(cubic.estimated_l - cubic.true_l) / cubic.true_l < 1e-6

    for plot in result.plots:
        assert plot.read_bytes().startswith(b"\x89PNG")
    text = report.read_text()
    assert text.startswith("# Reproducing the paper's claims")
    assert "## What held" in text
    assert "What held" in capsys.readouterr().out


def test_theory_reproduction_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("theory_reproduction")
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--seed", "x"])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
