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
    # "consistent" only where the audit could have certified the accounted ε; ε = 16 is beyond any design
    # (or where perfect guesses would have rejected the accountant's own trade-off curve)
    for p in points[:3]:
        el = json.loads((Path(p["run_dir"]) / "audit.json").read_text())["epsilon_lower"]
        power = el["power"]
        assert power is not None and power > 1.0
        could = p["epsilon"]["pld"] <= power or el.get("power_refutes_accounted") is True
        assert p["verdict"] == ("consistent" if could else "inconclusive"), p
    assert points[2]["verdict"] == "inconclusive" or points[2]["verdict"] == "consistent" and \
        json.loads((Path(points[2]["run_dir"]) / "audit.json").read_text())["epsilon_lower"]["power_refutes_accounted"]
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
    # and never falling by more than two standard errors: ε = 1 <= 4 <= 16, and 4 <= ∞. ε = 16 and the
    # non-private run both reach the task's ceiling (~0.96 with 48 tokens), where the spread of the runs
    # themselves exceeds the held-out noise: the quick non-private run gave 0.89-0.99 over ten runs
    # (seeds 0-4, constant and linearly decayed rate; CI's seeded run 0.903 while its ε = 16 gave 0.953),
    # ε = 16 0.84-0.96 — so the top pair is ordered only through ε = 4, where the gap is real
    for lo, hi in ((0, 1), (1, 2), (1, 3)):
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


def test_the_demo_audit_names_its_bounds_and_sees_every_step(demo_dir: Path) -> None:
    for p in _points(demo_dir)[:3]:
        a = json.loads((Path(p["run_dir"]) / "audit.json").read_text())
        names = {x["name"]: x for x in a["attacks"]}
        assert "gradient_canaries_every_step" in names and "gradient_canaries_one_run" in names
        for name in ("gradient_canaries_every_step", "gradient_canaries_one_run"):
            el = names[name]["epsilon_lower"]
            by = names[name]["epsilon_lower_by_bound"]
            # the test against the accountant's own curve runs when the ledger is PLD-accountable
            accounted = "skipped" not in a["accounted"].get("tradeoff_test", {"skipped": True})
            assert set(by) == {"one_run_steinke", "one_run_fdp"} | ({"one_run_fdp_accounted"} if accounted else set())
            assert el["bound"] in by and el["value"] == max(b["value"] for b in by.values())
        top = a["epsilon_lower"]
        assert top["bound"] in ("one_run_steinke", "one_run_fdp", "one_run_fdp_accounted")
        assert top["value"] <= a["accounted"]["compared"]["epsilon"]
        assert a["accounted"].get("tradeoff_test", {}).get("refuted") is not True


def test_demo_report_reads_as_a_signable_document(demo_dir: Path, tmp_path: Path) -> None:
    """The visual check: page count, each figure once and distinct, a plain-language page 1."""
    import hashlib
    import re

    pdf = demo_dir / "report.pdf"
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    pages = int(re.search(r"Pages:\s+(\d+)", info).group(1))  # type: ignore[union-attr]
    assert 4 <= pages <= 12, pages  # 4 runs: was 15 pages of half-empty sections
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(pdf), str(tmp_path / "pg")], check=True, timeout=120)
    assert len(list(tmp_path.glob("pg-*.png"))) == pages
    figures = sorted((demo_dir / "report_figures").glob("*.png"))
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in figures}
    assert len(digests) == len(figures)
    listed = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True, text=True, check=True).stdout
    assert sum(1 for ln in listed.splitlines()[2:] if ln.split()[2] == "image") == len(figures)
    page1 = " ".join(subprocess.run(["pdftotext", "-f", "1", "-l", "1", str(pdf), "-"], capture_output=True,
                                    text=True, check=True).stdout.split())
    assert "Executive summary" in page1 and "{'" not in page1
    assert not re.search(r"\b[0-9a-f]{32}\b", page1), "a hex run id on page 1"
    for p in _points(demo_dir):
        assert f"{p['name']} [{p['verdict']}]" in page1
    assert "differential privacy (PLD accountant)" in page1 and "without privacy" in page1
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert "{'" not in text
