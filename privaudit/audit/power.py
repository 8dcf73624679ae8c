"""Audit power: the largest ε lower bound an audit's *design* could certify.

An empirical lower bound is capped by the design (how many units were randomised, the confidence, δ),
not only by the attack: feed a bound function the *perfect* guesses — every included unit scored
above every excluded one — and the value it returns is the most any attack on that design could
prove. With 1,000 canaries included by fair coins, δ = 1e-5 and confidence 0.975, the one-run bound
(Steinke, Nasr, Jagielski 2023) certifies at most ≈ 4.7; with 32 canaries ≈ 1.56. Where the
accounted ε is above this power, an audit that finds nothing says nothing: the verdict is
``inconclusive``, never ``consistent``.

The bound function is a parameter so that other bounds (e.g. an f-DP one-run bound) get their power
the same way: any callable ``(scores, included, delta, confidence) -> EpsilonLowerBound``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from privaudit.audit.bounds import EpsilonLowerBound, one_run_audit_best

__all__ = ["BoundFunction", "audit_power", "design_power"]

BoundFunction = Callable[[NDArray[np.float64], NDArray[np.bool_], float, float], EpsilonLowerBound]


def audit_power(included: ArrayLike, delta: float, confidence: float,
                bound_fn: BoundFunction = one_run_audit_best) -> EpsilonLowerBound:
    """The bound ``bound_fn`` gives for perfect guesses on the design ``included`` (one bool per
    randomised unit: True = in the training data). ``delta`` and ``confidence`` as for the real bound
    (use the per-bound confidence after any multiple-testing correction). ``ValueError`` from the
    bound function for an empty design."""
    inc = np.asarray(included, dtype=bool).ravel()
    if inc.size == 0:
        raise ValueError("included: the design has no randomised unit")
    return bound_fn(inc.astype(np.float64), inc, float(delta), float(confidence))


def design_power(m: int, delta: float, confidence: float,
                 bound_fn: BoundFunction = one_run_audit_best) -> EpsilonLowerBound:
    """:func:`audit_power` of a balanced design of ``m`` units (⌈m/2⌉ included): the power to expect
    before the coins are flipped."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"m: must be a positive integer, got {m!r}")
    return audit_power(np.arange(int(m)) % 2 == 0, delta, confidence, bound_fn)
