"""The f-DP one-run test against the accountant's own trade-off curve (``one_run_fdp_accounted``).

(a) analytic: the PLD curve of the plain Gaussian mechanism is G_μ up to discretisation, never above;
(b) coverage: guesses from the true mechanism (Gaussian, Poisson-subsampled Gaussian) do not refute
    the true accounted claim beyond the confidence level;
(c) power: a mechanism with much less noise than claimed is refuted;
(d) gain: the accounted test refutes where Steinke's ε_lower stays below the claimed ε.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from privaudit.accounting.base import Segment, compute_epsilon
from privaudit.audit.accounted import accounted_curve, accounted_family
from privaudit.audit.bounds import (
    ACCOUNTED_FAMILY,
    TradeoffCurve,
    TradeoffFamily,
    default_one_run_grid,
    one_run_bounds_best,
    one_run_fdp_claim_refutable,
    one_run_fdp_curve_rejects,
    one_run_fdp_family_bound,
    one_run_fdp_mu_lower_bound,
    one_run_fdp_rejects,
)
from privaudit.ledger.events import GaussianEvent

SMALL_SCALES = (0.25, 0.5, 0.71, 1.0, 1.41, 2.0, 4.0)  # a coarse family grid keeps the tests fast


def _family(sigma: float, q: float = 1.0, steps: int = 1, scales: tuple[float, ...] = SMALL_SCALES
            ) -> TradeoffFamily:
    fam, why = accounted_family([GaussianEvent(noise_multiplier=sigma, sample_rate=q, count=steps)], scales)
    assert fam is not None, why
    return fam


def _guesses(scores: np.ndarray, inc: np.ndarray, k: int) -> tuple[int, int]:
    """(r, v) for "in" on the k highest and "out" on the k lowest scores."""
    order = np.argsort(-scores, kind="stable")
    v = int(inc[order[:k]].sum() + (~inc[order[-k:]]).sum())
    return 2 * k, v


def _gaussian_scores(rng: np.random.Generator, m: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    inc = rng.random(m) < 0.5
    return rng.normal(size=m) * sigma + inc, inc


def _subsampled_scores(rng: np.random.Generator, m: int, sigma: float, q: float, steps: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Each canary's own Poisson-subsampled Gaussian releases (sensitivity 1), scored by the exact
    privacy loss of the mixture: Σ_t log(1 − q + q·exp((2x_t − 1)/(2σ²)))."""
    inc = rng.random(m) < 0.5
    x = rng.normal(size=(m, steps)) * sigma + inc[:, None] * (rng.random((m, steps)) < q)
    return np.log1p(-q + q * np.exp((2 * x - 1) / (2 * sigma**2))).sum(axis=1), inc


# ------------------------------------------------------------------------------------------------
# (a) analytic


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_plain_gaussian_accounted_curve_is_the_gdp_curve(sigma: float) -> None:
    f = accounted_curve([Segment("gaussian", sigma, 1.0, 1)])
    alpha = np.array([1e-4, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 0.95])
    g = stats.norm.cdf(stats.norm.ppf(1 - alpha) - 1 / sigma)
    assert np.max(np.abs(f(alpha) - g)) < 5e-4
    assert np.all(f(alpha) <= g + 1e-9)  # a valid lower bound on the true curve: never above it
    assert f(0.0) == pytest.approx(1.0, abs=1e-6) and f(1.0) == 0.0
    # symmetric: f(f(α)) = α up to discretisation
    assert np.max(np.abs(f(f(alpha)) - alpha)) < 1e-3


