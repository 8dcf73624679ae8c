"""The accountant's own trade-off curve of a run, for the sound f-DP one-run test.

A ledger accounted by the PLD accountant claims, for the composed mechanism, a privacy profile
δ(ε) for *every* ε ≥ 0 (not only the reported ε at the target δ). This module turns that profile
into a trade-off curve and a family of them, which :mod:`privaudit.audit.bounds` tests with the
Mahloujifar–Melis–Chaudhuri one-run recursion (``one_run_fdp_accounted``).

Derivation (the curve is a valid lower bound on the run's trade-off curve *as accounted*):

1. Neighbouring relation. The one-run game includes each canary by a fair coin: "canary in" vs
   "canary out" is an add/remove pair. The PLD accountant composes, under add/remove, the remove
   pair (P = with the unit, Q = without) and the add pair (the reverse order) and takes the larger
   δ(ε): so δ(ε) bounds the hockey-stick divergence E_{e^ε} in *both* orders. Under a ``replace``
   ledger the accounted pairs are replace-one pairs, which say nothing directly about add/remove, so
   no curve is built (:func:`accounted_family` returns the reason instead).
2. From (ε, δ(ε)) in both orders, every test with type I error α has type II error
   β ≥ max(1 − δ(ε) − e^ε·α, e^{−ε}(1 − δ(ε) − α)) (see :class:`~privaudit.audit.bounds.TradeoffCurve`),
   so f(α) = sup_ε max(0, 1 − δ(ε) − e^ε·α, e^{−ε}(1 − δ(ε) − α)) is a valid, symmetric f-DP
   curve (Dong, Roth, Su 2019, Prop. 2.12: for the tight profile it is exactly the symmetrised
   trade-off curve; e.g. the Gaussian mechanism's profile gives back G_μ).
3. Discretisation. The pessimistic PLD (connect-the-dots, Doroshenko et al. 2022; mass at +∞ and
   beyond the FFT window and the rounding allowance counted into δ) gives δ_up(ε) ≥ δ(ε); each
   line is decreasing in δ, so using δ_up and a finite grid of ε_j (a sup over fewer lines) gives a
   curve *below* f: a weaker hypothesis. Rejecting it refutes the accounted claim a fortiori.

The family (``noise_scale`` c): the same schedule (segments, sample rates, counts) with every noise
multiplier multiplied by c. More noise is a post-processing of less (add independent noise), so
f_c is pointwise non-decreasing in c. Scale 1 is the accountant's own claim. ε of a member is the
PLD *optimistic* value (a lower bound on that member's true ε), so the family ε_lower stays a lower
bound. That ε_lower assumes the mechanism's trade-off curve is f_c for some c (e.g. the run used the
accounted schedule but the wrong noise); the refutation of scale 1 assumes nothing.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from privaudit.accounting.base import (
    Reduction,
    Segment,
    events_and_relation,
    segments_from_events,
)
from privaudit.accounting.pld import PLDAccountant
from privaudit.audit.bounds import TradeoffCurve, TradeoffFamily

__all__ = ["DEFAULT_SCALES", "accounted_curve", "accounted_family", "privacy_profile"]

DEFAULT_SCALES: tuple[float, ...] = tuple(2.0 ** (k / 8.0) for k in range(-32, 33))
"""Noise scales of the family: 2^(k/8), k = −32 … 32 (1/16 … 16, ratio ≈ 1.09); includes 1."""

_MAX_FAMILY_SEGMENTS = 32
"""Above this many distinct segments each composition is slow (up to ~20 s at 1,000 segments), so the
family shrinks to the claim's own curve: the assumption-free test stays, the scan over scales goes."""
_N_EPS = 256  # ε grid points of a curve
_DELTA_FLOOR = 1e-11  # the ε grid extends until δ_up(ε) falls below this (or ε = 64)


def _scaled(segments: Sequence[Segment], scale: float) -> tuple[Segment, ...]:
    return tuple(Segment(s.kind, s.noise * scale, s.sample_rate, s.count, s.neighbouring) for s in segments)


