"""Rényi-DP accountant (Mironov 2017; Mironov, Talwar & Zhang 2019), vectorised over segments.

* Poisson-subsampled Gaussian: the RDP of ``((1-q)N(0,σ²) + qN(1,σ²), N(0,σ²))`` at integer and
  fractional orders, computed exactly as Opacus / TF-Privacy do (same series, same stopping rule),
  but for all segments and orders at once. Under add/remove neighbours this order of the pair
  dominates the other one (Mironov et al. 2019).
* Gaussian without subsampling: α / (2σ²).
* Laplace without subsampling (scale b = scale / L1 sensitivity): the closed form of Mironov 2017,
  Prop. 6. Subsampled Laplace is not supported (a ``ValueError``; use the PLD accountant).
* Replace neighbours with q < 1: the segment's noise is already relative to the doubled
  sensitivity. The tight replace-one pair P = (1-q)N(0,σ²) + qN(½,σ²), Q = (1-q)N(0,σ²) + qN(−½,σ²)
  (see ``pld.py``; symmetric, so one order suffices) has its Rényi divergence computed by the
  trapezoid rule on a fine grid of x (spectrally accurate for this analytic, Gaussian-tailed
  integrand; padded by a relative 1e-9), and never charged above the earlier valid bound, twice
  the add/remove RDP at the doubled sensitivity (the symmetrised remove pair's D_α(C‖D) + D_α(D‖C)).

RDP composes by addition; (ε, δ) comes from the conversion of Balle et al. 2020 (Thm. 21), exactly
as Opacus's ``get_privacy_spent``. RDP only gives an upper bound: ``epsilon_lower`` is None.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import special

from privaudit.accounting.base import (
    Accountant,
    EpsilonResult,
    Segment,
    register_accountant,
)

__all__ = [
    "DEFAULT_ORDERS",
    "RDPAccountant",
    "rdp_subsampled_gaussian",
    "rdp_laplace",
    "rdp_replace_one",
    "segments_rdp",
    "rdp_to_epsilon",
    "rdp_to_delta",
]

#: Opacus's default orders (``RDPAccountant.DEFAULT_ALPHAS``).
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

_MAX_SERIES_TERMS = 100_000


def _log_erfc(x: np.ndarray) -> np.ndarray:
    return math.log(2.0) + special.log_ndtr(-x * 2**0.5)


def _log_a_int(q: np.ndarray, sigma: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """log A_α for integer orders; q, sigma of shape (S,), orders (O,) -> (S, O).

    A_α = Σ_{i≤α} C(α,i) (1−q)^{α−i} q^i exp((i²−i)/(2σ²)), all (order, i) pairs flattened.
    """
    ints = orders.astype(np.int64)
    counts = ints + 1
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    i = np.concatenate([np.arange(a + 1) for a in ints]).astype(float)  # (M,)
    alpha = np.repeat(orders, counts)
    log_binom = np.log(special.binom(alpha, i))
    lq = np.log(q)[:, None]
    l1q = np.log1p(-q)[:, None]
    inv = (1.0 / (2.0 * sigma**2))[:, None]
    terms = log_binom[None, :] + i[None, :] * lq + (alpha - i)[None, :] * l1q + (i * i - i)[None, :] * inv
    m = np.maximum.reduceat(terms, starts, axis=1)  # (S, O); finite: the i = 0 term always is
    sums = np.add.reduceat(np.exp(terms - np.repeat(m, counts, axis=1)), starts, axis=1)
    return m + np.log(sums)


def _log_a_frac(q: np.ndarray, sigma: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """log A_α for fractional orders, the Opacus/TF-Privacy series with its stopping rule.

    Every (segment, order) entry runs the same do-until loop as Opacus (the two new terms are
    added, then the loop stops once both are below e^-30); only still-active entries are computed.
    The signed sums are kept as a scaled linear accumulator per entry (as exact as Opacus's
    sequential log-add / log-sub).
    """
    S, O = q.shape[0], orders.shape[0]
    out = np.empty(S * O)
    oid = np.tile(np.arange(O), S)
    alpha = orders[oid]
    sig = np.repeat(sigma, O)
    qf = np.repeat(q, O)
    z0 = sig**2 * np.log(1.0 / qf - 1.0) + 0.5
    lq, l1q = np.log(qf), np.log1p(-qf)
    inv2s2 = 1.0 / (2.0 * sig**2)
    inv_rt2s = 1.0 / (math.sqrt(2.0) * sig)
    pos = np.arange(S * O)
    m0 = np.full(S * O, -np.inf)
    m1 = np.full(S * O, -np.inf)
    c0 = np.zeros(S * O)
    c1 = np.zeros(S * O)
    log_half = math.log(0.5)
    alive = np.ones(S * O, dtype=bool)
    alive_all = True

    def accumulate(m: np.ndarray, c: np.ndarray, t: np.ndarray, sign: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        # c·e^m is the running sum; rescale only where a new term exceeds the scale
        up = t > m
        if up.any():
            with np.errstate(invalid="ignore"):
                c[up] = np.where(np.isfinite(m[up]), c[up] * np.exp(m[up] - t[up]), 0.0)
            m[up] = t[up]
        with np.errstate(invalid="ignore"):
            c += sign * np.where(np.isfinite(t), np.exp(t - m), 0.0)
        return m, c

    for i in range(_MAX_SERIES_TERMS):
        coef_tab = special.binom(orders, i)
        coef = coef_tab[oid]
        log_coef = np.log(np.abs(coef))
        j = alpha - i
        log_s0 = (log_coef + i * lq + j * l1q + (i * i - i) * inv2s2
                  + log_half + _log_erfc((i - z0) * inv_rt2s))
        log_s1 = (log_coef + j * lq + i * l1q + (j * j - j) * inv2s2
                  + log_half + _log_erfc((z0 - j) * inv_rt2s))
        sign = np.where(coef > 0, 1.0, -1.0)
        if not alive_all:  # finished entries add nothing more (as Opacus's loop has stopped)
            log_s0 = np.where(alive, log_s0, -np.inf)
            log_s1 = np.where(alive, log_s1, -np.inf)
        m0, c0 = accumulate(m0, c0, log_s0, sign)
        m1, c1 = accumulate(m1, c1, log_s1, sign)
        done = alive & (np.maximum(log_s0, log_s1) < -30)
        if done.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                l0 = np.where(c0[done] > 0, m0[done] + np.log(np.abs(c0[done])), -np.inf)
                l1 = np.where(c1[done] > 0, m1[done] + np.log(np.abs(c1[done])), -np.inf)
            out[pos[done]] = np.logaddexp(l0, l1)
            alive &= ~done
            alive_all = False
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            if n_alive < 0.7 * alive.size:  # compact now and then, not at every iteration
                keep = alive
                pos, oid, alpha, lq, l1q, z0 = (pos[keep], oid[keep], alpha[keep], lq[keep],
                                                l1q[keep], z0[keep])
                inv2s2, inv_rt2s = inv2s2[keep], inv_rt2s[keep]
                m0, m1, c0, c1 = m0[keep], m1[keep], c0[keep], c1[keep]
                alive = np.ones(n_alive, dtype=bool)
                alive_all = True
    else:  # pragma: no cover - the series converges for 0 < q < 1, sigma > 0
        raise ValueError("noise_multiplier: RDP series did not converge")
    return out.reshape(S, O)


def rdp_subsampled_gaussian(q: Sequence[float] | np.ndarray, sigma: Sequence[float] | np.ndarray,
                            orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS) -> np.ndarray:
    """RDP ε(α) of ONE release of the Poisson-subsampled Gaussian, per segment and order.

    ``q``, ``sigma``: arrays of shape (S,) (sample rate, noise std / L2 sensitivity).
    Returns an array of shape (S, O). Orders must be > 1.
    """
    q = np.atleast_1d(np.asarray(q, dtype=float))
    sigma = np.atleast_1d(np.asarray(sigma, dtype=float))
    orders = np.atleast_1d(np.asarray(orders, dtype=float))
    if np.any(orders <= 1):
        raise ValueError("orders: RDP orders must be > 1")
    out = np.empty((q.shape[0], orders.shape[0]))
    full = q >= 1.0
    if full.any():
        out[full] = orders[None, :] / (2.0 * sigma[full, None] ** 2)
    sub = ~full
    if sub.any():
        is_int = orders == np.floor(orders)
        if is_int.any():
            out[np.ix_(sub, is_int)] = (_log_a_int(q[sub], sigma[sub], orders[is_int])
                                        / (orders[is_int] - 1.0)[None, :])
        if (~is_int).any():
            out[np.ix_(sub, ~is_int)] = (_log_a_frac(q[sub], sigma[sub], orders[~is_int])
                                         / (orders[~is_int] - 1.0)[None, :])
    return out


def rdp_replace_one(q: float, sigma: float,
                    orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS) -> np.ndarray:
    """RDP ε(α) (shape (O,)) of ONE release of the replace-one Poisson-subsampled Gaussian pair.

    ``sigma``: noise std / replace sensitivity (2C); components at ±½. D_α(P‖Q) =
    log ∫ p^α q^{1−α} dx / (α − 1), by the trapezoid rule with spacing σ/16 over
    [−½ − 40σ, ½ + (α − 1)/2 + 40σ] (the integrand is ≈ a Gaussian of std σ centred below
    ½ + (α − 1)/2; outside this range its mass is < e^{−700}), in log space.
    """
    a = np.atleast_1d(np.asarray(orders, dtype=float))
    s = float(sigma)
    h = s / 16.0
    x = np.arange(-0.5 - 40 * s, 0.5 + (float(a.max()) - 1) / 2 + 40 * s + h, h)
    l1q, lq = math.log1p(-q), math.log(q)
    base = -x * x / (2 * s * s)  # log φ up to a constant common to p and q (it cancels)
    lp = np.logaddexp(l1q + base, lq - (x - 0.5) ** 2 / (2 * s * s))
    lm = np.logaddexp(l1q + base, lq - (x + 0.5) ** 2 / (2 * s * s))
    log_norm = math.log(h) - 0.5 * math.log(2 * math.pi * s * s)
    out = np.empty(a.size)
    for i, al in enumerate(a):
        v = al * lp + (1 - al) * lm
        m = float(v.max())
        out[i] = (m + math.log(float(np.exp(v - m).sum())) + log_norm) / (al - 1)
    return np.maximum(out, 0.0) * (1 + 1e-9) + 1e-15


def rdp_laplace(scale: Sequence[float] | np.ndarray,
                orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of ONE Laplace release (scale / L1 sensitivity = ``scale``), Mironov 2017 Prop. 6."""
    b = np.atleast_1d(np.asarray(scale, dtype=float))[:, None]
    a = np.atleast_1d(np.asarray(orders, dtype=float))[None, :]
    val = np.logaddexp(np.log(a / (2 * a - 1)) + (a - 1) / b, np.log((a - 1) / (2 * a - 1)) - a / b)
    return val / (a - 1)


