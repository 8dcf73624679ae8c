"""Exact privacy curves of the (unsubsampled) Gaussian and Laplace mechanisms.

Used as a test oracle for the numerical accountants and as a helper (analytic-Gaussian calibration).

* Gaussian (Balle & Wang 2018, "Improving the Gaussian mechanism", Thm. 8): noise std ``sigma`` in
  units of the L2 sensitivity. ``k`` releases compose exactly to one release with ``sigma/sqrt(k)``
  (the privacy loss is Gaussian: μ = 1/σ in Gaussian-DP terms, and μ adds in quadrature).
  δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ).
* Laplace: one release with scale ``b`` in units of the L1 sensitivity; ε-DP with ε = 1/b and
  δ(ε) = 1 − exp((ε − 1/b)/2) for 0 ≤ ε < 1/b.

All curves are symmetric in the two orders of the neighbouring pair, so they hold for add/remove
and for replace neighbours alike, given the sensitivity of the relation.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special
from scipy.optimize import brentq

__all__ = [
    "gaussian_delta",
    "gaussian_epsilon",
    "composed_gaussian_epsilon",
    "analytic_gaussian_sigma",
    "laplace_delta",
]


def _check_sigma(sigma: float) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise_multiplier: must be a finite number > 0, got {sigma!r}")


def _log_gaussian_delta(sigma: float, epsilon: float) -> float:
    """log δ(ε) of the Gaussian mechanism, stable for tiny δ."""
    a = 1.0 / (2.0 * sigma) - epsilon * sigma
    b = -1.0 / (2.0 * sigma) - epsilon * sigma
    la = float(special.log_ndtr(a))
    lb = float(special.log_ndtr(b)) + epsilon
    if lb >= la:  # only through rounding: δ is 0 to machine precision
        return -math.inf
    return la + math.log(-math.expm1(lb - la))


def gaussian_delta(sigma: float, epsilon: float) -> float:
    """Exact δ(ε) of one Gaussian release with noise multiplier ``sigma`` (std / L2 sensitivity)."""
    _check_sigma(sigma)
    return math.exp(_log_gaussian_delta(sigma, float(epsilon)))


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε(δ) of one Gaussian release (0 when δ(0) ≤ δ already)."""
    _check_sigma(sigma)
    if not 0 < delta < 1:
        raise ValueError(f"delta: must be in (0, 1), got {delta!r}")
    target = math.log(delta)
    if _log_gaussian_delta(sigma, 0.0) <= target:
        return 0.0

    def f(e: float) -> float:
        return _log_gaussian_delta(sigma, e) - target

    hi = 1.0
    while f(hi) > 0:
        hi *= 2.0
        if hi > 1e12:
            return math.inf
    return float(brentq(f, 0.0, hi, xtol=1e-14, rtol=1e-14, maxiter=500))


def composed_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Exact ε(δ) of ``steps`` Gaussian releases (no subsampling) with noise multiplier ``sigma``."""
    _check_sigma(sigma)
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps!r}")
    return gaussian_epsilon(sigma / math.sqrt(steps), delta)


def analytic_gaussian_sigma(epsilon: float, delta: float) -> float:
    """Smallest noise multiplier whose single Gaussian release is (ε, δ)-DP (Balle & Wang 2018)."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"target_epsilon: must be a finite number > 0, got {epsilon!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta: must be in (0, 1), got {delta!r}")
    target = math.log(delta)

    def f(log_s: float) -> float:
        return _log_gaussian_delta(math.exp(log_s), epsilon) - target

    lo, hi = -20.0, 5.0
    while f(hi) > 0:
        hi += 5.0
    return float(math.exp(brentq(f, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=500)))


def laplace_delta(scale: float, epsilon: float) -> float:
    """Exact δ(ε) of one Laplace release with ``scale`` = b / L1 sensitivity."""
    _check_sigma(scale)
    eps0 = 1.0 / scale
    if epsilon >= eps0:
        return 0.0
    return float(-np.expm1((epsilon - eps0) / 2.0))
