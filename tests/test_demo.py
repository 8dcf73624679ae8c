"""The demo: the whole pipeline, and the trends its report must show.

CI runs ``privaudit demo --quick`` after the suite and then this file with ``PRIVAUDIT_DEMO_DIR``
pointing at its output; without it, the quick demo is run here (slow).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.demo]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("PRIVAUDIT_DEMO_DIR")
    if given:
        d = Path(given)
        assert (d / "sweep.json").exists(), f"{d} holds no finished demo"
        return d
    from privaudit.demo import run_demo

    d = tmp_path_factory.mktemp("demo")
    run_demo(d, quick=True, quiet=True)
    return d


def _points(demo_dir: Path) -> list[dict]:
    points = json.loads((demo_dir / "sweep.json").read_text())["points"]

    def eps(p: dict) -> float:
        e = (p.get("epsilon") or {}).get("pld")
        return math.inf if e is None else e

    return sorted(points, key=eps)


def test_demo_outputs_exist(demo_dir: Path) -> None:
    pdf = demo_dir / "report.pdf"
    assert pdf.exists() and pdf.stat().st_size > 10_000
    assert (demo_dir / "report_runs.csv").exists()
    assert list((demo_dir / "report_figures").glob("*.png"))
    points = _points(demo_dir)
    assert len(points) == 4  # three privacy levels and the non-private baseline
    assert [p["verdict"] for p in points[:3]] == ["consistent"] * 3
    assert points[-1]["verdict"] == "no guarantee"
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    for p in points[:3]:
        assert f"{p['epsilon']['pld']:.3f}" in text


def _diff_se(a: float, b: float, n: float) -> float:
    """Standard error of the difference of two accuracies, each measured on n held-out records
    (unpaired: conservative, as both models are scored on the same records)."""
    return math.sqrt(a * (1 - a) / n + b * (1 - b) / n)


#: one-sided 5% normal quantile: a step up must exceed the held-out sampling noise at this level
Z_ONE_SIDED = 1.645


def test_utility_rises_with_epsilon(demo_dir: Path) -> None:
    points = _points(demo_dir)  # ε = 1, 4, 16, then the non-private run (ε = ∞)
    acc = [p["utility"]["accuracy"] for p in points]
    baseline = points[0]["utility"]["majority_baseline"]
    n = points[0]["utility"]["n_eval"]
    assert n >= 300, "the demo must evaluate on enough held-out records for the trend to be testable"
    text = ", ".join(f"{a:.3f}" for a in acc)
    # the non-private run learns the task well
    assert acc[3] > baseline + 0.2, f"non-private accuracy {acc[3]:.3f} vs majority {baseline:.3f}"
    # strictly higher, beyond the held-out noise: ε = 16 and the non-private run over ε = 1
    for lo, hi in ((0, 2), (0, 3)):
        margin = Z_ONE_SIDED * _diff_se(acc[lo], acc[hi], n)
        assert acc[hi] - acc[lo] > margin, f"accuracy by ε (1, 4, 16, ∞): {text}; step {lo}->{hi} <= {margin:.3f}"
    # and never falling by more than two standard errors: ε = 1 <= 4 <= 16 <= ∞ (at the top both ε = 16
    # and the non-private run may reach the task's ceiling, ~0.96 with 48 tokens)
    for lo, hi in ((0, 1), (1, 2), (2, 3)):
        assert acc[hi] >= acc[lo] - 2 * _diff_se(acc[lo], acc[hi], n), f"accuracy by ε (1, 4, 16, ∞): {text}"


def test_attack_success_rises_with_epsilon(demo_dir: Path) -> None:
    audits = [json.loads((Path(p["run_dir"]) / "audit.json").read_text()) for p in _points(demo_dir)]
    aucs, cis = [], []
    for a in audits:
        g = next(x for x in a["attacks"] if x["name"] == "gradient_canaries_one_run")
        aucs.append(g["metrics"]["auc"])
        cis.append(g["metrics"]["auc_ci"])
    # clearly more leakage without noise than at ε = 1, beyond both confidence intervals
    assert cis[-1][0] > cis[0][1]
    # consecutive levels never drop beyond their confidence intervals
    for (lo_ci, hi_ci) in zip(cis, cis[1:]):
        assert hi_ci[1] >= lo_ci[0]
    # and the empirical lower bound never exceeds the accounted ε of the private runs
    for p in _points(demo_dir)[:3]:
        assert p["epsilon_lower"] <= p["epsilon"]["pld"]