def segments_rdp(segments: Sequence[Segment], orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS
                 ) -> np.ndarray:
    """Total RDP (shape (O,)) of the composition of all segments."""
    orders = np.asarray(orders, dtype=float)
    total = np.zeros(orders.shape[0])
    gauss = [s for s in segments if s.kind == "gaussian"]
    lap = [s for s in segments if s.kind == "laplace"]
    if gauss:
        q = np.array([s.sample_rate for s in gauss])
        sig = np.array([s.noise for s in gauss])
        cnt = np.array([float(s.count) for s in gauss])
        per = rdp_subsampled_gaussian(q, sig, orders)
        for i, s in enumerate(gauss):  # replace neighbours with subsampling (module docstring)
            if _relation(s) == "replace" and s.sample_rate < 1.0:
                per[i] = np.minimum(2.0 * per[i], rdp_replace_one(s.sample_rate, s.noise, orders))
        total += (cnt[:, None] * per).sum(axis=0)
    if lap:
        for s in lap:
            if s.sample_rate < 1.0:
                raise ValueError(f"event 'laplace' (sample_rate={s.sample_rate}): subsampled Laplace "
                                 "is not supported by the rdp accountant; use pld")
        b = np.array([s.noise for s in lap])
        cnt = np.array([float(s.count) for s in lap])
        total += (cnt[:, None] * rdp_laplace(b, orders)).sum(axis=0)
    return total


