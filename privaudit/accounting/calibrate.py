"""Noise calibration: the smallest noise multiplier whose ε stays within a target.

``calibrate_noise`` searches σ (noise std / clip norm, as recorded in ``GaussianEvent``) for
``steps`` Poisson-subsampled Gaussian releases at rate ``sample_rate`` under the given neighbouring
relation (replace doubles the sensitivity, see ``events.py``). The search keeps a bracket
[σ_lo, σ_hi] with ε(σ_lo) > target ≥ ε(σ_hi) — every ε the accountant's upper bound, evaluated,
never interpolated — and narrows it by a safeguarded secant step on log σ. The returned σ is a
bracket end whose ε was computed: it never overshoots the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from privaudit.accounting.base import Accountant, accountant_names, get_accountant
from privaudit.ledger.events import NEIGHBOURING_RELATIONS, GaussianEvent, Neighbouring

__all__ = ["CalibrationResult", "calibrate_noise"]

_SIGMA_MIN, _SIGMA_MAX = 1e-4, 1e6


@dataclass(frozen=True)
class CalibrationResult:
    """σ (noise std / clip norm) and the ε (upper bound, at the requested δ) it gives."""

    noise_multiplier: float
    epsilon: float
    accountant: str


def _finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def _validate(target_epsilon: object, delta: object, sample_rate: object, steps: object,
              accountant: object, neighbouring: object) -> tuple[float, float, float, int]:
    from privaudit.accounting.limits import MAX_STEPS, MAX_TARGET_EPSILON, MIN_DELTA

    eps = _finite_number("target_epsilon", target_epsilon)
    if not 0 < eps <= MAX_TARGET_EPSILON:
        raise ValueError(f"target_epsilon: must be in (0, {MAX_TARGET_EPSILON:g}], got {target_epsilon!r}")
    d = _finite_number("delta", delta)
    if not MIN_DELTA <= d < 1:
        raise ValueError(f"delta: must be in [{MIN_DELTA:g}, 1), got {delta!r}")
    q = _finite_number("sample_rate", sample_rate)
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate: must be in (0, 1], got {sample_rate!r}")
    k = _finite_number("steps", steps)
    if k != int(k) or not 1 <= k <= MAX_STEPS:
        raise ValueError(f"steps: must be an integer in [1, {MAX_STEPS:.0e}], got {steps!r}")
    if accountant not in accountant_names():
        raise ValueError(f"accountant: unknown {accountant!r} (choose from "
                         f"{', '.join(accountant_names())})")
    if neighbouring not in NEIGHBOURING_RELATIONS:
        raise ValueError(f"neighbouring: must be one of {NEIGHBOURING_RELATIONS}, got {neighbouring!r}")
    return eps, d, q, int(k)


def _instance(name: str) -> Accountant:
    if name == "pld":  # the lower bound is not needed here
        from privaudit.accounting.pld import PLDAccountant

        return PLDAccountant(lower_bound=False)
    return get_accountant(name)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "pld", neighbouring: Neighbouring = "add_remove",
                    rtol: float = 1e-4) -> CalibrationResult:
    """Smallest σ (to relative precision ``rtol`` in ε) with ε_upper(σ) ≤ ``target_epsilon``.

    Raises ``ValueError`` naming the field for bad input, or ``target_epsilon`` when even
    σ = 1e6 does not reach the target.
    """
    target, d, q, k = _validate(target_epsilon, delta, sample_rate, steps, accountant, neighbouring)
    acc = _instance(accountant)
    cache: dict[float, float] = {}

    def eps_of(sigma: float) -> float:
        if sigma not in cache:
            ev = GaussianEvent(noise_multiplier=sigma, sample_rate=q, count=k)
            try:
                cache[sigma] = acc.epsilon([ev], d, neighbouring).epsilon
            except ValueError:
                # the accountant cannot handle this σ (e.g. a PRV mesh too large for a tiny σ):
                # such a σ is never returned, it can only serve as the lower end of the bracket
                cache[sigma] = math.inf
        return cache[sigma]

    lo, hi = _bracket(eps_of, target, _rdp_guess(target, d, q, k, neighbouring, accountant))
    e_lo, e_hi = eps_of(lo), eps_of(hi)
    side = 0
    for _ in range(200):
        if target - e_hi <= rtol * target or (hi - lo) <= 1e-9 * hi:
            break
        # secant on (log σ, log ε) — Illinois-style damping keeps it from stalling on one side
        x_lo, x_hi = math.log(lo), math.log(hi)
        f_lo = math.log(e_lo) - math.log(target) if math.isfinite(e_lo) else 50.0
        f_hi = math.log(e_hi) - math.log(target) if e_hi > 0 else -50.0
        if side == 1:
            f_lo /= 2
        elif side == -1:
            f_hi /= 2
        x = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo) if f_hi != f_lo else 0.5 * (x_lo + x_hi)
        # stay strictly inside, at least 5 % of the bracket away from its ends
        w = x_hi - x_lo
        x = min(max(x, x_lo + 0.05 * w), x_hi - 0.05 * w)
        mid = math.exp(x)
        e_mid = eps_of(mid)
        if e_mid > target:
            lo, e_lo = mid, e_mid
            side = 1 if side != 1 else 2
        else:
            hi, e_hi = mid, e_mid
            side = -1 if side != -1 else -2
        if abs(side) == 2:  # the same end moved twice: also bisect
            side = 0
    final = eps_of(hi)  # final check: the returned σ's own, evaluated ε
    if not final <= target:  # pragma: no cover - the bracket invariant guarantees this
        raise RuntimeError("calibration failed to keep epsilon within the target")
    return CalibrationResult(float(hi), float(final), accountant)


def _rdp_guess(target: float, delta: float, q: float, k: int, neighbouring: Neighbouring,
               accountant: str) -> float | None:
    """A starting σ for the tight accountants: the (cheap) RDP calibration, roughly."""
    if accountant == "rdp":
        return None
    try:
        return calibrate_noise(target, delta, q, k, "rdp", neighbouring, rtol=1e-2).noise_multiplier
    except ValueError:
        return None


def _bracket(eps_of: Callable[[float], float], target: float,
             guess: float | None = None) -> tuple[float, float]:
    """σ_lo < σ_hi with ε(σ_lo) > target ≥ ε(σ_hi)."""
    if guess is not None:
        # RDP over-estimates ε, so its σ is usually an upper end and 0.9 σ a lower one
        hi, lo = guess, 0.9 * guess
        if eps_of(hi) <= target:
            for _ in range(4):
                if eps_of(lo) > target:
                    return lo, hi
                hi, lo = lo, 0.9 * lo
        # fall through to the generic search
    hi = 1.0
    if eps_of(hi) <= target:
        lo = hi
        while eps_of(lo) <= target:
            hi = lo
            lo /= 2.0
            if lo < _SIGMA_MIN:
                raise ValueError(f"target_epsilon: {target} is reached with any noise multiplier "
                                 f">= {_SIGMA_MIN}; nothing to calibrate")
        return lo, hi
    lo = hi
    while eps_of(hi) > target:
        lo = hi
        hi *= 2.0
        if hi > _SIGMA_MAX:
            raise ValueError(f"target_epsilon: {target} cannot be reached with a noise "
                             f"multiplier <= {_SIGMA_MAX:g}")
    return lo, hi
