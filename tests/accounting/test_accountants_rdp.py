"""RDP accountant: Opacus agreement, REFERENCES §6, Laplace closed form, replace neighbours, speed."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import integrate, stats

from privaudit.accounting.base import Segment, compute_epsilon, get_accountant
from privaudit.accounting.rdp import (
    DEFAULT_ORDERS,
    RDPAccountant,
    rdp_laplace,
    rdp_subsampled_gaussian,
    rdp_to_delta,
    rdp_to_epsilon,
    segments_rdp,
)
from privaudit.ledger.events import GaussianEvent, LaplaceEvent

# REFERENCES.md §6: (sigma, q, steps, delta, RDP eps)
TABLE = [
    (1.1, 256 / 60000, 14063, 1e-5, 2.5967),
    (1.5, 0.04, 2250, 1e-5, 7.3293),
    (0.8, 5e-3, 1000, 1e-6, 2.6265),
]


def _opacus_eps(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant as OpacusRDP

    acc = OpacusRDP()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta))


@pytest.mark.parametrize("sigma,q,steps,delta,ref", TABLE)
def test_reference_table(sigma: float, q: float, steps: int, delta: float, ref: float) -> None:
    res = RDPAccountant().epsilon([GaussianEvent(noise_multiplier=sigma, sample_rate=q, count=steps)],
                                  delta)
    assert res.epsilon == pytest.approx(ref, rel=1e-3)
    assert res.epsilon_upper == res.epsilon and res.epsilon_lower is None
    assert res.accountant == "rdp"


def test_opacus_unit_test_value() -> None:
    res = compute_epsilon([GaussianEvent(noise_multiplier=1.5, sample_rate=0.04, count=2250)], 1e-5,
                          accountant="rdp")
    assert res.epsilon == pytest.approx(7.32911117143, rel=1e-9)


@pytest.mark.parametrize("sigma,q,steps,delta", [
    (1.1, 256 / 60000, 14063, 1e-5), (0.8, 5e-3, 1000, 1e-6), (0.6, 0.2, 50, 1e-5),
    (4.0, 1e-3, 100000, 1e-7), (1.0, 1.0, 10, 1e-5), (2.0, 0.5, 7, 1e-3),
])
def test_matches_opacus_homogeneous(sigma: float, q: float, steps: int, delta: float) -> None:
    ours = RDPAccountant()._epsilon([Segment("gaussian", sigma, q, steps)], delta).epsilon
    assert ours == pytest.approx(_opacus_eps([(sigma, q, steps)], delta), rel=1e-6)


def test_matches_opacus_per_order_and_heterogeneous() -> None:
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = np.array(DEFAULT_ORDERS)
    for q, s in [(0.01, 0.8), (0.3, 1.7), (1e-4, 5.0)]:
        ref = compute_rdp(q=q, noise_multiplier=s, steps=1, orders=list(orders))
        np.testing.assert_allclose(rdp_subsampled_gaussian([q], [s], orders)[0], ref, rtol=1e-7,
                                   atol=1e-13)  # the series cancels down to ~1e-15
    rng = np.random.default_rng(1)
    hist = [(float(s), 0.01, 10) for s in rng.uniform(0.8, 1.5, 40)]
    segs = [Segment("gaussian", s, q, n) for s, q, n in hist]
    assert RDPAccountant()._epsilon(segs, 1e-5).epsilon == pytest.approx(_opacus_eps(hist, 1e-5),
                                                                         rel=1e-6)


def test_heterogeneous_ledger() -> None:
    # Timing lives in benchmarks/accounting.py, not here.
    rng = np.random.default_rng(0)
    segs = [Segment("gaussian", float(s), 0.01, 10) for s in rng.uniform(0.8, 1.5, 1000)]
    res = RDPAccountant()._epsilon(segs, 1e-5)
    assert 5.0 < res.epsilon < 7.0


def test_split_ledger_equals_merged() -> None:
    whole = RDPAccountant()._epsilon([Segment("gaussian", 1.2, 0.02, 1000)], 1e-5).epsilon
    parts = [Segment("gaussian", 1.2, 0.02, n) for n in (1, 99, 400, 500)]
    assert RDPAccountant()._epsilon(parts, 1e-5).epsilon == pytest.approx(whole, rel=1e-12)


def test_laplace_closed_form_matches_renyi_integral() -> None:
    b, alpha = 0.8, 3.5
    p, q = stats.laplace(1.0, b).pdf, stats.laplace(0.0, b).pdf
    val, _ = integrate.quad(lambda x: p(x) ** alpha * q(x) ** (1 - alpha), -40, 41, points=[0, 1],
                            limit=200)
    assert rdp_laplace([b], [alpha])[0, 0] == pytest.approx(math.log(val) / (alpha - 1), rel=1e-8)
    ev = [LaplaceEvent(scale=2.0, count=5)]
    res = compute_epsilon(ev, 1e-5, accountant="rdp")
    # an upper bound: never below the PLD lower bound of the same composition
    assert res.epsilon >= compute_epsilon(ev, 1e-5, accountant="pld").epsilon_lower


def test_subsampled_laplace_is_unsupported() -> None:
    with pytest.raises(ValueError, match="laplace"):
        compute_epsilon([LaplaceEvent(scale=1.0, sample_rate=0.1, count=5)], 1e-5, accountant="rdp")


def test_replace_neighbours() -> None:
    ev = [GaussianEvent(noise_multiplier=1.0, sample_rate=0.05, count=200)]
    add = compute_epsilon(ev, 1e-5, accountant="rdp", neighbouring="add_remove").epsilon
    rep = compute_epsilon(ev, 1e-5, accountant="rdp", neighbouring="replace").epsilon
    assert rep > add
    # q < 1: the replace-one pair's Rényi divergence, below the earlier bound (twice the add/remove
    # RDP at the doubled sensitivity) and above the tight PLD value of the same pair
    orders = np.array(DEFAULT_ORDERS)
    twice = 2 * segments_rdp([Segment("gaussian", 0.5, 0.05, 200)], orders)
    assert rep < rdp_to_epsilon(orders, twice, 1e-5)[0]
    pld = compute_epsilon(ev, 1e-5, accountant="pld", neighbouring="replace").epsilon
    assert pld <= rep < 1.3 * pld
    # q = 1: the shift pair is symmetric, exactly the add/remove value at σ/2
    full = [GaussianEvent(noise_multiplier=2.0, count=3)]
    assert compute_epsilon(full, 1e-5, accountant="rdp", neighbouring="replace").epsilon == \
        pytest.approx(compute_epsilon([GaussianEvent(noise_multiplier=1.0, count=3)], 1e-5,
                                      accountant="rdp").epsilon, rel=1e-12)


def test_delta_inverts_epsilon() -> None:
    segs = [Segment("gaussian", 1.1, 0.01, 500)]
    acc = get_accountant("rdp")
    eps = acc._epsilon(segs, 1e-6).epsilon
    assert acc._delta(segs, eps) == pytest.approx(1e-6, rel=1e-6)
    assert rdp_to_delta(DEFAULT_ORDERS, np.zeros(len(DEFAULT_ORDERS)), 1.0) < 1.0