def _relation(seg: Segment) -> str:
    return str(getattr(seg, "neighbouring", "add_remove"))


def rdp_to_epsilon(orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray,
                   delta: float) -> tuple[float, float]:
    """(ε, optimal order) from total RDP: Balle et al. 2020, as Opacus ``get_privacy_spent``."""
    a = np.atleast_1d(np.asarray(orders, dtype=float))
    r = np.atleast_1d(np.asarray(rdp, dtype=float))
    with np.errstate(invalid="ignore"):
        eps = r - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    if np.isnan(eps).all():
        return math.inf, math.nan
    i = int(np.nanargmin(eps))
    return max(float(eps[i]), 0.0), float(a[i])


def rdp_to_delta(orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray,
                 epsilon: float) -> float:
    """δ(ε) from total RDP: the same conversion solved for δ, minimised over orders."""
    a = np.atleast_1d(np.asarray(orders, dtype=float))
    r = np.atleast_1d(np.asarray(rdp, dtype=float))
    with np.errstate(invalid="ignore", over="ignore"):
        log_delta = (a - 1) * (r - epsilon + np.log((a - 1) / a)) - np.log(a)
    if np.isnan(log_delta).all():
        return 1.0
    return float(min(1.0, math.exp(min(0.0, float(np.nanmin(log_delta))))))


