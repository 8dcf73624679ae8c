"""Report figures: what is drawn where (∞ position, log axes, labels), and PNG output."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from privaudit.reports import figures as F
from privaudit.reports.runs_table import RunRecord, load_runs
from tests.reports.conftest import install_fake_accountants, make_four_runs


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[RunRecord]:
    with pytest.MonkeyPatch.context() as mp:
        install_fake_accountants(mp)
        return load_runs(make_four_runs(tmp_path_factory.mktemp("fig_runs")), steps_points=10)


def _tick_labels(ax, axis: str = "x") -> list[str]:  # type: ignore[no-untyped-def]
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks]


def _inf_tick(ax, axis: str = "x") -> float:  # type: ignore[no-untyped-def]
    ticks = list(ax.get_xticks() if axis == "x" else ax.get_yticks())
    return ticks[_tick_labels(ax, axis).index("∞")]


def test_eps_vs_utility_puts_non_private_at_infinity(records: list[RunRecord]) -> None:
    fig = F.eps_vs_utility(records)
    assert isinstance(fig, Figure) and F.has_data(fig)
    axes = fig.axes
    assert len(axes) == 2  # accuracy and perplexity are not put on one axis
    acc_ax = next(a for a in axes if "accuracy" in a.get_ylabel())
    ppl_ax = next(a for a in axes if "perplexity" in a.get_ylabel())
    assert "lower is better" in ppl_ax.get_ylabel() and "higher is better" in acc_ax.get_ylabel()
    inf_x = _inf_tick(acc_ax)
    xs_by_y: dict[float, list[float]] = {}
    for line in acc_ax.get_lines():
        for x, y in zip(line.get_xdata(), line.get_ydata()):
            xs_by_y.setdefault(round(float(y), 6), []).append(float(x))
    baseline_xs = xs_by_y[0.91]  # the non-private run's accuracy
    assert baseline_xs and all(x == pytest.approx(inf_x) for x in baseline_xs)
    finite = [x for y, xs in xs_by_y.items() if y != 0.91 for x in xs]
    assert finite and max(finite) < inf_x and min(finite) > 0
    # one accountant only (the report's headline, named on the axis): one curve through the two DP runs
    curves = [line for line in acc_ax.get_lines() if len(line.get_xdata()) > 1 and line.get_marker() != "None"]
    assert len(curves) == 1 and len(curves[0].get_xdata()) == 2
    assert "(PLD)" in acc_ax.get_xlabel()


def test_attack_success_has_ci_error_bars(records: list[RunRecord]) -> None:
    fig = F.attack_success_vs_eps(records)
    ax = fig.axes[0]
    assert "∞" in _tick_labels(ax)
    assert len(ax.containers) == 4  # one errorbar container per attack name
    segs = [seg for c in ax.containers for coll in c.lines[2] for seg in coll.get_segments()]
    lows_highs = sorted((round(float(s[0][1]), 3), round(float(s[1][1]), 3)) for s in segs)
    assert (0.81, 0.88) in lows_highs and (0.49, 0.55) in lows_highs


def test_empirical_vs_accounted_has_diagonal_and_claim(records: list[RunRecord]) -> None:
    fig = F.empirical_vs_accounted(records)
    ax = fig.axes[0]
    lines = ax.get_lines()
    diag = [ln for ln in lines if ln.get_linestyle() == "--" and len(ln.get_xdata()) == 2]
    assert diag and list(diag[0].get_xdata()) == list(diag[0].get_ydata())
    claim_marks = [ln for ln in lines if ln.get_marker() == "_"]
    assert [float(ln.get_ydata()[0]) for ln in claim_marks] == [1.0]
    assert float(claim_marks[0].get_xdata()[0]) == pytest.approx(_inf_tick(ax))
    violation = [ln for ln in lines if ln.get_marker() == "D"]
    assert [float(ln.get_ydata()[0]) for ln in violation] == [2.4]


def test_roc_is_log_log(records: list[RunRecord]) -> None:
    rec = next(r for r in records if r.label == "dp-weak")
    fig = F.roc_curves(rec)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert any(lbl.startswith("loss") for lbl in labels) and any(lbl.startswith("rmia") for lbl in labels)
    assert all(np.all(np.asarray(ln.get_xdata()) > 0) for ln in ax.get_lines())
    # an attack without ROC falls back to its TPR-at-fixed-FPR points
    strong = next(r for r in records if r.label == "dp-strong")
    line = next(ln for ln in F.roc_curves(strong).axes[0].get_lines() if ln.get_label().startswith("loss"))
    assert list(line.get_xdata()) == pytest.approx([0.001, 0.01])


def test_eps_over_steps_curves(records: list[RunRecord]) -> None:
    fig = F.eps_over_steps(records)
    ax = fig.axes[0]
    data = {ln.get_label().split(" ")[0]: ln for ln in ax.get_lines()}
    assert set(data) == {"dp-strong", "dp-weak"}
    ys = np.asarray(data["dp-weak"].get_ydata())
    assert np.all(np.diff(ys) >= 0) and list(data["dp-weak"].get_xdata())[-1] == 300


def test_no_data_figures_and_png(tmp_path: Path, records: list[RunRecord]) -> None:
    empty = F.eps_over_steps([])
    assert not F.has_data(empty)
    assert not F.has_data(F.attack_success_vs_eps([]))
    assert not F.has_data(F.eps_vs_utility([]))
    p = F.save_png(F.empirical_vs_accounted(records), tmp_path / "sub" / "e.png", dpi=60)
    img = imread(p)
    assert img.shape[0] > 100 and float(img[..., :3].std()) > 0.05


def test_only_non_private_runs(records: list[RunRecord]) -> None:
    only = [r for r in records if r.has_guarantee is False]
    fig = F.empirical_vs_accounted(only)
    xs = [float(x) for ln in fig.axes[0].get_lines() if ln.get_marker() in ("o", "D") for x in ln.get_xdata()]
    assert xs and all(math.isfinite(x) and x > 0 for x in xs)