def test_accounted_curve_and_gaussian_family_share_the_recursion() -> None:
    """μ = 1 as a Gaussian family member and as the PLD curve of σ = 1: the same rejections, except
    within one correct guess of the boundary (the PLD curve is slightly lower: harder to reject)."""
    f = accounted_curve([Segment("gaussian", 1.0, 1.0, 1)])
    for m, r in ((1000, 1000), (1000, 200), (400, 100)):
        gauss = [one_run_fdp_rejects(m, r, v, 1.0) for v in range(r // 2, r + 1)]
        acc = [one_run_fdp_curve_rejects(m, r, v, f) for v in range(r // 2, r + 1)]
        vg, va = gauss.index(True) if True in gauss else None, acc.index(True) if True in acc else None
        assert (vg is None) == (va is None)
        if vg is not None:
            assert 0 <= va - vg <= 1, (m, r, vg, va)
            assert all(acc[va:]) and all(gauss[vg:])


def test_subsampled_curve_lies_between_the_plain_one_and_no_privacy() -> None:
    plain = accounted_curve([Segment("gaussian", 1.0, 1.0, 4)])
    sub = accounted_curve([Segment("gaussian", 1.0, 0.1, 4)])
    alpha = np.linspace(0.0, 1.0, 41)
    assert np.all(sub(alpha) >= plain(alpha) - 1e-9) and np.all(sub(alpha) <= 1 - alpha + 1e-9)
    assert np.any(sub(alpha) > plain(alpha) + 0.05)


def test_tradeoff_curve_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="^epsilons:"):
        TradeoffCurve(np.array([-1.0]), np.array([0.1]))
    with pytest.raises(ValueError, match="^deltas:"):
        TradeoffCurve(np.array([1.0]), np.array([1.5]))
    with pytest.raises(ValueError, match="^epsilons:"):
        TradeoffCurve(np.array([1.0, 2.0]), np.array([0.1]))
    with pytest.raises(ValueError, match="^curve:"):
        one_run_fdp_curve_rejects(10, 10, 10, "G_1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^family:"):
        one_run_bounds_best(np.zeros(10), np.zeros(10, bool), [1e-5], bounds=("one_run_fdp_accounted",))
    with pytest.raises(ValueError, match="^claim:"):
        TradeoffFamily((0.5, 2.0), lambda c: accounted_curve([Segment("gaussian", c, 1.0, 1)]), lambda c, d: 0.0)
    fam, why = accounted_family([GaussianEvent(noise_multiplier=1.0, sample_rate=1.0)])
    assert fam is not None and why is None and 1.0 in fam.scales
    from privaudit.ledger.events import PlaintextEvent

    fam, why = accounted_family([PlaintextEvent(what="activations")])
    assert fam is None and why and "plaintext" in why


# ------------------------------------------------------------------------------------------------
# (b) coverage


@pytest.mark.parametrize(("q", "steps", "sigma"), [(1.0, 1, 1.0), (0.25, 4, 0.8)])
def test_true_mechanism_never_refutes_its_accounted_claim_beyond_the_confidence(q: float, steps: int,
                                                                                sigma: float) -> None:
    """200 audits each, guesses from the true mechanism with the optimal statistic (its privacy loss),
    fixed guess counts; the claim (the accountant's curve of the true mechanism) may be rejected in at
    most 1 − confidence of them (+ binomial slack). At 50% confidence the test is not vacuous:
    a curve 2× too private (noise scale 2) is rejected most of the time on the same guesses."""
    rng = np.random.default_rng(7)
    fam = _family(sigma, q, steps)
    claim, too_private = fam.curve(1.0), fam.curve(2.0)
    m, k, trials, conf = 400, 50, 200, 0.5
    true_eps = compute_epsilon([GaussianEvent(noise_multiplier=sigma, sample_rate=q, count=steps)], 1e-5).epsilon
    rej = wrong = above = 0
    for _ in range(trials):
        s, inc = (_gaussian_scores(rng, m, sigma) if q == 1.0 else _subsampled_scores(rng, m, sigma, q, steps))
        r, v = _guesses(s, inc, k)
        rej += one_run_fdp_curve_rejects(m, r, v, claim, conf)
        wrong += one_run_fdp_curve_rejects(m, r, v, too_private, conf)
        b = one_run_fdp_family_bound(m, r, v, fam, 1e-5, conf)
        above += b.value > true_eps
        assert b.assumption == ACCOUNTED_FAMILY
    allowed = trials * (1 - conf) + 3 * math.sqrt(trials * conf * (1 - conf))
    assert rej <= allowed and above <= allowed, (rej, above)
    assert wrong > trials / 2, wrong  # the same guesses do refute a false claim


# ------------------------------------------------------------------------------------------------
# (c) power and (d) the gain over Steinke


def test_much_less_noise_than_claimed_is_refuted() -> None:
    rng = np.random.default_rng(1)
    for q, steps, claimed, actual in ((1.0, 1, 2.0, 0.25), (0.5, 4, 2.0, 0.3)):
        fam = _family(claimed, q, steps)
        s, inc = (_gaussian_scores(rng, 1000, actual) if q == 1.0
                  else _subsampled_scores(rng, 1000, actual, q, steps))
        res = one_run_bounds_best(s, inc, [1e-5], 0.95, ("one_run_fdp_accounted",), family=fam)
        b = res["one_run_fdp_accounted"][1e-5]
        assert b.refuted is True and b.noise_scale is not None and b.noise_scale <= 1.0
        accounted = compute_epsilon([GaussianEvent(noise_multiplier=claimed, sample_rate=q, count=steps)],
                                    1e-5).epsilon
        assert b.value > 0.9 * accounted  # ε of a family member at most as noisy as the claim (optimistic ε)


def test_accounted_test_refutes_where_steinke_stays_below_the_claim() -> None:
    """Claimed: Gaussian σ = 1 (ε = 4.38 at δ = 1e-5); run: σ = 0.3. Steinke's ε_lower stays below the
    claimed ε (one-run ceiling); the accountant's curve is rejected, with the same Bonferroni budget."""
    rng = np.random.default_rng(0)
    s, inc = _gaussian_scores(rng, 1000, 0.3)
    fam = _family(1.0)
    res = one_run_bounds_best(s, inc, [1e-5], 0.95, ("one_run", "one_run_fdp_accounted"), family=fam)
    claimed = compute_epsilon([GaussianEvent(noise_multiplier=1.0)], 1e-5).epsilon
    steinke, acc = res["one_run"][1e-5], res["one_run_fdp_accounted"][1e-5]
    assert steinke.n_tests == acc.n_tests == 2 * len(default_one_run_grid(1000))
    assert 0 < steinke.value < claimed and acc.refuted is True
    # the family bound, like the Gaussian f-DP bound, sits above Steinke's
    assert acc.value > steinke.value


def test_family_boundary_matches_the_gaussian_mu_bound() -> None:
    """For the plain Gaussian mechanism the family is the GDP family (μ = 1/c): the smallest rejected
    scale c* is the first grid scale above 1/μ_lower, and ε_lower ≤ ε of μ_lower-GDP."""
    scales = tuple(2.0 ** (k / 8) for k in range(-16, 17))
    fam = _family(1.0, scales=scales)
    for m, r, v in ((1000, 1000, 900), (1000, 200, 190), (1000, 100, 90), (1000, 1000, 990), (1000, 400, 400)):
        mu = one_run_fdp_mu_lower_bound(m, r, v)
        b = one_run_fdp_family_bound(m, r, v, fam, 1e-5)
        assert b.noise_scale is not None
        i = scales.index(b.noise_scale)
        assert scales[i] >= 1 / mu - 1e-3 and (i == 0 or scales[i - 1] <= 1 / mu * 1.01), (mu, b.noise_scale)
        assert b.refuted == (mu > 1.0 + 1e-3)


def test_privacy_profile_is_the_accountants_delta() -> None:
    from privaudit.accounting.base import compute_delta
    from privaudit.audit.accounted import privacy_profile

    ev = [GaussianEvent(noise_multiplier=0.9, sample_rate=0.1, count=20)]
    prof = privacy_profile([Segment("gaussian", 0.9, 0.1, 20)], [0.5, 1.0, 2.0])
    assert np.allclose(prof, [compute_delta(ev, e) for e in (0.5, 1.0, 2.0)], rtol=1e-9, atol=1e-15)
    assert np.all(np.diff(prof) < 0)


def test_long_heterogeneous_ledgers_get_only_the_claims_curve() -> None:
    """Bounded time: above 32 distinct segments the family is the claim alone (the test stays)."""
    many = [GaussianEvent(noise_multiplier=1.0 + k / 100, sample_rate=0.01) for k in range(40)]
    fam, _ = accounted_family(many)
    assert fam is not None and fam.scales == (1.0,)
    few, _ = accounted_family(many[:3])
    assert few is not None and len(few.scales) > 1
    b = one_run_fdp_family_bound(1000, 1000, 1000, fam, 1e-5)
    assert b.refuted is True and b.noise_scale == 1.0 and b.value > 0


def test_claim_refutable_is_the_power_of_the_accounted_test() -> None:
    """Perfect guesses on 1000 balanced canaries reject the GDP curve μ = 1 (σ = 1) but not μ = 3
    (σ = 1/3); with 16 canaries not even μ = 1; the answer depends on the design only."""
    design = np.arange(1000) % 2 == 0
    assert one_run_fdp_claim_refutable(design, _family(1.0), 0.95)
    assert not one_run_fdp_claim_refutable(design, _family(1 / 3), 0.95)
    assert not one_run_fdp_claim_refutable(np.arange(16) % 2 == 0, _family(1.0), 0.95)
    with pytest.raises(ValueError, match="^included:"):
        one_run_fdp_claim_refutable(np.zeros(0, bool), _family(1.0))


def test_scales_beyond_the_pld_range_fall_back_soundly() -> None:
    """σ = 0.3 over 100 full-batch steps at noise scale 1/16 leaves the PLD's numeric range: its curve
    says nothing (never rejected) and its ε falls back to the next scale's (ε decreases in c)."""
    fam, _ = accounted_family([GaussianEvent(noise_multiplier=0.3, sample_rate=1.0, count=100)])
    assert fam is not None
    lowest = fam.curve(fam.scales[0])
    assert lowest(np.array([0.0, 0.5])).tolist() == [0.0, 0.0]
    assert not one_run_fdp_curve_rejects(1000, 1000, 1000, lowest)
    e0 = fam.epsilon(fam.scales[0], 1e-5)
    assert e0 > 0 and e0 >= fam.epsilon(fam.scales[-1], 1e-5)
