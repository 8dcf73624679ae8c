"""PLD accountant: REFERENCES §6, exact oracles, discretisation bounds, heterogeneous ledgers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from privaudit.accounting.analytic import composed_gaussian_epsilon
from privaudit.accounting.base import Segment, compute_epsilon
from privaudit.accounting.pld import (
    PairSpec,
    PLDAccountant,
    compose,
    discretise_optimistic,
    discretise_pessimistic,
    loss_tails,
)
from privaudit.ledger.events import GaussianEvent, LaplaceEvent

# REFERENCES.md §6: (sigma, q, steps, delta, PLD eps, PRV estimate)
TABLE = [
    (1.1, 256 / 60000, 14063, 1e-5, 2.3818, 2.3817),
    (1.5, 0.04, 2250, 1e-5, 6.7688, 6.7688),
    (0.8, 5e-3, 1000, 1e-6, 2.0041, 2.0041),
]


@pytest.mark.parametrize("sigma,q,steps,delta,ref,est", TABLE)
def test_reference_table(sigma: float, q: float, steps: int, delta: float, ref: float,
                         est: float) -> None:
    res = PLDAccountant().epsilon([GaussianEvent(noise_multiplier=sigma, sample_rate=q, count=steps)],
                                  delta)
    assert res.epsilon == res.epsilon_upper
    assert abs(res.epsilon - ref) <= 0.01
    assert res.epsilon_lower is not None
    assert res.epsilon_lower <= est <= res.epsilon_upper  # the PRV estimate lies in the bracket
    assert res.epsilon_upper - res.epsilon_lower < 0.01


@pytest.mark.parametrize("sigma,steps,delta", [
    (1.0, 1, 1e-5), (2.0, 10, 1e-5), (5.0, 100, 1e-6), (0.8, 3, 1e-3), (10.0, 1000, 1e-5),
    (0.5, 2, 1e-8), (0.05, 1000, 1e-5), (0.1, 1, 1e-10),
])
def test_contains_analytic_gaussian(sigma: float, steps: int, delta: float) -> None:
    res = PLDAccountant().epsilon([GaussianEvent(noise_multiplier=sigma, count=steps)], delta)
    truth = composed_gaussian_epsilon(sigma, steps, delta)
    assert res.epsilon_lower <= truth <= res.epsilon_upper
    assert res.epsilon_upper - truth < 1e-3 * max(truth, 1.0)


@pytest.mark.parametrize("scale,count", [(1.0, 1), (0.4, 1), (2.0, 1)])
def test_contains_exact_laplace(scale: float, count: int) -> None:
    delta = 1e-3
    truth = 1 / scale + 2 * math.log(1 - delta)  # δ(ε) = 1 − exp((ε − 1/b)/2)
    res = PLDAccountant().epsilon([LaplaceEvent(scale=scale, count=count)], delta)
    assert res.epsilon_lower <= truth <= res.epsilon_upper
    assert res.epsilon_upper - res.epsilon_lower < 5e-3


# ---- the dominating pairs and their discretisations against quadrature ----------------------
def _pair_densities(spec: PairSpec):
    base = stats.norm if spec.kind == "gaussian" else stats.laplace
    mu0, mu1 = base(0.0, spec.noise).pdf, base(1.0, spec.noise).pdf
    q = spec.q

    def mix(x: float) -> float:
        return (1 - q) * mu0(x) + q * mu1(x)

    if spec.direction in ("remove", "replace"):
        return mix, mu0
    return mu0, mix


def _exact_delta(spec: PairSpec, eps: float) -> float:
    p, q = _pair_densities(spec)
    s = spec.noise
    val, _ = integrate.quad(lambda x: max(p(x) - math.exp(eps) * q(x), 0.0), -40 * s, 40 * s + 1,
                            points=[0.0, 0.5, 1.0], limit=500, epsabs=1e-14)
    return val


SPECS = [
    PairSpec("gaussian", 0.8, 0.1, "remove"), PairSpec("gaussian", 0.8, 0.1, "add"),
    PairSpec("gaussian", 1.5, 1.0, "remove"), PairSpec("laplace", 1.0, 0.3, "remove"),
    PairSpec("laplace", 1.0, 0.3, "add"), PairSpec("laplace", 0.7, 1.0, "remove"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.noise}-{s.q}-{s.direction}")
def test_loss_tails_match_quadrature(spec: PairSpec) -> None:
    p, q = _pair_densities(spec)
    s = spec.noise
    for t in (-0.3, -0.01, 0.0, 0.05, 0.4, 1.2):
        pg, qg = loss_tails(spec, np.array([t]))

        def over(f):  # mass of {x : log(p/q)(x) > t}
            return integrate.quad(lambda x: f(x) if math.log(p(x) / q(x)) > t else 0.0,
                                  -30 * s, 30 * s + 1, points=[0.0, 0.5, 1.0], limit=800)[0]

        assert pg[0] == pytest.approx(over(p), abs=2e-7)
        assert qg[0] == pytest.approx(over(q), abs=2e-7)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.noise}-{s.q}-{s.direction}")
def test_single_release_bounds_bracket_exact(spec: PairSpec) -> None:
    pess = compose([(discretise_pessimistic(spec, 2e-3), 1)], 1e-15)
    opt = compose([(discretise_optimistic(spec, 2e-3), 1)], 1e-15)
    for eps in (0.0, 0.05, 0.3, 0.8):
        exact = _exact_delta(spec, eps)
        assert opt.delta(eps, pessimistic=False) <= exact + 1e-9
        assert exact <= pess.delta(eps, pessimistic=True) + 1e-9
        assert pess.delta(eps) - exact < 2e-3 * max(exact, 1e-3) + 1e-7


def test_pessimistic_discretisation_is_a_pair() -> None:
    d = discretise_pessimistic(PairSpec("gaussian", 1.0, 0.05, "remove"), 1e-3)
    ls = d.losses
    assert d.pmf.min() >= 0
    assert d.pmf.sum() + d.inf_mass == pytest.approx(1.0, abs=1e-12)  # P-mass kept
    assert float(np.sum(d.pmf * np.exp(-ls))) == pytest.approx(1.0, abs=1e-9)  # Q-mass kept


def test_subsampled_laplace_against_dp_accounting() -> None:
    from dp_accounting.pld import privacy_loss_distribution as pldlib

    ref = pldlib.from_laplace_mechanism(1.0, sampling_prob=0.3, value_discretization_interval=1e-4)
    ref = ref.self_compose(20).get_epsilon_for_delta(1e-5)
    res = compute_epsilon([LaplaceEvent(scale=1.0, sample_rate=0.3, count=20)], 1e-5)
    assert res.epsilon_lower <= ref + 1e-3
    assert abs(res.epsilon_upper - ref) < 5e-3


# ---- ledgers ---------------------------------------------------------------------------------
def test_heterogeneous_ledger_consistent() -> None:
    # Timing lives in benchmarks/accounting.py, not here.
    rng = np.random.default_rng(0)
    segs = [Segment("gaussian", float(s), 0.01, 10) for s in rng.uniform(0.8, 1.5, 1000)]
    res = PLDAccountant()._epsilon(segs, 1e-5)
    assert res.epsilon_lower <= res.epsilon_upper < res.epsilon_lower * 1.01
    # a finer grid (more accurate) stays inside the bracket
    fine = PLDAccountant(grid=5e-4, lower_bound=False)._epsilon(segs, 1e-5).epsilon
    assert res.epsilon_lower <= fine <= res.epsilon_upper


def test_split_ledger_equals_merged_form() -> None:
    """Composing by multiplying spectra (distinct segments) equals powering one segment."""
    whole = PLDAccountant()._epsilon([Segment("gaussian", 1.1, 0.02, 600)], 1e-5)
    parts = [Segment("gaussian", 1.1 * (1 + i * 1e-13), 0.02, n)
             for i, n in enumerate((1, 99, 200, 300))]
    split = PLDAccountant()._epsilon(parts, 1e-5)
    assert split.epsilon == pytest.approx(whole.epsilon, abs=1e-6)
    assert split.epsilon_lower == pytest.approx(whole.epsilon_lower, abs=1e-6)


def test_add_orientation_is_accounted() -> None:
    """A mechanism whose add orientation dominates must report it (not only remove)."""
    from privaudit.accounting.pld import _orientations, compose_orientation

    segs = [Segment("gaussian", 3.0, 0.6, 4)]
    o = _orientations(segs)
    e_rem = compose_orientation(o["remove"], 1e-3, True, 1e-12).epsilon(0.3)
    e_add = compose_orientation(o["add"], 1e-3, True, 1e-12).epsilon(0.3)
    res = PLDAccountant()._epsilon(segs, 0.3)
    assert res.epsilon == pytest.approx(max(e_rem, e_add), abs=5e-3)


def test_replace_neighbours_cost_more() -> None:
    ev = [GaussianEvent(noise_multiplier=1.0, sample_rate=0.05, count=200)]
    add = compute_epsilon(ev, 1e-5, neighbouring="add_remove")
    rep = compute_epsilon(ev, 1e-5, neighbouring="replace")
    assert rep.epsilon > add.epsilon
    assert rep.epsilon_lower <= rep.epsilon
    # the tight replace-one pair: dp_accounting's REPLACE_ONE value (its pessimistic PLD)
    from dp_accounting import NeighboringRelation, dp_event
    from dp_accounting.pld import pld_privacy_accountant as ppa

    ref = ppa.PLDAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE,
                            value_discretization_interval=1e-4)
    ref.compose(dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1.0)), 200)
    assert rep.epsilon == pytest.approx(ref.get_epsilon(1e-5), rel=1e-2)
    assert rep.epsilon_lower <= ref.get_epsilon(1e-5) + 1e-3
    full = [GaussianEvent(noise_multiplier=2.0, count=3)]
    assert compute_epsilon(full, 1e-5, neighbouring="replace").epsilon == pytest.approx(
        composed_gaussian_epsilon(1.0, 3, 1e-5), abs=1e-3)


def test_delta_query_is_an_upper_bound() -> None:
    segs = [Segment("gaussian", 2.0, 1.0, 10)]
    acc = PLDAccountant()
    from privaudit.accounting.analytic import gaussian_delta

    for eps in (0.5, 1.0, 2.0):
        exact = gaussian_delta(2.0 / math.sqrt(10), eps)
        got = acc._delta(segs, eps)
        assert exact <= got <= exact * 1.01 + 1e-12


def test_symmetrised_replace_pair() -> None:
    rem = PairSpec("gaussian", 0.6, 0.2, "remove")
    rep = PairSpec("gaussian", 0.6, 0.2, "replace")
    t = np.array([0.0, 0.1, 0.7, 2.0])
    pg_r, qg_r = loss_tails(rem, t)
    pg, qg = loss_tails(rep, t)
    np.testing.assert_allclose(pg, pg_r)
    np.testing.assert_allclose(qg, qg_r)
    pn, qn = loss_tails(rep, -t[1:])
    np.testing.assert_allclose(pn, 1 - qg_r[1:])  # mirrored: P_g(L > −t) = 1 − Q(L > t)
    np.testing.assert_allclose(qn, 1 - pg_r[1:])
    assert 1 - pg_r[0] - qg_r[0] >= 0  # the atom at loss 0 has non-negative mass
    d = discretise_pessimistic(rep, 1e-3)
    ls = d.losses
    assert float(np.sum(d.pmf * np.exp(-ls))) == pytest.approx(1.0, abs=1e-9)


def test_tiny_delta_is_answered_by_the_tilted_composition_or_refused() -> None:
    seg = [Segment("gaussian", 1.0, 0.01, 100)]
    rdp = compute_epsilon([GaussianEvent(noise_multiplier=1.0, sample_rate=0.01, count=100)], 1e-12,
                          accountant="rdp").epsilon
    res = PLDAccountant()._epsilon(seg, 1e-12)  # below the untilted FFT's rounding floor
    assert res.epsilon_lower <= res.epsilon < rdp
    assert res.epsilon - res.epsilon_lower < 1e-3
    try:  # far below: refused, or no finite ε — never a made-up finite value
        far = PLDAccountant()._epsilon(seg, 1e-60).epsilon
        assert far == math.inf
    except ValueError as exc:
        assert str(exc).startswith("delta")
    assert PLDAccountant()._epsilon(seg, 1e-9).epsilon < compute_epsilon(
        [GaussianEvent(noise_multiplier=1.0, sample_rate=0.01, count=100)], 1e-9, accountant="rdp"
    ).epsilon


def test_noise_beyond_numeric_range_is_a_value_error_naming_the_field() -> None:
    """σ = 0.015, 10 full-batch releases: the privacy loss overflows the PLD grid; the accountant says
    so as a ValueError (CLI: one line, exit 2), never an OverflowError or a made-up ε."""
    with pytest.raises(ValueError, match="^noise_multiplier: .*rdp"):
        compute_epsilon([GaussianEvent(noise_multiplier=0.015, sampling="full", count=10)], 1e-5, "pld")
    assert math.isfinite(compute_epsilon([GaussianEvent(noise_multiplier=0.015, sampling="full", count=10)],
                                         1e-5, "rdp").epsilon)
