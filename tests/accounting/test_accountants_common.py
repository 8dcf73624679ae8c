"""Properties every accountant must have, and how each treats non-(ε, δ) events."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privaudit.accounting.analytic import composed_gaussian_epsilon
from privaudit.accounting.base import (
    Segment,
    accountant_names,
    compute_delta,
    compute_epsilon,
    get_accountant,
)
from privaudit.ledger.events import (
    ClaimEvent,
    DchiEvent,
    EncryptedEvent,
    GaussianEvent,
    PlaintextEvent,
)

ALL = ["rdp", "pld", "prv"]
FAST = settings(max_examples=8, deadline=None)


def test_registry() -> None:
    assert set(ALL) <= set(accountant_names())
    with pytest.raises(ValueError, match="^accountant"):
        get_accountant("moments")


@pytest.mark.parametrize("name", ALL)
def test_event_semantics(name: str) -> None:
    g = GaussianEvent(noise_multiplier=1.0, sample_rate=0.1, count=20)
    with pytest.raises(ValueError, match="dchi"):
        compute_epsilon([g, DchiEvent(eta=1.0, dimension=8)], 1e-5, accountant=name)
    res = compute_epsilon([g, PlaintextEvent(what="activations")], 1e-5, accountant=name)
    assert res.epsilon == math.inf and not res.has_guarantee and "plaintext" in (res.reason or "")
    assert res.to_json()["guarantee"] == "none"
    assert compute_delta([g, PlaintextEvent(what="x")], 1.0, accountant=name) == 1.0
    base = compute_epsilon([g], 1e-5, accountant=name).epsilon
    extra = [g, EncryptedEvent(scheme="ckks", security_bits=128), ClaimEvent(epsilon=1.0)]
    assert compute_epsilon(extra, 1e-5, accountant=name).epsilon == pytest.approx(base)
    assert compute_epsilon([], 1e-5, accountant=name).epsilon == 0.0
    with pytest.raises(ValueError, match="^delta"):
        compute_epsilon([g], 0.0, accountant=name)
    with pytest.raises(ValueError, match="^epsilon"):
        compute_delta([g], -1.0, accountant=name)


@pytest.mark.parametrize("name", ALL)
def test_never_below_analytic_truth(name: str) -> None:
    for sigma, k in [(1.0, 1), (4.0, 30)]:
        res = compute_epsilon([GaussianEvent(noise_multiplier=sigma, count=k)], 1e-5, accountant=name)
        assert res.epsilon >= composed_gaussian_epsilon(sigma, k, 1e-5) - 1e-9


@pytest.mark.parametrize("name", ALL)
def test_replace_costs_more(name: str) -> None:
    ev = [GaussianEvent(noise_multiplier=1.2, sample_rate=0.02, count=100)]
    add = compute_epsilon(ev, 1e-5, accountant=name, neighbouring="add_remove").epsilon
    rep = compute_epsilon(ev, 1e-5, accountant=name, neighbouring="replace").epsilon
    assert rep > add


sigmas = st.floats(0.7, 3.0)
rates = st.floats(0.005, 0.3)
counts = st.integers(1, 300)


@FAST
@given(sigma=sigmas, q=rates, k=counts, extra=st.integers(20, 300))
def test_eps_grows_with_steps(sigma: float, q: float, k: int, extra: int) -> None:
    for name in ("rdp", "pld"):
        acc = get_accountant(name)
        e1 = acc._epsilon([Segment("gaussian", sigma, q, k)], 1e-5).epsilon
        e2 = acc._epsilon([Segment("gaussian", sigma, q, k + extra)], 1e-5).epsilon
        assert e2 >= e1 - 1e-3 * e1 - 1e-6


@FAST
@given(sigma=sigmas, q=st.floats(0.005, 0.15), k=counts)
def test_eps_grows_with_rate_and_falls_with_sigma(sigma: float, q: float, k: int) -> None:
    for name in ("rdp", "pld"):
        acc = get_accountant(name)
        e = acc._epsilon([Segment("gaussian", sigma, q, k)], 1e-5).epsilon
        e_q = acc._epsilon([Segment("gaussian", sigma, min(1.0, 2 * q), k)], 1e-5).epsilon
        e_s = acc._epsilon([Segment("gaussian", 1.5 * sigma, q, k)], 1e-5).epsilon
        assert e_q >= e - 1e-3 * e - 1e-6
        assert e_s <= e + 1e-3 * e + 1e-6


@FAST
@given(sigma=sigmas, q=rates, k=counts, delta=st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_rdp_is_above_pld(sigma: float, q: float, k: int, delta: float) -> None:
    seg = [Segment("gaussian", sigma, q, k)]
    rdp = get_accountant("rdp")._epsilon(seg, delta).epsilon
    pld = get_accountant("pld")._epsilon(seg, delta)
    assert rdp >= pld.epsilon_lower - 1e-9  # RDP is an upper bound on the true ε
    assert rdp >= pld.epsilon_upper - 5e-3 * pld.epsilon_upper - 1e-6


@settings(max_examples=6, deadline=None)
@given(sigma=sigmas, q=rates, parts=st.lists(st.integers(1, 80), min_size=2, max_size=5))
def test_split_ledger_has_merged_eps(sigma: float, q: float, parts: list[int]) -> None:
    """Events split across ledger lines are merged: same ε as one line with the total count."""
    split = [GaussianEvent(noise_multiplier=sigma, sample_rate=q, count=n) for n in parts]
    whole = [GaussianEvent(noise_multiplier=sigma, sample_rate=q, count=sum(parts))]
    for name in ("rdp", "pld"):
        a = compute_epsilon(split, 1e-5, accountant=name)
        b = compute_epsilon(whole, 1e-5, accountant=name)
        assert a.epsilon == pytest.approx(b.epsilon, rel=1e-9)
    # and the heterogeneous path (distinct segments, spectra multiplied) agrees too
    segs = [Segment("gaussian", sigma * (1 + 1e-13 * i), q, n) for i, n in enumerate(parts)]
    het = get_accountant("pld")._epsilon(segs, 1e-5).epsilon
    assert het == pytest.approx(compute_epsilon(whole, 1e-5, accountant="pld").epsilon, rel=1e-6)
