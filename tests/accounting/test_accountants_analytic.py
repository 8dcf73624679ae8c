"""The exact oracles themselves, checked against direct numerical integration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from privaudit.accounting.analytic import (
    analytic_gaussian_sigma,
    composed_gaussian_epsilon,
    gaussian_delta,
    gaussian_epsilon,
    laplace_delta,
)


def _hockey_stick(p, q, eps: float, lo: float, hi: float) -> float:
    """∫ (p − e^ε q)_+ by quadrature (the definition of δ(ε))."""
    val, _ = integrate.quad(lambda x: max(p(x) - math.exp(eps) * q(x), 0.0), lo, hi,
                            limit=400, points=[0.5, 1.0], epsabs=1e-13)
    return val


@pytest.mark.parametrize("sigma,eps", [(1.0, 0.5), (0.5, 2.0), (2.0, 0.1), (1.3, 1.7)])
def test_gaussian_delta_matches_quadrature(sigma: float, eps: float) -> None:
    p = stats.norm(1.0, sigma).pdf
    q = stats.norm(0.0, sigma).pdf
    ref = _hockey_stick(p, q, eps, -20 * sigma, 20 * sigma + 1)
    assert gaussian_delta(sigma, eps) == pytest.approx(ref, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("scale,eps", [(1.0, 0.3), (0.5, 1.0), (2.0, 0.0)])
def test_laplace_delta_matches_quadrature(scale: float, eps: float) -> None:
    p = stats.laplace(1.0, scale).pdf
    q = stats.laplace(0.0, scale).pdf
    ref = _hockey_stick(p, q, eps, -40 * scale, 40 * scale + 1)
    assert laplace_delta(scale, eps) == pytest.approx(ref, rel=1e-6, abs=1e-12)
    assert laplace_delta(scale, 1.0 / scale + 0.1) == 0.0


@pytest.mark.parametrize("sigma,delta", [(1.0, 1e-5), (0.7, 1e-3), (3.0, 1e-8)])
def test_gaussian_epsilon_inverts_delta(sigma: float, delta: float) -> None:
    eps = gaussian_epsilon(sigma, delta)
    assert gaussian_delta(sigma, eps) == pytest.approx(delta, rel=1e-9)


def test_composition_is_one_gaussian_and_calibration_inverts() -> None:
    assert composed_gaussian_epsilon(4.0, 16, 1e-5) == pytest.approx(gaussian_epsilon(1.0, 1e-5))
    s = analytic_gaussian_sigma(1.0, 1e-5)
    assert gaussian_epsilon(s, 1e-5) == pytest.approx(1.0, rel=1e-9)
    # a known value (Balle & Wang 2018, Fig. 1 regime): σ(ε=1, δ=1e-5) ≈ 3.73
    assert s == pytest.approx(3.73, abs=0.01)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="^noise_multiplier"):
        gaussian_delta(0.0, 1.0)
    with pytest.raises(ValueError, match="^delta"):
        gaussian_epsilon(1.0, 1.5)
    with pytest.raises(ValueError, match="^steps"):
        composed_gaussian_epsilon(1.0, 0, 1e-5)
    with pytest.raises(ValueError, match="^target_epsilon"):
        analytic_gaussian_sigma(float("nan"), 1e-5)
    assert np.isfinite(gaussian_epsilon(100.0, 0.5))
