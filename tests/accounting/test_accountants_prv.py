"""PRV accountant (Gopi et al.): REFERENCES §6 brackets, Opacus agreement, exact oracle."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from privaudit.accounting.analytic import composed_gaussian_epsilon
from privaudit.accounting.base import Segment, compute_epsilon
from privaudit.accounting.pld import PLDAccountant
from privaudit.accounting.prv import PRVAccountant
from privaudit.ledger.events import GaussianEvent, LaplaceEvent

# REFERENCES.md §6: (sigma, q, steps, delta, (lower, estimate, upper))
TABLE = [
    (1.1, 256 / 60000, 14063, 1e-5, (2.3715, 2.3817, 2.3918)),
    (1.5, 0.04, 2250, 1e-5, (6.7584, 6.7688, 6.7791)),
    (0.8, 5e-3, 1000, 1e-6, (1.9939, 2.0041, 2.0143)),
]


@pytest.mark.parametrize("sigma,q,steps,delta,ref", TABLE)
def test_reference_table(sigma: float, q: float, steps: int, delta: float,
                         ref: tuple[float, float, float]) -> None:
    acc = PRVAccountant()
    res = acc.epsilon([GaussianEvent(noise_multiplier=sigma, sample_rate=q, count=steps)], delta)
    assert res.epsilon_lower <= ref[1] <= res.epsilon_upper
    assert res.epsilon == res.epsilon_upper
    assert res.epsilon_lower == pytest.approx(ref[0], abs=2e-4)
    assert res.epsilon_upper == pytest.approx(ref[2], abs=2e-4)


def test_matches_opacus_prv() -> None:
    from opacus.accountants import PRVAccountant as OpacusPRV

    for sigma, q, steps, delta in [(1.5, 0.04, 2250, 1e-5), (0.8, 5e-3, 1000, 1e-6)]:
        o = OpacusPRV()
        o.history = [(sigma, q, steps)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = o.get_epsilon(delta)
        ours = PRVAccountant()._epsilon([Segment("gaussian", sigma, q, steps)], delta).epsilon
        assert ours == pytest.approx(ref, rel=1e-5)  # domain lengths differ slightly


@pytest.mark.parametrize("sigma,steps,delta", [(1.0, 1, 1e-5), (3.0, 50, 1e-6), (0.7, 4, 1e-3)])
def test_contains_analytic_gaussian(sigma: float, steps: int, delta: float) -> None:
    res = PRVAccountant().epsilon([GaussianEvent(noise_multiplier=sigma, count=steps)], delta)
    truth = composed_gaussian_epsilon(sigma, steps, delta)
    assert res.epsilon_lower <= truth <= res.epsilon_upper
    est = PRVAccountant().epsilon_estimate([Segment("gaussian", sigma, 1.0, steps)], delta)
    assert abs(est - truth) < 0.01


def test_heterogeneous_agrees_with_pld() -> None:
    rng = np.random.default_rng(3)
    segs = [Segment("gaussian", float(s), 0.01, 10) for s in rng.uniform(0.8, 1.5, 30)]
    prv = PRVAccountant()._epsilon(segs, 1e-5)
    pld = PLDAccountant()._epsilon(segs, 1e-5)
    # both bracket the same true ε: the brackets must overlap
    assert prv.epsilon_lower <= pld.epsilon_upper and pld.epsilon_lower <= prv.epsilon_upper


def test_unsupported_and_bad_parameters() -> None:
    with pytest.raises(ValueError, match="laplace"):
        compute_epsilon([LaplaceEvent(scale=1.0, sample_rate=0.1)], 1e-5, accountant="prv")
    with pytest.raises(ValueError, match="^eps_error"):
        PRVAccountant(eps_error=0.0)
    with pytest.raises(ValueError, match="^delta_error"):
        PRVAccountant(delta_error=0.5)._epsilon([Segment("gaussian", 1.0, 0.1, 10)], 1e-5)
    lap = compute_epsilon([LaplaceEvent(scale=1.0, count=2)], 1e-3, accountant="prv")
    assert lap.epsilon_lower <= 2.0 <= lap.epsilon_upper + 1e-9  # 2 pure 1-DP releases: ε ≤ 2


def test_delta_query_bounds() -> None:
    from privaudit.accounting.analytic import gaussian_delta

    d = PRVAccountant()._delta([Segment("gaussian", 2.0, 1.0, 4)], 1.0)
    assert gaussian_delta(1.0, 1.0) <= d <= gaussian_delta(1.0, 0.98) + 1e-9


@pytest.mark.parametrize("sigma,q,steps,truth_at_least", [
    (0.3647, 3.71e-4, 857, 7.98298),       # issue 14: PRV reported 7.97945
    (0.5891, 4.2e-5, 177_990, 0.55568),    # issue 14: PRV reported 0.53004 (prv_accountant 0.5661 up)
])
def test_regression_mean_shift_under_statement(sigma: float, q: float, steps: int,
                                               truth_at_least: float) -> None:
    """The mesh-shift mean was a trapezoid rule (off by up to h/2 per release); the reported ε and
    its upper bound fell below the true ε. Both must now be at least the known lower bound, and the
    bracket must contain our PLD's (independently computed) bracket's overlap."""
    res = PRVAccountant()._epsilon([Segment("gaussian", sigma, q, steps)], 1e-6)
    assert res.epsilon == res.epsilon_upper >= truth_at_least
    pld = PLDAccountant()._epsilon([Segment("gaussian", sigma, q, steps)], 1e-6)
    assert res.epsilon_lower <= pld.epsilon_upper
    assert res.epsilon_upper - res.epsilon_lower < 0.05


def test_truncated_mean_matches_quadrature() -> None:
    """The mean used for the shift against scipy quad over the output x (the issue's 2nd case)."""
    from scipy import integrate, stats

    from privaudit.accounting.pld import PairSpec
    from privaudit.accounting.prv import truncated_loss_mean

    s, q = 0.5891, 4.2e-5
    spec = PairSpec("gaussian", s, q, "remove")

    def integrand(x: float) -> float:
        v = (2 * x - 1) / (2 * s * s)
        return math.log1p(q * math.expm1(v)) * ((1 - q) * stats.norm.pdf(x, 0, s) + q * stats.norm.pdf(x, 1, s))

    ref, _ = integrate.quad(integrand, -12 * s, 1 + 12 * s, points=[0.0, 0.5, 1.0], epsabs=1e-17,
                            epsrel=1e-12, limit=500)
    got, err = truncated_loss_mean(spec, -50.0, 50.0)
    assert abs(got - ref) <= max(10 * err, 1e-16)
    assert err < 1e-13
