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
* the discrete mean is matched to an accurately integrated continuous mean (the trapezoid rule on
  the cells is off by up to h/2 per release, which k releases turn into an ε error of up to k·h/2),
  and what uncertainty remains of it, k·η, widens both bounds:
  ε_upper = ε̂(δ − δ_err − s) + ε_err + k·η, ε_lower = ε̂(δ + δ_err + s) − ε_err − k·η, with s the
  FFT rounding allowance and the P-mass dropped beyond the single-release loss ranges;
* replace neighbours with q < 1 use the tight replace-one pair (see ``pld.py``).

``epsilon`` is the upper bound (as Opacus's ``get_epsilon``); defaults ε_err = 0.01,
δ_err = δ/1000 are Opacus's.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy import fft as sfft

from privaudit.accounting.base import (
    EpsilonResult,
    Segment,
    register_accountant,
)
from privaudit.accounting.pld import (
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
from privaudit.accounting.rdp import DEFAULT_ORDERS, RDPDomainAccountant, rdp_to_epsilon, segments_rdp

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


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)
#: Panels of the composite Gauss–Legendre rule for the truncated mean (and twice as many for
#: its error estimate).
_MEAN_PANELS = 96
#: Standard deviations of the noise beyond which the mean integral is cut (mass < 1e-49).
_MEAN_Z = 15.0


def _gauss_legendre(f: Callable[[np.ndarray], np.ndarray], cuts: np.ndarray
                    ) -> tuple[float, float]:
    """∫ f over [cuts[0], cuts[-1]] on the panels ``cuts`` (and ∫|f|, for rounding)."""
    mid = 0.5 * (cuts[1:] + cuts[:-1])
    half = 0.5 * (cuts[1:] - cuts[:-1])
    x = mid[:, None] + half[:, None] * _GL_NODES[None, :]
    v = f(x) * (half[:, None] * _GL_WEIGHTS[None, :])
    return float(v.sum()), float(np.abs(v).sum())


def _loss_and_density(spec: PairSpec) -> tuple[
        Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray],
        Callable[[float], float], bool, list[float]]:
    """(L(x), P-density p(x), x(t) with L > t ⟺ x > x(t) (or x < x(t) if decreasing), increasing,
    breakpoints) of the pair's output variable x."""
    from privaudit.accounting.pld import _u, replace_one_loss, replace_one_x

    q, s = spec.q, spec.noise
    if spec.kind == "laplace":  # PRV handles Laplace without subsampling only: the shift pair
        b = s

        def lap_loss(x: np.ndarray) -> np.ndarray:
            return (np.abs(x) - np.abs(x - 1.0)) / b

        def lap_p(x: np.ndarray) -> np.ndarray:
            return np.exp(-np.abs(x - 1.0) / b) / (2 * b)

        def lap_x(t: float) -> float:  # L is non-decreasing with flat ends at ±1/b
            if t >= 1 / b:
                return math.inf
            if t < -1 / b:
                return -math.inf
            return (1 + b * t) / 2

        return lap_loss, lap_p, lap_x, True, [0.0, 1.0]

    def phi(x: np.ndarray, c: float) -> np.ndarray:
        return np.exp(-0.5 * ((x - c) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    if spec.direction == "replace_one":
        return (lambda x: replace_one_loss(x, q, s),
                lambda x: (1 - q) * phi(x, 0.0) + q * phi(x, 0.5),
                lambda t: float(replace_one_x(np.array([t]), q, s)[0]), True, [-0.5, 0.0, 0.5])

    def remove_loss(x: np.ndarray) -> np.ndarray:
        v = (2 * x - 1) / (2 * s * s)
        if q >= 1.0:
            return v
        with np.errstate(over="ignore", invalid="ignore"):
            small = np.log1p(q * np.expm1(np.minimum(v, 50.0)))
        return np.where(v < 50.0, small, np.logaddexp(math.log1p(-q), math.log(q) + v))

    def x_of(t: float) -> float:
        with np.errstate(invalid="ignore", divide="ignore"):
            u = float(_u(np.array([t]), q)[0])
        return -math.inf if math.isnan(u) else s * s * u + 0.5

    if spec.direction == "add" and q < 1.0:
        return (lambda x: -remove_loss(x), lambda x: phi(x, 0.0), lambda t: x_of(-t), False,
                [0.0, 0.5, 1.0])
    if spec.direction != "remove":
        raise ValueError(f"{spec.direction}: not a PRV pair")
    return (remove_loss, lambda x: (1 - q) * phi(x, 0.0) + q * phi(x, 1.0), x_of, True,
            [0.0, 0.5, 1.0])


def truncated_loss_mean(spec: PairSpec, t_lo: float, t_hi: float) -> tuple[float, float]:
    """E_P[L · 1{t_lo < L ≤ t_hi}] and an estimate of its absolute error.

    Integrated over the output x (where L(x)·p(x) is smooth: no steep CDF near the loss's support
    edge, unlike an integral over the loss itself) by composite Gauss–Legendre on 96 and 192
    panels; the error estimate is their difference plus rounding (1e-15·∫|L|p).
    """
    loss, dens, x_of, increasing, br = _loss_and_density(spec)
    s = spec.noise
    x_min, x_max = min(br) - _MEAN_Z * s, max(br) + _MEAN_Z * s
    a, b = (x_of(t_lo), x_of(t_hi)) if increasing else (x_of(t_hi), x_of(t_lo))
    a, b = max(a, x_min), min(b, x_max)
    if not b > a:
        return 0.0, 0.0

    def f(x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            return np.nan_to_num(loss(x) * dens(x), nan=0.0, posinf=0.0, neginf=0.0)

    inner = [v for v in br if a < v < b]
    vals = []
    for panels in (_MEAN_PANELS, 2 * _MEAN_PANELS):
        cuts = np.unique(np.concatenate([np.linspace(a, b, panels + 1), inner]))
        vals.append(_gauss_legendre(f, cuts))
    (v1, _), (v2, absint) = vals
    return v2, abs(v2 - v1) + 1e-15 * absint + 1e-300


def discretise_cell_centred(spec: PairSpec, h: float, j_min: int, j_max: int,
                            z: float = 12.0) -> Discrete:
    """The PRV truncated to [j_min·h, j_max·h], cell-centred on the mesh, mean-shifted (Gopi).

    Cells are evaluated over the loss range of :func:`loss_range` (``z`` noise standard
    deviations); the P-mass beyond it (≤ Φ̄(z)) is treated as outside the domain.

    The shift makes the discrete mean equal to the mean of the continuous variable over the same
    cells, computed accurately (:func:`truncated_loss_mean`; a trapezoid rule on the cell edges is
    off by up to h/2 when the mass sits inside one cell — Gopi et al.'s error bound then fails by
    that much per release). The remaining uncertainty of the mean (integration error and rounding
    of the cell masses) is returned as ``mean_error`` (per release): the accountant widens its
    ε bounds by Σ count·mean_error.
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
    integral, int_err = truncated_loss_mean(spec, float(edges[0]), float(edges[-1]))
    mean_c = integral / remaining
    mean_d = float(np.sum(j * h * f))
    # rounding of the cell masses (each a difference of two tails, a few ulps of the larger)
    t_abs = np.abs(j * h)
    round_err = (4.5e-16 * float(np.sum(t_abs * (g[:-1] + g[1:]))) + 1e-15 * float(np.sum(t_abs * f))
                 ) / remaining
    shift = mean_c - mean_d
    if not abs(shift) <= h:  # |L − t_j| ≤ h/2 on every cell: a larger gap is a numerical failure
        raise ValueError("noise_multiplier: discrete PRV mean differs from the continuous one")
    return Discrete(int(a), f, 0.0, h, shift, int_err / remaining + round_err)


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
    Its safe domain is sized from RDP, hence :class:`RDPDomainAccountant`'s support. Composes at most
    64 distinct segments (about 0.7 s each; use PLD or RDP for more)."""

    max_segments = 64

    def __init__(self, eps_error: float = 0.01, delta_error: float | None = None) -> None:
        if not (math.isfinite(eps_error) and eps_error > 0):
            raise ValueError(f"eps_error: must be a finite number > 0, got {eps_error!r}")
        if delta_error is not None and not (0 < delta_error < 1):
            raise ValueError(f"delta_error: must be in (0, 1), got {delta_error!r}")
        self.eps_error = eps_error
        self.delta_error = delta_error

    def _compose(self, items: list[tuple[PairSpec, int]], segments: Sequence[Segment],
                 delta_error: float) -> Composed:
        """The composed PRV; ``mean_slack`` (k·η) and ``mass_slack`` (P-mass dropped beyond the
        single-release loss ranges) are attached to it for :meth:`_bounds`."""
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
                    "use the pld accountant (CLI: --accountant pld) or PRVAccountant(eps_error=...) with a larger value")
            try:
                discs = [(discretise_cell_centred(p, h, j_min, j_min + n - 1, z), cnt)
                         for p, cnt in _merge(items)]
                c = compose(discs, window=(j_min, n), lambdas=_CHERNOFF)
            except _GridTooFine as exc:  # huge ε: the composition does not fit the mesh
                raise ValueError(f"eps_error: {self.eps_error} is too fine a PRV mesh for {k} releases "
                                 f"({exc}); use the pld accountant (CLI: --accountant pld) or "
                                 "PRVAccountant(eps_error=...) with a larger value") from None
            if c.above + c.below <= delta_error / 4:
                c.mean_slack = sum(cnt * d.mean_error for d, cnt in discs)  # type: ignore[attr-defined]
                c.mass_slack = sum(cnt * max(1.0 - float(d.pmf.sum()), 0.0)  # type: ignore[attr-defined]
                                   for d, cnt in discs)
                return c
            L *= 1.5

    def _bounds(self, c: Composed, delta: float, delta_error: float) -> tuple[float, float, float]:
        est = _estimate_epsilon(c, delta)
        slack = c.noise + getattr(c, "mass_slack", 0.0)
        widen = self.eps_error + getattr(c, "mean_slack", 0.0)
        up = _estimate_epsilon(c, delta - delta_error - slack) + widen
        lo = max(_estimate_epsilon(c, delta + delta_error + slack) - widen, 0.0)
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
        lo, up = float(min(lo, up)), float(up)
        reason = None if math.isfinite(up) else "privacy loss at infinity exceeds delta"
        return EpsilonResult(up, lo, up, self.name, delta, reason)

    def epsilon_estimate(self, segments: Sequence[Segment], delta: float) -> float:
        """The PRV point estimate ε̂(δ) (neither bound), remove orientation and add if larger."""
        de = self.delta_error if self.delta_error is not None else delta / 1000
        orients = _orientations(segments)
        return max(_estimate_epsilon(self._compose(items, segments, de), delta)
                   for items in orients.values())

    def _delta(self, segments: Sequence[Segment], epsilon: float) -> float:
        """δ(ε) upper bound: δ̂(ε − ε_err − k·η) + δ_err + s with δ_err = 1e-10 (Gopi et al. Thm. 5.5;
        k·η and s as in the module docstring)."""
        orients = _orientations(segments)
        out = 0.0
        for items in orients.values():
            de = 1e-10
            c = self._compose(items, segments, de)
            widen = self.eps_error + getattr(c, "mean_slack", 0.0)
            d_hat = c.delta(max(epsilon - widen, 0.0), pessimistic=False) - c.extra(False) \
                + c.inf_mass
            out = max(out, d_hat + de + c.noise + getattr(c, "mass_slack", 0.0))
        return float(min(out, 1.0))
