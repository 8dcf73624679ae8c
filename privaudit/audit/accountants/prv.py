"""PRV accountant: Gopi, Lee & Wutschitz 2021, "Numerical composition of differential privacy".

The same algorithm as ``prv_accountant`` / Opacus ``PRVAccountant`` — truncate each privacy random
variable to the safe domain [−L, L] of their Remark 5.6 (via RDP), discretise it on cells of width
h = ε_err / √(k/2 · log(12/δ_err)) centred on the mesh, shift the mesh so that the discrete mean
equals the continuous one, compose by FFT, and read off

    ε_est = ε̂(δ),  ε_lower = ε̂(δ + δ_err) − ε_err,  ε_upper = ε̂(δ − δ_err) + ε_err

(Theorem 5.5) — implemented on this package's loss-tail functions and FFT composition (see
``pld.py``), so that a ledger with many distinct segments is one FFT per segment. Additionally:

* both orientations of the Poisson-subsampled pairs are accounted (the peers use only the remove
  one); the add orientation is settled by a cheap PLD upper bound when that is already below the
  remove orientation's estimate, and computed with the PRV method otherwise;
* Chernoff bounds on the composed loss outside the domain must stay below δ_err/4, else the domain
  is widened (the peers rely on the RDP-based domain alone);
* replace neighbours with q < 1 use the symmetrised pair (see ``pld.py``).

``epsilon`` is the upper bound (as Opacus's ``get_epsilon``); defaults ε_err = 0.01,
δ_err = δ/1000 are Opacus's.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import fft as sfft

from privaudit.audit.accountants.base import (
    EpsilonResult,
    Segment,
    register_accountant,
)
from privaudit.audit.accountants.pld import (
    Composed,
    Discrete,
    PairSpec,
    _GridTooFine,
    _orientations,
    _merge,
    compose,
    compose_orientation,
    default_grid,
    loss_range,
    loss_tails,
    tail_quantile,
)
from privaudit.audit.accountants.rdp import DEFAULT_ORDERS, RDPDomainAccountant, rdp_to_epsilon, segments_rdp

__all__ = ["PRVAccountant", "safe_domain_size", "discretise_cell_centred"]

_MAX_POINTS = 1 << 24
#: Chernoff orders checking that the composed variable stays inside the domain.
_CHERNOFF = 2.0 ** np.arange(-1, 6)


def safe_domain_size(segments: Sequence[Segment], eps_error: float, delta_error: float) -> float:
    """Half-width L of the PRV domain (Gopi et al. Remark 5.6, as Opacus computes it)."""
    orders = np.asarray(DEFAULT_ORDERS)
    total = sum(int(s.count) for s in segments)
    L, _ = rdp_to_epsilon(orders, segments_rdp(segments, orders), delta_error / 4)
    for s in segments:
        one = Segment(s.kind, s.noise, s.sample_rate, 1, getattr(s, "neighbouring", "add_remove"))
        e1, _ = rdp_to_epsilon(orders, segments_rdp([one], orders), delta_error / (8 * total))
        L = max(L, e1)
    return max(L, eps_error) + 3.0


def discretise_cell_centred(spec: PairSpec, h: float, j_min: int, j_max: int,
                            z: float = 12.0) -> Discrete:
    """The PRV truncated to [j_min·h, j_max·h], cell-centred on the mesh, mean-shifted (Gopi).

    Cells are evaluated over the loss range of :func:`loss_range` (``z`` noise standard
    deviations); the P-mass beyond it (≤ Φ̄(z)) is treated as outside the domain.
    """
    t_min, t_max = j_min * h, j_max * h
    lo, hi = loss_range(spec, z)
    a = max(j_min, math.floor(lo / h) - 1)
    b = min(j_max, math.ceil(hi / h) + 1)
    if b < a:  # the whole variable lies outside the domain: its remaining mass is tiny
        a = b = min(max(math.floor(lo / h), j_min), j_max)
    j = np.arange(a, b + 1)
    edges = np.clip((np.arange(a, b + 2) - 0.5) * h, t_min, t_max)
    g_all, _ = loss_tails(spec, np.concatenate([edges, [t_min, t_max]]))
    g, g_lo, g_hi = g_all[:-2], g_all[-2], g_all[-1]
    remaining = g_lo - g_hi
    if remaining <= 0:
        raise ValueError("noise_multiplier: the privacy loss lies outside the PRV domain")
    f = np.clip(g[:-1] - g[1:], 0.0, None) / remaining
    # mean of the truncated continuous variable: t_min + ∫ P(t < L ≤ t_max) dt over the domain,
    # the integral by the trapezoid rule on the cell edges (which cover the support)
    gg = (g - g_hi) / remaining
    mean_c = float(edges[0] + np.sum(0.5 * (gg[1:] + gg[:-1]) * np.diff(edges)))
    mean_d = float(np.sum(j * h * f))
    shift = mean_c - mean_d
    if abs(shift) >= h / 2:
        raise ValueError("noise_multiplier: discrete PRV mean differs from the continuous one")
    return Discrete(int(a), f, 0.0, h, shift)


def _estimate_epsilon(c: Composed, delta: float) -> float:
    """ε̂(δ) of a composed discrete PRV (Gopi's ``find_epsilon``): no error terms."""
    if delta <= 0:
        return math.inf
    saved = (c.above, c.below, c.noise)
    c.above, c.below, c.noise = 0.0, 0.0, 0.0
    c._cache.clear()
    try:
        # extra = inf_mass only; the raw (unclipped) pmf as in the reference implementation
        return c.epsilon(delta, pessimistic=False)
    finally:
        c.above, c.below, c.noise = saved
        c._cache.clear()


@register_accountant("prv")
class PRVAccountant(RDPDomainAccountant):
    """PRV accountant (Gopi et al. 2021). ``eps_error``: ε_err; ``delta_error``: δ_err (default δ/1000).
    Its safe domain is sized from RDP, hence :class:`RDPDomainAccountant`'s support."""

    def __init__(self, eps_error: float = 0.01, delta_error: float | None = None) -> None:
        if not (math.isfinite(eps_error) and eps_error > 0):
            raise ValueError(f"eps_error: must be a finite number > 0, got {eps_error!r}")
        if delta_error is not None and not (0 < delta_error < 1):
            raise ValueError(f"delta_error: must be in (0, 1), got {delta_error!r}")
        self.eps_error = eps_error
        self.delta_error = delta_error

    def _compose(self, items: list[tuple[PairSpec, int]], segments: Sequence[Segment],
                 delta_error: float) -> Composed:
        k = sum(c for _, c in items)
        if not delta_error > 1e-300:  # a subnormal δ: δ_err underflows to 0
            raise ValueError(f"delta: too small for the PRV accountant (δ_err = {delta_error:g})")
        h = self.eps_error / math.sqrt(k / 2 * math.log(12 / delta_error))
        L = safe_domain_size(segments, self.eps_error, delta_error)
        # truncation of each variable: at most 1e-3·δ_err/k of mass per release beyond it
        z = tail_quantile(1e4 * delta_error, k)
        while True:
            j_min, j_max = math.floor(-L / h), math.ceil(L / h)
            n = j_max - j_min + 1  # (checked before next_fast_len, which overflows on huge meshes)
            n = n if n > _MAX_POINTS else sfft.next_fast_len(n, real=True)  # (a wider domain is only safer)
            if n > _MAX_POINTS:
                raise ValueError(
                    f"eps_error: {self.eps_error} needs a PRV mesh of {n} points for {k} releases; "
                    "use a larger eps_error or the pld accountant")
            try:
                c = compose([(discretise_cell_centred(p, h, j_min, j_min + n - 1, z), cnt)
                             for p, cnt in _merge(items)], window=(j_min, n), lambdas=_CHERNOFF)
            except _GridTooFine as exc:  # huge ε: the composition does not fit the mesh
                raise ValueError(f"eps_error: {self.eps_error} is too fine a PRV mesh for {k} releases "
                                 f"({exc}); use a larger eps_error or the pld accountant") from None
            if c.above + c.below <= delta_error / 4:
                return c
            L *= 1.5

    def _bounds(self, c: Composed, delta: float, delta_error: float) -> tuple[float, float, float]:
        est = _estimate_epsilon(c, delta)
        up = _estimate_epsilon(c, delta - delta_error) + self.eps_error
        lo = max(_estimate_epsilon(c, delta + delta_error) - self.eps_error, 0.0)
        return lo, est, up

    def _epsilon(self, segments: Sequence[Segment], delta: float) -> EpsilonResult:
        de = self.delta_error if self.delta_error is not None else delta / 1000
        if de >= delta:
            raise ValueError(f"delta_error: must be smaller than delta ({delta}), got {de}")
        orients = _orientations(segments)
        comp = self._compose(orients["remove"], segments, de)
        comp.check_resolution(delta)
        lo, est, up = self._bounds(comp, delta, de)
        if "add" in orients:
            k = sum(int(s.count) for s in segments)
            grid = 4 * default_grid(k, True)
            pld_add = compose_orientation(orients["add"], grid, True, 1e-5 * delta,
                                          tail_quantile(delta, k)).epsilon(delta, True)
            if pld_add <= est:
                up = max(up, pld_add)
            else:
                lo_a, est_a, up_a = self._bounds(self._compose(orients["add"], segments, de), delta, de)
                lo, est, up = max(lo, lo_a), max(est, est_a), max(up, up_a)
        lo = min(lo, up)
        reason = None if math.isfinite(up) else "privacy loss at infinity exceeds delta"
        return EpsilonResult(up, lo, up, self.name, delta, reason)

    def epsilon_estimate(self, segments: Sequence[Segment], delta: float) -> float:
        """The PRV point estimate ε̂(δ) (neither bound), remove orientation and add if larger."""
        de = self.delta_error if self.delta_error is not None else delta / 1000
        orients = _orientations(segments)
        return max(_estimate_epsilon(self._compose(items, segments, de), delta)
                   for items in orients.values())

    def _delta(self, segments: Sequence[Segment], epsilon: float) -> float:
        """δ(ε) upper bound: δ̂(ε − ε_err) + δ_err with δ_err = 1e-10 (Gopi et al. Thm. 5.5)."""
        orients = _orientations(segments)
        out = 0.0
        for items in orients.values():
            de = 1e-10
            c = self._compose(items, segments, de)
            d_hat = c.delta(max(epsilon - self.eps_error, 0.0), pessimistic=False) - c.extra(False) \
                + c.inf_mass
            out = max(out, d_hat + de)
        return float(min(out, 1.0))
