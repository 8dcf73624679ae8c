"""Noise calibration: Opacus reference values, never overshooting, input validation, speed."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import privaudit
from privaudit.accounting.analytic import analytic_gaussian_sigma
from privaudit.accounting.base import compute_epsilon
from privaudit.accounting.calibrate import CalibrationResult, calibrate_noise
from privaudit.ledger.events import GaussianEvent


def test_exported_and_frozen() -> None:
    assert privaudit.calibrate_noise is calibrate_noise
    res = calibrate_noise(2.0, 1e-5, 1.0, 5)
    assert isinstance(res, CalibrationResult) and res.accountant == "pld"
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.noise_multiplier = 1.0  # type: ignore[misc]


def test_opacus_reference_values() -> None:
    # Opacus tests: ε = 8, δ = 1e-5, q = 0.04, 90 epochs = 2250 steps
    rdp = calibrate_noise(8.0, 1e-5, 0.04, 2250, accountant="rdp")
    assert rdp.noise_multiplier == pytest.approx(1.416, abs=2e-3)
    prv = calibrate_noise(8.0, 1e-5, 0.04, 2250, accountant="prv")
    # Opacus stops its bisection once ε is within 0.01 of the target: σ within ~0.002
    assert prv.noise_multiplier == pytest.approx(1.34765625, abs=2e-3)
    pld = calibrate_noise(8.0, 1e-5, 0.04, 2250, accountant="pld")
    assert pld.noise_multiplier == pytest.approx(prv.noise_multiplier, abs=3e-3)
    for r in (rdp, prv, pld):
        assert 8.0 * (1 - 1e-3) <= r.epsilon <= 8.0


def test_long_run() -> None:
    # Timing lives in benchmarks/accounting.py, not here.
    res = calibrate_noise(3.0, 1e-5, 256 / 60000, 14063, accountant="pld")
    assert res.epsilon <= 3.0
    assert 0.9 < res.noise_multiplier < 1.05


def test_never_below_analytic_gaussian() -> None:
    # no subsampling: k releases of σ are one Gaussian of σ/√k, calibrated exactly by Balle-Wang
    for k, eps in [(1, 1.0), (10, 2.0)]:
        exact = analytic_gaussian_sigma(eps, 1e-5) * math.sqrt(k)
        res = calibrate_noise(eps, 1e-5, 1.0, k)
        assert exact <= res.noise_multiplier <= exact * 1.002


def test_replace_needs_more_noise() -> None:
    add = calibrate_noise(2.0, 1e-5, 0.05, 300, neighbouring="add_remove")
    rep = calibrate_noise(2.0, 1e-5, 0.05, 300, neighbouring="replace")
    assert rep.noise_multiplier > add.noise_multiplier
    ev = [GaussianEvent(noise_multiplier=rep.noise_multiplier, sample_rate=0.05, count=300)]
    assert compute_epsilon(ev, 1e-5, neighbouring="replace").epsilon <= 2.0


@pytest.mark.parametrize("kwargs,field", [
    ({"target_epsilon": 0.0}, "target_epsilon"), ({"target_epsilon": -1.0}, "target_epsilon"),
    ({"target_epsilon": float("nan")}, "target_epsilon"),
    ({"target_epsilon": float("inf")}, "target_epsilon"),
    ({"delta": 0.0}, "delta"), ({"delta": 1.0}, "delta"), ({"delta": float("nan")}, "delta"),
    ({"sample_rate": 0.0}, "sample_rate"), ({"sample_rate": 1.5}, "sample_rate"),
    ({"sample_rate": float("inf")}, "sample_rate"),
    ({"steps": -3}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": 0}, "steps"),
    ({"steps": float("nan")}, "steps"), ({"steps": True}, "steps"),
    ({"accountant": "moments"}, "accountant"), ({"neighbouring": "swap"}, "neighbouring"),
])
def test_bad_inputs_name_the_field(kwargs: dict, field: str) -> None:
    args = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100,
            "accountant": "pld", "neighbouring": "add_remove"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{field}"):
        calibrate_noise(**args)


@settings(max_examples=10, deadline=None)
@given(target=st.floats(0.3, 12.0), q=st.floats(0.001, 1.0), k=st.integers(1, 3000),
       delta=st.sampled_from([1e-3, 1e-5, 1e-7]), name=st.sampled_from(["pld", "rdp"]))
def test_never_overshoots(target: float, q: float, k: int, delta: float, name: str) -> None:
    res = calibrate_noise(target, delta, q, k, accountant=name)
    assert res.epsilon <= target
    ev = [GaussianEvent(noise_multiplier=res.noise_multiplier, sample_rate=q, count=k)]
    again = compute_epsilon(ev, delta, accountant=name).epsilon  # an independent evaluation
    assert again <= target
    assert again >= target * (1 - 2e-3) or res.noise_multiplier <= 1e-3  # and it is tight


@settings(max_examples=3, deadline=None)
@given(target=st.floats(0.5, 8.0), q=st.floats(0.01, 0.2), k=st.integers(10, 500))
def test_never_overshoots_prv(target: float, q: float, k: int) -> None:
    res = calibrate_noise(target, 1e-5, q, k, accountant="prv")
    ev = [GaussianEvent(noise_multiplier=res.noise_multiplier, sample_rate=q, count=k)]
    assert res.epsilon <= target
    assert compute_epsilon(ev, 1e-5, accountant="prv").epsilon <= target