class RDPDomainAccountant(Accountant):
    """An accountant that needs the segments' RDP: Gaussian (subsampled or not) and Laplace without
    subsampling — subsampled Laplace has no RDP bound here (the pld accountant handles it)."""

    def supports(self, segment: Segment) -> bool:
        if segment.kind == "gaussian":
            return True
        return segment.kind == "laplace" and segment.sample_rate >= 1.0

    def check(self, segments: Sequence[Segment]) -> None:
        for s in segments:
            if s.kind == "laplace" and s.sample_rate < 1.0:
                raise ValueError(f"event 'laplace' (sample_rate={s.sample_rate}): subsampled Laplace "
                                 f"is not supported by the {self.name} accountant; use pld")
        super().check(segments)


@register_accountant("rdp")
class RDPAccountant(RDPDomainAccountant):
    """RDP accountant: an upper bound on ε (``epsilon_upper`` = ``epsilon``, no lower bound)."""

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        self.orders = np.asarray(DEFAULT_ORDERS if orders is None else orders, dtype=float)
        if self.orders.ndim != 1 or self.orders.size == 0 or np.any(self.orders <= 1):
            raise ValueError("orders: must be a non-empty list of numbers > 1")

    def _epsilon(self, segments: Sequence[Segment], delta: float) -> EpsilonResult:
        rdp = segments_rdp(segments, self.orders)
        eps, _ = rdp_to_epsilon(self.orders, rdp, delta)
        return EpsilonResult(eps, None, eps, self.name, delta, None)

    def _delta(self, segments: Sequence[Segment], epsilon: float) -> float:
        return rdp_to_delta(self.orders, segments_rdp(segments, self.orders), epsilon)