def _profile(segments: Sequence[Segment]) -> Callable[[float], float]:
    """ε ↦ pessimistic δ_up(ε) of the composed segments (max over the add and remove orientations)."""
    comps = PLDAccountant().upper_compositions(list(segments))
    return lambda e: max(c.delta(float(e), True) for c in comps.values())


def privacy_profile(segments: Sequence[Segment], epsilons: Sequence[float] | np.ndarray) -> np.ndarray:
    """Pessimistic δ_up(ε) ≥ δ(ε) of the composed segments at each ε (max over the add and remove
    orientations; the PLD accountant's upper compositions)."""
    delta = _profile(segments)
    return np.array([delta(e) for e in np.asarray(epsilons, dtype=float)])


def accounted_curve(segments: Sequence[Segment], scale: float = 1.0, n_eps: int = _N_EPS) -> TradeoffCurve:
    """The trade-off curve of the accounted profile (module docstring), noise scaled by ``scale``:
    lines at ``n_eps`` equally spaced ε in [0, E], E the first power of 2 with δ_up(E) ≤ 1e-11 (at
    most 64)."""
    delta = _profile(_scaled(segments, scale))
    top = 1.0
    while top < 64.0 and delta(top) > _DELTA_FLOOR:
        top *= 2.0
    eps = np.linspace(0.0, top, n_eps)
    return TradeoffCurve(eps, np.array([delta(e) for e in eps]))


def accounted_family(source: Any, scales: Sequence[float] | None = None
                     ) -> tuple[TradeoffFamily | None, str | None]:
    """The accountant's trade-off family of a ledger (object, path or events), or (None, reason) when
    the PLD accountant does not account it under add/remove (replace neighbours, unsupported events,
    no guarantee, no releases). Curves and ε values are computed lazily and cached. ``scales``:
    default :data:`DEFAULT_SCALES`, or only the claim (1.0) for ledgers of more than 32 distinct
    segments (bounded time: then ε_lower is the claim's optimistic ε when it is refuted, else 0)."""
    events, relation = events_and_relation(source)
    if relation != "add_remove":
        return None, (f"the ledger is accounted under {relation} neighbours; the one-run game (canary in or "
                      "out) is add/remove, which that accounting does not bound")
    try:
        red = segments_from_events(events, relation)
        acc = PLDAccountant(lower_bound=True)
        acc.check(red.segments)
    except ValueError as exc:
        return None, f"pld: {exc}"
    if red.no_guarantee:
        return None, red.no_guarantee
    if not red.segments:
        return None, "no releases recorded"
    segments = red.segments
    if scales is None:
        scales = DEFAULT_SCALES if len(segments) <= _MAX_FAMILY_SEGMENTS else (1.0,)
    scales = tuple(float(c) for c in scales)
    curves: dict[float, TradeoffCurve] = {}
    eps: dict[tuple[float, float], float] = {}

    larger = dict(zip(scales, list(scales)[1:]))

    def curve(c: float) -> TradeoffCurve:
        if c not in curves:
            try:
                curves[c] = accounted_curve(segments, c)
            except ValueError:  # noise so small the loss leaves the PLD's numeric range: a curve
                curves[c] = TradeoffCurve(np.zeros(1), np.ones(1))  # that says nothing (never rejected)
        return curves[c]

    def epsilon(c: float, delta: float) -> float:
        if (c, delta) not in eps:
            try:
                low = acc.epsilon(Reduction(_scaled(segments, c)), delta).epsilon_lower
                eps[(c, delta)] = float(low) if low is not None and math.isfinite(low) else 0.0
            except ValueError:  # beyond the PLD's range: ε(δ) decreases in c, so the next scale's is a bound
                eps[(c, delta)] = epsilon(larger[c], delta) if c in larger else 0.0
        return eps[(c, delta)]

    return TradeoffFamily(tuple(scales), curve, epsilon, claim=1.0), None
