"""Empirical ε lower bounds: what an attack *proves* about a mechanism, at a stated confidence.

Every function returns an :class:`EpsilonLowerBound`: ``value`` is a number such that, if the
mechanism were (ε, δ)-DP with ε < ``value``, an outcome at least as extreme as the one observed would
happen with probability at most ``1 - confidence`` (over the randomness of training and of the audit).
``value == 0`` means the audit proves nothing. The result states ``method`` (the statistics used),
``selection`` (how the test was chosen) and ``n_tests`` (how many tests the error budget was split
over), so a reader can check that the threshold was never chosen on the data that certifies it.

Neighbouring relation: the hypothesis-testing bounds compare "the unit was in" with "the unit was
out", i.e. add/remove neighbours at the level of the audited unit (a record, a canary, a user). The
δ is the per-unit δ of the guarantee being audited.

Methods (REFERENCES §7):

* ``clopper_pearson`` (Jagielski et al. 2020): (ε, δ)-DP implies TPR ≤ e^ε·FPR + δ and
  TNR ≤ e^ε·FNR + δ. With Clopper–Pearson bounds TPR_lower and FPR_upper, each **one-sided at level
  α/2** (α = 1 − confidence), both bounds hold jointly with probability ≥ 1 − α (union bound), and
  ε_lower = max(ln((TPR_lower − δ)/FPR_upper), ln((TNR_lower − δ)/FNR_upper), 0). The second
  direction needs no extra budget: TNR_lower = 1 − FPR_upper and FNR_upper = 1 − TPR_lower are the
  same two events. The pair of one-sided α/2 bounds is exactly the two-sided Clopper–Pearson
  interval at level 1 − α (``statsmodels.proportion_confint(method="beta", alpha=α)``); this is the
  convention that reproduces Jagielski et al.'s 500/500 TP, 0/500 FP, α = 0.01 → ε_lower = 4.54
  (one-sided intervals at α each would give 4.68, with only 98% joint confidence).
* ``one_run`` (Steinke, Nasr, Jagielski, NeurIPS 2023): m canaries each included independently with
  probability ½; r guesses, v correct. With q = e^ε/(1+e^ε), β = P[Binomial(r, q) ≥ v],
  α* = max_{1≤i≤v} P[v > Binomial(r, q) ≥ v − i]/i, the p-value is p = min(1, β + α*·δ·2m), and
  ε_lower is the largest ε with p ≤ 1 − confidence (bisection; p is increasing in ε).
* ``one_run_fdp`` (Mahloujifar, Melis, Chaudhuri 2024, "Auditing f-differential privacy in one
  run"): the same game (m fair-coin canaries, r guesses, v correct), tested against the Gaussian
  trade-off curves G_μ(x) = Φ(Φ⁻¹(1 − x) − μ). For a trade-off curve f with blow-up f̄(x) = 1 − f(x)
  the recursion (their Algorithm with abstention, k = 2 answers per canary) starts at
  r_v = τ·v/m, h_v = τ·(r − v)/m and runs for i = v−1 … 0: h_i = max(h_{i+1}, f̄⁻¹(r_{i+1})),
  r_i = r_{i+1} + i/(r − i)·(h_i − h_{i+1}); the hypothesis "the mechanism is f-DP" is rejected at
  level τ when r_0 + h_0 > r/m. For G_μ, f̄⁻¹(y) = Φ(Φ⁻¹(y) − μ) and rejection is monotone in μ, so
  μ_lower = the largest rejected μ is a lower bound on the GDP parameter at confidence 1 − τ; the
  reported ε is ε(δ) of μ_lower-GDP. μ_lower does not depend on δ (one test serves every δ). The
  ε value **assumes a Gaussian trade-off curve** (exact for the Gaussian mechanism and its
  compositions, the usual approximation for DP-SGD; Nasr et al. 2023 and jax_privacy report it the
  same way); the result says so in ``assumption``. With the (ε, δ)-DP trade-off curve in place of
  G_μ the same recursion gives about the Steinke bound (measured: 2.01 vs 2.02 at m = r = 1000,
  v = 900, δ = 1e-5): the gain comes from the Gaussian shape. Reference implementation
  (jax_privacy 2.0 ``_epsilon_one_run_fdp``): m = r = 1000, v = 900, δ = 1e-5, 95% → 3.779.
* ``one_run_fdp_accounted``: the same recursion (same code path, :func:`_fdp_recursion`) with the
  trade-off curve of a *claimed privacy profile*, f(α) = sup_j max(0, 1 − δ_j − e^{ε_j}α,
  e^{−ε_j}(1 − δ_j − α)) (:class:`TradeoffCurve`; for a run, the PLD accountant's own pessimistic
  profile, :mod:`privaudit.audit.accounted`). A rejection refutes the claim with no assumption on
  the mechanism's shape (the curve is implied by the claim). Family variant
  (:class:`TradeoffFamily`): curves f_c indexed by a noise scale c, pointwise non-decreasing in c,
  scanned from the largest c down to the first curve not rejected; every rejected c is excluded
  (each test at level τ; one hypothesis is true, so no correction among the scales), and ε_lower is
  ε(δ) of the smallest rejected scale, valid *if* the mechanism's curve is a member
  (``assumption="accounted_family"``); ``refuted`` says whether the claim's own curve (c = 1) was
  rejected.
* ``gdp`` (optional): a lower bound on the Gaussian-DP parameter μ (valid without assumptions) and
  the ε(δ) a μ-GDP mechanism would have — the latter *assumes* a Gaussian trade-off curve.

Choosing a threshold on the data that certifies it inflates the bound. The score-based functions
therefore either pick it on a held-out random split (``held_out_split``) or split α over a grid
fixed before looking at the labels (``bonferroni_grid``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Literal, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from privaudit.attacks.metrics import _check_count, as_score_array

__all__ = [
    "EpsilonLowerBound",
    "epsilon_lower_bound_from_counts",
    "epsilon_lower_bound_from_scores",
    "one_run_p_value",
    "one_run_epsilon_lower_bound",
    "one_run_audit_from_scores",
    "one_run_audit_best",
    "default_one_run_grid",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_mu_lower_bound",
    "epsilon_lower_bound_gdp",
    "one_run_fdp_rejects",
    "one_run_fdp_mu_lower_bound",
    "one_run_fdp_epsilon_lower_bound",
    "one_run_fdp_audit_from_scores",
    "one_run_fdp_audit_best",
    "one_run_bounds_best",
    "ONE_RUN_BOUNDS",
    "GAUSSIAN_TRADEOFF",
    "ACCOUNTED_FAMILY",
    "TradeoffCurve",
    "TradeoffFamily",
    "one_run_fdp_curve_rejects",
    "one_run_fdp_family_bound",
    "one_run_fdp_claim_refutable",
]

GAUSSIAN_TRADEOFF = "gaussian_tradeoff"
"""``assumption`` of an ε converted from a GDP μ: valid if the mechanism's trade-off curve is Gaussian."""
ACCOUNTED_FAMILY = "accounted_family"
"""``assumption`` of the ε of ``one_run_fdp_accounted``: the mechanism's trade-off curve is that of the
accounted schedule with every noise multiplier scaled by one unknown factor (its ``refuted`` flag
needs no assumption)."""
ONE_RUN_BOUNDS: tuple[str, ...] = ("one_run", "one_run_fdp", "one_run_fdp_accounted")
"""The one-run bounds :func:`one_run_bounds_best` can try: Steinke et al. 2023, the f-DP bound
against the Gaussian family, and the f-DP test against the accountant's own trade-off curves (needs
a :class:`TradeoffFamily`)."""


@dataclass(frozen=True)
class EpsilonLowerBound:
    """An empirical lower bound on ε at ``delta``, holding with probability ≥ ``confidence``.

    ``method``: ``clopper_pearson`` | ``one_run`` (Steinke et al.) | ``one_run_fdp`` |
    ``one_run_fdp_accounted`` | ``gdp``. ``selection``: how the test (threshold,
    guess counts) was chosen — ``fixed`` (given in advance), ``held_out_split`` (chosen on a disjoint
    random part of the data), ``bonferroni_grid`` (best of ``n_tests`` fixed tests, each run at
    α/``n_tests``). The remaining fields are the statistics behind the value (None where not used).
    """

    value: float
    confidence: float
    method: str
    delta: float
    selection: str = "fixed"
    n_tests: int = 1
    # hypothesis-testing counts (certification data only)
    tp: int | None = None
    fn: int | None = None
    fp: int | None = None
    tn: int | None = None
    tpr_lower: float | None = None
    fpr_upper: float | None = None
    direction: str | None = None  # "tpr_fpr" or "tnr_fnr": which inequality gave the value
    threshold: float | None = None  # "member" iff score >= threshold
    # one-run audit
    m: int | None = None
    r: int | None = None
    v: int | None = None
    k_plus: int | None = None
    k_minus: int | None = None
    # Gaussian DP
    mu: float | None = None
    note: str | None = None
    assumption: str | None = None  # e.g. GAUSSIAN_TRADEOFF: what ``value`` assumes beyond the game
    # accountant's trade-off curve (``one_run_fdp_accounted``)
    refuted: bool | None = None  # the accountant's own curve (noise scale 1) was rejected: no assumption
    noise_scale: float | None = None  # smallest noise scale of the family whose curve was rejected

    @property
    def significant(self) -> bool:
        """True when the audit proves a positive ε."""
        return self.value > 0.0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, val in asdict(self).items():
            if val is None:
                continue
            if isinstance(val, float) and not math.isfinite(val):
                val = None if math.isnan(val) else ("inf" if val > 0 else "-inf")
            out[k] = val
        return out


# --------------------------------------------------------------------------------------------------
# validation


def _check_confidence(confidence: float) -> float:
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")
    return float(confidence)


def _check_delta(delta: float) -> float:
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and 0.0 <= float(delta) < 1.0):
        raise ValueError(f"delta: must be in [0, 1), got {delta!r}")
    return float(delta)


# --------------------------------------------------------------------------------------------------
# Clopper-Pearson


def _cp_lower(k: NDArray[np.float64], n: NDArray[np.float64], tail: float) -> NDArray[np.float64]:
    """Vectorised one-sided lower CP bound (0 where k == 0)."""
    with np.errstate(invalid="ignore"):
        lo = stats.beta.ppf(tail, np.maximum(k, 1e-300), n - k + 1)
    return np.where(k > 0, lo, 0.0)


def _cp_upper(k: NDArray[np.float64], n: NDArray[np.float64], tail: float) -> NDArray[np.float64]:
    """Vectorised one-sided upper CP bound (1 where k == n)."""
    with np.errstate(invalid="ignore"):
        up = stats.beta.isf(tail, k + 1, np.maximum(n - k, 1e-300))
    return np.where(k < n, up, 1.0)


def _eps_from_counts(tp: ArrayLike, fn: ArrayLike, fp: ArrayLike, tn: ArrayLike, delta: float, alpha: float) -> tuple[NDArray[np.float64], ...]:
    """Vectorised core: ε_lower (clipped at 0), direction index (0: TPR/FPR, 1: TNR/FNR),
    TPR_lower and FPR_upper, each one-sided at α/2."""
    tp_, fn_, fp_, tn_ = (np.asarray(x, dtype=np.float64) for x in (tp, fn, fp, tn))
    pos, neg = tp_ + fn_, fp_ + tn_
    tail = alpha / 2.0
    tpr_lo = _cp_lower(tp_, pos, tail)
    fpr_up = _cp_upper(fp_, neg, tail)
    # The same two events give the swapped direction: TNR_lower = 1 - FPR_upper and
    # FNR_upper = 1 - TPR_lower (computed directly for precision).
    tnr_lo = _cp_lower(tn_, neg, tail)
    fnr_up = _cp_upper(fn_, pos, tail)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.where(tpr_lo > delta, np.log(np.maximum(tpr_lo - delta, 1e-300)) - np.log(fpr_up), 0.0)
        e2 = np.where(tnr_lo > delta, np.log(np.maximum(tnr_lo - delta, 1e-300)) - np.log(fnr_up), 0.0)
    eps = np.maximum(np.maximum(e1, e2), 0.0)
    direction = np.where(e2 > e1, 1, 0)
    return eps, direction, tpr_lo, fpr_up


def epsilon_lower_bound_from_counts(
    tp: int, fn: int, fp: int, tn: int, delta: float, confidence: float = 0.95
) -> EpsilonLowerBound:
    """ε lower bound from a confusion matrix of a *fixed* membership test.

    ``tp``/``fn``: members predicted in/out; ``fp``/``tn``: non-members predicted in/out. The
    counts must come from independent trials and a test chosen without looking at them (otherwise
    use :func:`epsilon_lower_bound_from_scores`). Clopper–Pearson bounds, one-sided at
    α/2 = (1 − confidence)/2 each (see module docstring). Jagielski et al. 2020:
    ``epsilon_lower_bound_from_counts(500, 0, 0, 500, delta=0, confidence=0.99).value`` = 4.54.
    """
    tp, fn, fp, tn = (_check_count(x, nm) for x, nm in ((tp, "tp"), (fn, "fn"), (fp, "fp"), (tn, "tn")))
    if tp + fn == 0:
        raise ValueError("tp: tp + fn (number of member trials) must be >= 1")
    if fp + tn == 0:
        raise ValueError("fp: fp + tn (number of non-member trials) must be >= 1")
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    return _counts_bound(tp, fn, fp, tn, delta, confidence, n_tests=1)


def _counts_bound(tp: int, fn: int, fp: int, tn: int, delta: float, confidence: float, *, n_tests: int,
                  selection: str = "fixed", threshold: float | None = None, note: str | None = None) -> EpsilonLowerBound:
    alpha = (1.0 - confidence) / n_tests
    eps, direction, tpr_lo, fpr_up = _eps_from_counts([tp], [fn], [fp], [tn], delta, alpha)
    value = float(eps[0])
    return EpsilonLowerBound(
        value=value, confidence=confidence, method="clopper_pearson", delta=delta,
        selection=selection, n_tests=n_tests, tp=tp, fn=fn, fp=fp, tn=tn,
        tpr_lower=float(tpr_lo[0]), fpr_upper=float(fpr_up[0]),
        direction=None if value <= 0 else ("tnr_fnr" if direction[0] == 1 else "tpr_fpr"),
        threshold=threshold, note=note,
    )


def _counts_at(member: NDArray[np.float64], nonmember: NDArray[np.float64], thresholds: NDArray[np.float64]) -> tuple[NDArray[np.int64], ...]:
    """Confusion counts of "member iff score >= t" for every t (vectorised via sorting)."""
    ms, ns = np.sort(member), np.sort(nonmember)
    tp = member.size - np.searchsorted(ms, thresholds, side="left")
    fp = nonmember.size - np.searchsorted(ns, thresholds, side="left")
    return tp, member.size - tp, fp, nonmember.size - fp


def epsilon_lower_bound_from_scores(
    member_scores: ArrayLike,
    nonmember_scores: ArrayLike,
    delta: float,
    confidence: float = 0.95,
    threshold_fraction: float = 0.5,
    seed: int = 0,
    *,
    selection: Literal["held_out_split", "bonferroni_grid"] = "held_out_split",
    thresholds: Sequence[float] | None = None,
    n_thresholds: int = 50,
) -> EpsilonLowerBound:
    """ε lower bound from attack scores (higher = more likely a member), one score per trial.

    ``selection="held_out_split"`` (default): members and non-members are each split at random
    (``seed``) into a selection part (``threshold_fraction`` of them) and a certification part; the
    threshold maximising the bound on the selection part is then certified on the other part with
    the full error budget. The reported counts are the certification counts.

    ``selection="bonferroni_grid"``: all data certify; the best of a grid of G thresholds is
    reported with each test run at α/G (union bound). The grid is ``thresholds`` if given (strictly
    valid: fixed in advance), else ``n_thresholds`` quantiles of the pooled scores *without labels*
    — standard practice, but that grid depends mildly on the data and the result says so in
    ``note``; pass ``thresholds`` when the audit must be airtight.
    """
    a = as_score_array(member_scores, "member_scores")
    b = as_score_array(nonmember_scores, "nonmember_scores")
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    if selection == "held_out_split":
        if not (isinstance(threshold_fraction, (int, float)) and 0.0 < threshold_fraction < 1.0):
            raise ValueError(f"threshold_fraction: must be in (0, 1), got {threshold_fraction!r}")
        rng = np.random.default_rng(seed)
        ka, kb = int(math.floor(threshold_fraction * a.size)), int(math.floor(threshold_fraction * b.size))
        if not (1 <= ka < a.size and 1 <= kb < b.size):
            raise ValueError(
                f"threshold_fraction: {threshold_fraction} leaves an empty selection or certification part "
                f"({a.size} members, {b.size} non-members); need at least 2 of each"
            )
        pa, pb = rng.permutation(a), rng.permutation(b)
        sel_a, cert_a, sel_b, cert_b = pa[:ka], pa[ka:], pb[:kb], pb[kb:]
        cand = np.unique(np.concatenate([sel_a, sel_b]))
        if cand.size > 2000:  # any rule on the selection part is valid; keep it fast
            cand = np.unique(np.quantile(cand, np.linspace(0.0, 1.0, 2000)))
        tp, fn, fp, tn = _counts_at(sel_a, sel_b, cand)
        eps, *_ = _eps_from_counts(tp, fn, fp, tn, delta, 1.0 - confidence)
        t = float(cand[int(np.argmax(eps))])
        tp1, fn1, fp1, tn1 = (int(x[0]) for x in _counts_at(cert_a, cert_b, np.array([t])))
        return _counts_bound(tp1, fn1, fp1, tn1, delta, confidence, n_tests=1,
                             selection="held_out_split", threshold=t,
                             note=f"threshold chosen on {ka}+{kb} held-out scores (seed {seed})")
    if selection == "bonferroni_grid":
        if thresholds is not None:
            grid = np.unique(as_score_array(thresholds, "thresholds"))
            note = None
        else:
            if not (isinstance(n_thresholds, int) and n_thresholds >= 1):
                raise ValueError(f"n_thresholds: must be an integer >= 1, got {n_thresholds!r}")
            pooled = np.concatenate([a, b])
            grid = np.unique(np.quantile(pooled, (np.arange(n_thresholds) + 0.5) / n_thresholds))
            note = "threshold grid = quantiles of the pooled (unlabelled) scores"
        g = int(grid.size)
        tp, fn, fp, tn = _counts_at(a, b, grid)
        eps, *_ = _eps_from_counts(tp, fn, fp, tn, delta, (1.0 - confidence) / g)
        j = int(np.argmax(eps))
        return _counts_bound(int(tp[j]), int(fn[j]), int(fp[j]), int(tn[j]), delta, confidence, n_tests=g,
                             selection="fixed" if g == 1 and thresholds is not None else "bonferroni_grid",
                             threshold=float(grid[j]), note=note)
    raise ValueError(f"selection: must be 'held_out_split' or 'bonferroni_grid', got {selection!r}")


# --------------------------------------------------------------------------------------------------
# One-run auditing (Steinke, Nasr, Jagielski 2023)


def _check_mrv(m: int, r: int, v: int) -> tuple[int, int, int]:
    m, r, v = _check_count(m, "m"), _check_count(r, "r"), _check_count(v, "v")
    if m < 1:
        raise ValueError(f"m: must be >= 1, got {m}")
    if r > m:
        raise ValueError(f"r: the number of guesses must be <= m ({m}), got {r}")
    if v > r:
        raise ValueError(f"v: the number of correct guesses must be <= r ({r}), got {v}")
    return m, r, v


def _one_run_p(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    p = beta
    if delta > 0.0:
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-i], i = 1..v
        alpha_star = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
        p += alpha_star * delta * 2.0 * m
    return min(1.0, p)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """p-value of observing ≥ v correct of r guesses on m canaries under (ε, δ)-DP
    (Steinke et al. 2023, in the form of REFERENCES §7)."""
    m, r, v = _check_mrv(m, r, v)
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon: must be a finite number >= 0, got {epsilon!r}")
    return _one_run_p(m, r, v, float(epsilon), _check_delta(delta))


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> EpsilonLowerBound:
    """Largest ε with one-run p-value ≤ 1 − confidence (0 if even ε = 0 is not rejected).

    ``m`` canaries (each in the training set independently with probability ½, add/remove of one
    canary as the neighbouring relation), ``r`` guesses (abstaining on m − r), ``v`` correct.
    Reference (p = 0.05): (1000, 100, 100, 0) → 3.493; (1000, 200, 190, 1e-5) → 2.394.
    """
    m, r, v = _check_mrv(m, r, v)
    return _one_run_bound(m, r, v, _check_delta(delta), _check_confidence(confidence), 1)


def _one_run_bound(m: int, r: int, v: int, delta: float, confidence: float, n_tests: int) -> EpsilonLowerBound:
    """Validated core: the bound at significance (1 - confidence) / n_tests."""
    sig = (1.0 - confidence) / n_tests
    value = 0.0
    if _one_run_p(m, r, v, 0.0, delta) <= sig:
        lo, hi = 0.0, 1.0
        while _one_run_p(m, r, v, hi, delta) <= sig:
            lo, hi = hi, hi * 2.0
            if hi > 1e3:  # cannot happen for finite r; guard against an infinite loop
                break
        for _ in range(100):  # invariant: p(lo) <= sig < p(hi)
            mid = 0.5 * (lo + hi)
            if _one_run_p(m, r, v, mid, delta) <= sig:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-12:
                break
        value = lo
    return EpsilonLowerBound(value=value, confidence=confidence, method="one_run", delta=delta,
                             n_tests=n_tests, selection="fixed" if n_tests == 1 else "bonferroni_grid",
                             m=m, r=r, v=v)


def _guess_order(scores: NDArray[np.float64], seed: int) -> NDArray[np.intp]:
    """Indices from most to least member-like. Ties are broken by a random permutation that does not
    look at the labels: never by index, which a caller may have ordered by membership."""
    perm = np.random.default_rng(seed).permutation(scores.size)
    return perm[np.argsort(-scores[perm], kind="stable")]


def _one_run_counts(order: NDArray[np.intp], included: NDArray[np.bool_], k_plus: int, k_minus: int) -> tuple[int, int]:
    m = order.size
    top, bottom = order[:k_plus], order[m - k_minus:] if k_minus else order[:0]
    v = int(included[top].sum()) + int((~included[bottom]).sum())
    return k_plus + k_minus, v


def _check_scores_included(scores: ArrayLike, included: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    s = as_score_array(scores, "scores")
    inc = np.asarray(included)
    if inc.shape != s.shape:
        raise ValueError(f"included: must have the shape of scores {s.shape}, got {inc.shape}")
    if inc.dtype != np.bool_:
        if not np.isin(inc, (0, 1)).all():
            raise ValueError("included: must be booleans (True = canary was in the training set)")
        inc = inc.astype(bool)
    return s, inc


def one_run_audit_from_scores(
    scores: ArrayLike, included: ArrayLike, k_plus: int, k_minus: int, delta: float,
    confidence: float = 0.95, seed: int = 0,
) -> EpsilonLowerBound:
    """One-run audit: guess "in" for the ``k_plus`` highest scores, "out" for the ``k_minus`` lowest,
    abstain on the rest; count correct guesses against ``included`` and return the bound.

    ``scores``: one per canary (higher = more likely included); all m = len(scores) canaries must
    have been included independently with probability ½. ``k_plus``/``k_minus`` must be fixed
    without looking at ``included`` (use :func:`one_run_audit_best` to search a grid validly).
    Ties are broken at random (``seed``).
    """
    s, inc = _check_scores_included(scores, included)
    return _one_run_from_order(_guess_order(s, seed), inc, k_plus, k_minus, _check_delta(delta),
                               _check_confidence(confidence), 1)


def _one_run_from_order(order: NDArray[np.intp], inc: NDArray[np.bool_], k_plus: int, k_minus: int, delta: float,
                        confidence: float, n_tests: int) -> EpsilonLowerBound:
    k_plus, k_minus = _check_count(k_plus, "k_plus"), _check_count(k_minus, "k_minus")
    if k_plus + k_minus > order.size:
        raise ValueError(f"k_plus: k_plus + k_minus must be <= the number of canaries ({order.size})")
    r, v = _one_run_counts(order, inc, k_plus, k_minus)
    return replace(_one_run_bound(order.size, r, v, delta, confidence, n_tests), k_plus=k_plus, k_minus=k_minus)


def default_one_run_grid(m: int) -> list[tuple[int, int]]:
    """The fixed grid :func:`one_run_audit_best` searches by default: r = total guesses at fractions
    0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100% of m and at the powers of two 16, 32, … below 0.5% of m,
    each as (r, 0) (guess only "in") and (r − r//2, r//2) (split between "in" and "out"). Depends only
    on m.

    The absolute counts matter for large m: the f-DP bounds peak at a few hundred to a few thousand
    confident guesses whatever m is (an ideal observer of the demo's schedule at ε = 4 with 10⁵
    canaries: best r = 128–512, i.e. 0.1–0.5% of m), so a grid of fractions alone misses the peak and a
    larger m gave a *smaller* bound (1.80 at 10⁵ vs 1.98 at 2·10⁴, every step, Gaussian f-DP); with
    these points 2.00. Each extra point costs one more Bonferroni test, i.e. a factor ≈ G'/G on the
    tail probability (a few hundredths in ε)."""
    m = _check_count(m, "m")
    out: list[tuple[int, int]] = []
    small = []
    r = 16
    while r < 0.005 * m:
        small.append(r)
        r *= 2
    rs = small + [min(m, max(1, int(round(f * m)))) for f in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)]
    for r in rs:
        for pair in ((r, 0), (r - r // 2, r // 2)):
            if pair not in out:
                out.append(pair)
    return out


def one_run_audit_best(
    scores: ArrayLike, included: ArrayLike, delta: float, confidence: float = 0.95,
    grid: Sequence[tuple[int, int]] | None = None, seed: int = 0,
) -> EpsilonLowerBound:
    """Best one-run bound over a grid of (k_plus, k_minus) fixed before the labels are seen, with
    Bonferroni correction: each of the G settings is tested at (1 − confidence)/G, so the maximum
    holds at ``confidence``. Default grid: :func:`default_one_run_grid` (depends only on m)."""
    s, inc = _check_scores_included(scores, included)
    delta, confidence = _check_delta(delta), _check_confidence(confidence)
    pairs = list(grid) if grid is not None else default_one_run_grid(s.size)
    if not pairs:
        raise ValueError("grid: must contain at least one (k_plus, k_minus) pair")
    order = _guess_order(s, seed)
    best: EpsilonLowerBound | None = None
    for kp, km in pairs:
        res = _one_run_from_order(order, inc, kp, km, delta, confidence, len(pairs))
        if best is None or res.value > best.value:
            best = res
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------------
# Gaussian DP (optional)


def gdp_delta(mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP (Dong, Roth, Su 2019): Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)."""
    if mu <= 0:
        return 0.0
    a = stats.norm.cdf(-epsilon / mu + mu / 2.0)
    b = math.exp(epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2.0))
    return max(0.0, float(a - b))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest ε with δ(ε) ≤ delta for μ-GDP (0 if already at ε = 0; inf if delta = 0 and μ > 0)."""
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    if delta <= 0:
        return math.inf
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return lo  # δ(lo) > delta: a μ-GDP mechanism is not (lo, delta)-DP


def gdp_mu_lower_bound(tp: int, fn: int, fp: int, tn: int, confidence: float = 0.95) -> float:
    """Lower bound on μ for which the mechanism could be μ-GDP: μ ≥ Φ⁻¹(TPR_lower) − Φ⁻¹(FPR_upper)
    (CP bounds one-sided at α/2 each; the swapped direction gives the same expression)."""
    tp, fn, fp, tn = (_check_count(x, nm) for x, nm in ((tp, "tp"), (fn, "fn"), (fp, "fp"), (tn, "tn")))
    if tp + fn == 0 or fp + tn == 0:
        raise ValueError("tp: need at least one member and one non-member trial")
    confidence = _check_confidence(confidence)
    tail = (1.0 - confidence) / 2.0
    tpr_lo = float(_cp_lower(np.array([tp], float), np.array([tp + fn], float), tail)[0])
    fpr_up = float(_cp_upper(np.array([fp], float), np.array([fp + tn], float), tail)[0])
    if tpr_lo <= 0.0:
        return 0.0
    return max(0.0, float(stats.norm.ppf(tpr_lo) - stats.norm.ppf(fpr_up)))


def epsilon_lower_bound_gdp(tp: int, fn: int, fp: int, tn: int, delta: float, confidence: float = 0.95) -> EpsilonLowerBound:
    """μ lower bound (assumption-free) and the ε(δ) of a μ-GDP mechanism (``value``).

    ``value`` is a valid ε lower bound only for mechanisms whose trade-off curve is Gaussian (e.g.
    the Gaussian mechanism, DP-SGD in the many-step limit); ``mu`` needs no such assumption.
    """
    delta = _check_delta(delta)
    if delta <= 0.0:
        raise ValueError("delta: must be > 0 for the Gaussian-DP conversion (μ-GDP is never (ε, 0)-DP)")
    mu = gdp_mu_lower_bound(tp, fn, fp, tn, confidence)
    return EpsilonLowerBound(value=gdp_epsilon(mu, delta), confidence=float(confidence), method="gdp",
                             delta=delta, tp=int(tp), fn=int(fn), fp=int(fp), tn=int(tn), mu=mu,
                             note="epsilon assumes a Gaussian trade-off curve; mu is assumption-free")


# --------------------------------------------------------------------------------------------------
# f-DP one-run auditing (Mahloujifar, Melis, Chaudhuri 2024), Gaussian trade-off family

_MU_SEARCH_MAX = 64.0  # beyond this μ every ε(δ) of interest is astronomically large


def _fdp_recursion(m: int, r: int, v: int, finv_bar: Callable[[NDArray[np.float64]], NDArray[np.float64]],
                   n: int, tau: float) -> NDArray[np.bool_]:
    """The Mahloujifar–Melis–Chaudhuri recursion (module docstring, k = 2) for ``n`` trade-off curves
    at once: ``finv_bar(y)`` maps an array of shape (n,) (values in [0, 1]) to f̄_j⁻¹(y_j) = f_j(1 − y_j)
    for each symmetric curve f_j. True where "the mechanism is f_j-DP" is rejected at level ``tau``
    by v correct of r guesses on m canaries. The Gaussian family and the accountant's curves
    (:class:`TradeoffCurve`) share this code path."""
    if v == 0 or r == 0:
        return np.zeros(n, dtype=bool)
    rr = np.full(n, tau * v / m)
    h = np.full(n, tau * (r - v) / m)
    for i in range(v - 1, -1, -1):
        h_new = np.maximum(h, finv_bar(np.clip(rr, 0.0, 1.0)))
        grew = h_new > h
        if not grew.any():  # h (and then r) can no longer change for any curve
            break
        rr = np.where(grew, np.minimum(rr + (i / (r - i)) * (h_new - h), 1.0), rr)
        h = np.where(grew, h_new, h)
    return rr + h > r / m


def _fdp_rejects(m: int, r: int, v: int, mu: NDArray[np.float64], tau: float) -> NDArray[np.bool_]:
    """For each μ in ``mu``: is "the mechanism is μ-GDP" rejected at level ``tau`` by v correct of r
    guesses on m canaries? (G_μ: f̄⁻¹(y) = Φ(Φ⁻¹(y) − μ); vectorised over μ)."""
    from scipy.special import ndtr, ndtri

    return _fdp_recursion(m, r, v, lambda y: ndtr(ndtri(y) - mu), mu.size, tau).reshape(mu.shape)


def one_run_fdp_rejects(m: int, r: int, v: int, mu: float, confidence: float = 0.95) -> bool:
    """True when v correct of r guesses on m fair-coin canaries reject "the mechanism is μ-GDP" at
    level 1 − ``confidence`` (Mahloujifar, Melis, Chaudhuri 2024; the test behind the f-DP bound)."""
    m, r, v = _check_mrv(m, r, v)
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu: must be a finite number >= 0, got {mu!r}")
    return bool(_fdp_rejects(m, r, v, np.array([float(mu)]), 1.0 - _check_confidence(confidence))[0])


def _fdp_mu_lower(m: int, r: int, v: int, tau: float) -> float:
    """Largest μ (to ~1e-7) whose μ-GDP hypothesis is rejected at level ``tau``; 0 if none is.
    Rejection is monotone (decreasing) in μ, so every μ below the returned value is rejected too."""
    if not _fdp_rejects(m, r, v, np.array([0.0]), tau)[0]:
        return 0.0
    lo, hi = 0.0, 4.0
    while _fdp_rejects(m, r, v, np.array([hi]), tau)[0]:  # bracket: rejected at lo, not at hi
        lo, hi = hi, 2.0 * hi
        if hi > _MU_SEARCH_MAX:
            return lo
    for _ in range(5):  # 64-section search: each pass evaluates 63 interior points at once
        grid = np.linspace(lo, hi, 65)[1:-1]
        rej = _fdp_rejects(m, r, v, grid, tau)
        below = np.flatnonzero(rej)
        new_lo = float(grid[below[-1]]) if below.size else lo
        above = np.flatnonzero(~rej)
        new_hi = float(grid[above[0]]) if above.size else hi
        lo, hi = new_lo, new_hi
        if hi - lo < 1e-9:
            break
    return lo


def one_run_fdp_mu_lower_bound(m: int, r: int, v: int, confidence: float = 0.95) -> float:
    """Lower bound on the Gaussian-DP parameter μ at ``confidence`` from v correct of r guesses on m
    canaries (each included by a fair coin; add/remove of one canary). Assumption-free in this
    sense: a mechanism that is μ-GDP with μ below the value would produce so many correct guesses
    with probability ≤ 1 − confidence. m = r = 1000, v = 900 → 0.880 (95%)."""
    m, r, v = _check_mrv(m, r, v)
    return _fdp_mu_lower(m, r, v, 1.0 - _check_confidence(confidence))


def _fdp_bound(m: int, r: int, v: int, deltas: Sequence[float], confidence: float, n_tests: int
               ) -> dict[float, EpsilonLowerBound]:
    """Validated core: μ_lower at significance (1 - confidence)/n_tests, as a bound at each δ."""
    mu = _fdp_mu_lower(m, r, v, (1.0 - confidence) / n_tests)
    out: dict[float, EpsilonLowerBound] = {}
    for d in deltas:
        value = gdp_epsilon(mu, d) if mu > 0 else 0.0
        out[d] = EpsilonLowerBound(
            value=value, confidence=confidence, method="one_run_fdp", delta=d, n_tests=n_tests,
            selection="fixed" if n_tests == 1 else "bonferroni_grid", m=m, r=r, v=v, mu=mu,
            assumption=GAUSSIAN_TRADEOFF,
            note="mu is a lower bound on the GDP parameter without assumptions; epsilon = epsilon(delta) "
                 "of mu-GDP, valid for mechanisms with a Gaussian trade-off curve",
        )
    return out


def _check_fdp_delta(delta: float) -> float:
    delta = _check_delta(delta)
    if delta <= 0.0:
        raise ValueError("delta: must be > 0 for the f-DP bound (μ-GDP with μ > 0 is never (ε, 0)-DP)")
    return delta


def one_run_fdp_epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95
                                    ) -> EpsilonLowerBound:
    """f-DP one-run bound: ε(δ) of the largest μ-GDP curve rejected at ``confidence`` (``mu`` holds
    that μ). Reference (95%, δ = 1e-5): (1000, 1000, 900) → 3.779 where Steinke et al. give 2.021."""
    m, r, v = _check_mrv(m, r, v)
    delta = _check_fdp_delta(delta)
    return _fdp_bound(m, r, v, [delta], _check_confidence(confidence), 1)[delta]


def one_run_fdp_audit_from_scores(
    scores: ArrayLike, included: ArrayLike, k_plus: int, k_minus: int, delta: float,
    confidence: float = 0.95, seed: int = 0,
) -> EpsilonLowerBound:
    """f-DP one-run audit with fixed guess counts: "in" for the ``k_plus`` highest scores, "out" for
    the ``k_minus`` lowest, abstain on the rest (same contract as :func:`one_run_audit_from_scores`)."""
    s, inc = _check_scores_included(scores, included)
    delta, confidence = _check_fdp_delta(delta), _check_confidence(confidence)
    k_plus, k_minus = _check_count(k_plus, "k_plus"), _check_count(k_minus, "k_minus")
    if k_plus + k_minus > s.size:
        raise ValueError(f"k_plus: k_plus + k_minus must be <= the number of canaries ({s.size})")
    r, v = _one_run_counts(_guess_order(s, seed), inc, k_plus, k_minus)
    return replace(_fdp_bound(s.size, r, v, [delta], confidence, 1)[delta], k_plus=k_plus, k_minus=k_minus)



# --------------------------------------------------------------------------------------------------
# f-DP one-run test against the accountant's own trade-off curve


@dataclass(frozen=True, eq=False)
class TradeoffCurve:
    """The trade-off curve implied by a privacy profile: (ε_j, δ_j)-DP for every j, in both orders.

    f(α) = max(0, max_j (1 − δ_j − e^{ε_j}·α), max_j e^{−ε_j}·(1 − δ_j − α))  (α = type I error).

    Why this is a valid f-DP curve (Dong, Roth, Su 2019, Prop. 2.12, the primal–dual view): if for
    both orders of every neighbouring pair (P, Q) of outputs and every test φ (reject the first
    hypothesis), E_Q[φ] ≤ e^ε·E_P[φ] + δ and E_P[1 − φ] ≤ e^ε·E_Q[1 − φ] + δ, then with α = E_P[φ]
    and β = 1 − E_Q[φ]: β ≥ 1 − δ − e^ε·α and β ≥ e^{−ε}·(1 − δ − α). Every j gives such a line, so
    T(P, Q) ≥ f. For the *tight* profile δ(ε) of all ε ≥ 0 the supremum is the symmetrised
    trade-off curve itself; a finite set of ε_j, or any δ_j ≥ δ(ε_j) (an accountant's pessimistic
    upper bound), gives a smaller f — a weaker hypothesis, so rejecting it rejects the true claim
    a fortiori. f is symmetric (f = f⁻¹), which the one-run recursion uses: f̄⁻¹(y) = f(1 − y).
    ``epsilons``: finite, ≥ 0; ``deltas``: in [0, 1], same length (≥ 1).
    """

    epsilons: NDArray[np.float64]
    deltas: NDArray[np.float64]

    def __post_init__(self) -> None:
        e = np.asarray(self.epsilons, dtype=np.float64).ravel()
        d = np.asarray(self.deltas, dtype=np.float64).ravel()
        if e.size == 0 or e.size != d.size:
            raise ValueError(f"epsilons: need >= 1 value and as many deltas ({e.size} vs {d.size})")
        if not (np.isfinite(e).all() and (e >= 0).all()):
            raise ValueError("epsilons: must be finite and >= 0")
        if not (np.isfinite(d).all() and ((d >= 0) & (d <= 1)).all()):
            raise ValueError("deltas: must be in [0, 1]")
        object.__setattr__(self, "epsilons", e)
        object.__setattr__(self, "deltas", d)

    def __call__(self, alpha: ArrayLike) -> NDArray[np.float64]:
        """f(α) for α in [0, 1] (array in, array out)."""
        a = np.clip(np.asarray(alpha, dtype=np.float64), 0.0, 1.0)
        return _curve_values(self.epsilons[None, :], self.deltas[None, :], a.reshape(1, -1)).reshape(a.shape)


def _curve_values(e: NDArray[np.float64], d: NDArray[np.float64], a: NDArray[np.float64]) -> NDArray[np.float64]:
    """f_i(a_ik) for curves given by rows of e, d (shape (n, J)) at points a (shape (n, K))."""
    with np.errstate(over="ignore"):
        one = 1.0 - d[:, None, :] - np.exp(e)[:, None, :] * a[:, :, None]
    two = np.exp(-e)[:, None, :] * (1.0 - d[:, None, :] - a[:, :, None])
    return np.maximum(np.maximum(one, two).max(axis=2), 0.0)


def _stack(curves: Sequence[TradeoffCurve]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Rows (ε_j, δ_j) padded with (0, 1) — the line of (0, 1)-DP, which says nothing."""
    width = max(c.epsilons.size for c in curves)
    e, d = np.zeros((len(curves), width)), np.ones((len(curves), width))
    for i, c in enumerate(curves):
        e[i, : c.epsilons.size], d[i, : c.deltas.size] = c.epsilons, c.deltas
    return e, d


def _curves_reject(m: int, r: int, v: int, curves: Sequence[TradeoffCurve], tau: float) -> NDArray[np.bool_]:
    """For each curve f: is "the mechanism is f-DP" rejected at level ``tau``? (same recursion as
    the Gaussian family, :func:`_fdp_recursion`)."""
    e, d = _stack(curves)

    def finv_bar(y: NDArray[np.float64]) -> NDArray[np.float64]:
        return _curve_values(e, d, (1.0 - y)[:, None])[:, 0]

    return _fdp_recursion(m, r, v, finv_bar, len(curves), tau)


def one_run_fdp_curve_rejects(m: int, r: int, v: int, curve: TradeoffCurve, confidence: float = 0.95) -> bool:
    """True when v correct of r guesses on m fair-coin canaries reject "the mechanism is f-DP" for the
    trade-off curve ``curve`` at level 1 − ``confidence`` (Mahloujifar, Melis, Chaudhuri 2024). With
    the accountant's curve of a run this refutes the accounting without any assumption on the
    mechanism's shape (add/remove of one canary; see :class:`TradeoffCurve`)."""
    m, r, v = _check_mrv(m, r, v)
    if not isinstance(curve, TradeoffCurve):
        raise ValueError(f"curve: must be a TradeoffCurve, got {type(curve).__name__}")
    return bool(_curves_reject(m, r, v, [curve], 1.0 - _check_confidence(confidence))[0])


@dataclass(frozen=True, eq=False)
class TradeoffFamily:
    """Trade-off curves f_c indexed by a noise scale c on a fixed grid ``scales`` (increasing), with
    f_c pointwise non-decreasing in c (more noise on the same schedule is a post-processing of less:
    true for the Gaussian and Laplace mechanisms, subsampled or not, and their compositions).

    ``curve(c)``: a valid lower bound on member c's trade-off curve (the accountant's pessimistic
    curve); ``epsilon(c, δ)``: a *lower* bound on member c's ε(δ) (the accountant's optimistic
    value). ``claim``: the scale of the accounted mechanism itself (1.0; must be in ``scales``).
    Callers should cache ``curve`` (it is called once per scale and guess setting).
    """

    scales: tuple[float, ...]
    curve: Callable[[float], TradeoffCurve]
    epsilon: Callable[[float, float], float]
    claim: float = 1.0
    description: str = "the accountant's trade-off curves along the run's schedule, noise scaled by c"

    def __post_init__(self) -> None:
        sc = tuple(float(x) for x in self.scales)
        if not sc or any(not (math.isfinite(x) and x > 0) for x in sc) or any(b <= a for a, b in zip(sc, sc[1:])):
            raise ValueError("scales: must be finite, > 0 and strictly increasing")
        if self.claim not in sc:
            raise ValueError(f"claim: {self.claim!r} must be one of scales")
        object.__setattr__(self, "scales", sc)


_FAMILY_CHUNK = 8  # curves tested at once when scanning the family downwards


def _family_scan(m: int, r: int, v: int, family: TradeoffFamily, tau: float) -> tuple[int | None, bool]:
    """Scan the family from the largest scale down until a curve is *not* rejected.

    Returns (index of the smallest scale of the rejected run at the top, or None when the top is not
    rejected; whether the claim's curve is rejected). Sound without monotonicity of the test in c:
    with c_* the first non-rejected scale from the top, every c ≥ c_*'s successor was rejected, and a
    mechanism with trade-off f_c (c ∈ [c_i, c_{i+1})) is f_{c_i}-DP, so only c < c_{i*+1} survive."""
    sc = family.scales
    claim_i = sc.index(family.claim)
    hi = len(sc)  # sc[hi:] are rejected
    stopped = False
    while hi > 0 and not stopped:
        lo = max(0, hi - _FAMILY_CHUNK)
        rej = _curves_reject(m, r, v, [family.curve(c) for c in sc[lo:hi]], tau)
        for k in range(hi - lo - 1, -1, -1):
            if not rej[k]:
                stopped = True
                hi = lo + k + 1
                break
        else:
            hi = lo
    boundary = hi if hi < len(sc) else None
    if hi <= claim_i:
        claim_rejected = True
    elif not stopped or hi - 1 == claim_i:
        claim_rejected = False  # the scan stopped at (or below) the claim without rejecting it
    else:
        claim_rejected = bool(_curves_reject(m, r, v, [family.curve(family.claim)], tau)[0])
    return boundary, claim_rejected


def _family_bound(m: int, r: int, v: int, family: TradeoffFamily, deltas: Sequence[float], confidence: float,
                  n_tests: int) -> dict[float, EpsilonLowerBound]:
    tau = (1.0 - confidence) / n_tests
    boundary, refuted = _family_scan(m, r, v, family, tau)
    scale = family.scales[boundary] if boundary is not None else None
    out: dict[float, EpsilonLowerBound] = {}
    for d in deltas:
        value = max(0.0, float(family.epsilon(scale, d))) if scale is not None else 0.0
        out[d] = EpsilonLowerBound(
            value=value, confidence=confidence, method="one_run_fdp_accounted", delta=d, n_tests=n_tests,
            selection="fixed" if n_tests == 1 else "bonferroni_grid", m=m, r=r, v=v,
            assumption=ACCOUNTED_FAMILY, refuted=refuted, noise_scale=scale,
            note="refuted: the accountant's own trade-off curve is rejected (no assumption); epsilon = "
                 "epsilon(delta) of the least-noisy family member not excluded (noise_scale: the smallest "
                 "rejected scale), valid if the mechanism is the accounted schedule at some noise scale",
        )
    return out


def one_run_fdp_family_bound(m: int, r: int, v: int, family: TradeoffFamily, delta: float,
                             confidence: float = 0.95) -> EpsilonLowerBound:
    """f-DP one-run test against a family of trade-off curves (e.g. the accountant's, noise scaled by
    c ∈ ``family.scales``): ``refuted`` says whether the claim's own curve is rejected at
    ``confidence`` (assumption-free: refutes the accounting), ``value`` is ε(δ) of the smallest
    rejected scale c* (a lower bound on the mechanism's ε *if* its trade-off curve is a member:
    every member with c ≥ c* is excluded). 0 when even the largest scale is not rejected."""
    m, r, v = _check_mrv(m, r, v)
    delta = _check_delta(delta)
    return _family_bound(m, r, v, family, [delta], _check_confidence(confidence), 1)[delta]


def one_run_fdp_claim_refutable(included: ArrayLike, family: TradeoffFamily, confidence: float = 0.95,
                                grid: Sequence[tuple[int, int]] | None = None) -> bool:
    """Power of the accounted-curve test on a design: would *perfect* guesses (every included unit
    ranked above every excluded one) reject the claim's own curve ``family.curve(family.claim)`` at
    some grid point, each tested at (1 − confidence)/G as in :func:`one_run_bounds_best`? If not, no
    attack on this design can refute the claim with this test. Depends on the design only."""
    inc = np.asarray(included, dtype=bool).ravel()
    if inc.size == 0:
        raise ValueError("included: the design has no randomised unit")
    confidence = _check_confidence(confidence)
    pairs = list(grid) if grid is not None else default_one_run_grid(inc.size)
    if not pairs:
        raise ValueError("grid: must contain at least one (k_plus, k_minus) pair")
    order = _guess_order(inc.astype(np.float64), 0)
    tau = (1.0 - confidence) / len(pairs)
    claim = family.curve(family.claim)
    for kp, km in pairs:
        r, v = _one_run_counts(order, inc, _check_count(kp, "k_plus"), _check_count(km, "k_minus"))
        if _curves_reject(inc.size, r, v, [claim], tau)[0]:
            return True
    return False


def one_run_bounds_best(
    scores: ArrayLike, included: ArrayLike, deltas: Sequence[float], confidence: float = 0.95,
    bounds: Sequence[str] = ("one_run", "one_run_fdp"), grid: Sequence[tuple[int, int]] | None = None,
    seed: int = 0, family: TradeoffFamily | None = None,
) -> dict[str, dict[float, EpsilonLowerBound]]:
    """Every one-run bound in ``bounds`` at every δ in ``deltas``, each the best over the guess grid,
    with one Bonferroni correction over everything tried so that *all* returned values hold
    jointly at ``confidence`` (and so their maximum does).

    Tests counted: ``one_run`` (Steinke) is one test per grid point and δ; ``one_run_fdp`` one per
    grid point (its μ bound serves every δ); ``one_run_fdp_accounted`` (needs ``family``) one per
    grid point (a confidence set over the family's scales: one hypothesis is true, so the scales
    need no correction among themselves; its claim test is one of them). n_tests =
    G·(len(deltas)·[one_run] + [one_run_fdp] + [one_run_fdp_accounted]); each test runs at
    (1 − confidence)/n_tests. Grid default: :func:`default_one_run_grid` (depends only on m); guesses
    as in :func:`one_run_audit_from_scores`. Returns ``{bound: {δ: result}}``; the accounted
    bound's ``refuted`` is True when *any* grid point rejected the claim's own curve.
    """
    s, inc = _check_scores_included(scores, included)
    confidence = _check_confidence(confidence)
    ds = sorted({_check_delta(d) for d in deltas})
    if not ds:
        raise ValueError("deltas: must name at least one δ")
    wanted = list(dict.fromkeys(bounds))
    if not wanted or any(b not in ONE_RUN_BOUNDS for b in wanted):
        raise ValueError(f"bounds: must be a non-empty subset of {ONE_RUN_BOUNDS}, got {list(bounds)!r}")
    if "one_run_fdp" in wanted and ds[0] <= 0.0:
        raise ValueError("deltas: the f-DP bound needs every δ > 0")
    if "one_run_fdp_accounted" in wanted and not isinstance(family, TradeoffFamily):
        raise ValueError("family: the one_run_fdp_accounted bound needs a TradeoffFamily")
    pairs = list(grid) if grid is not None else default_one_run_grid(s.size)
    if not pairs:
        raise ValueError("grid: must contain at least one (k_plus, k_minus) pair")
    n_tests = len(pairs) * ((len(ds) if "one_run" in wanted else 0) + (1 if "one_run_fdp" in wanted else 0)
                            + (1 if "one_run_fdp_accounted" in wanted else 0))
    order = _guess_order(s, seed)
    out: dict[str, dict[float, EpsilonLowerBound]] = {b: {} for b in wanted}
    any_refuted = False
    for kp, km in pairs:
        kp, km = _check_count(kp, "k_plus"), _check_count(km, "k_minus")
        if kp + km > s.size:
            raise ValueError(f"k_plus: k_plus + k_minus must be <= the number of canaries ({s.size})")
        r, v = _one_run_counts(order, inc, kp, km)
        found: dict[str, dict[float, EpsilonLowerBound]] = {}
        if "one_run" in wanted:
            found["one_run"] = {d: _one_run_bound(s.size, r, v, d, confidence, n_tests) for d in ds}
        if "one_run_fdp" in wanted:
            found["one_run_fdp"] = _fdp_bound(s.size, r, v, ds, confidence, n_tests)
        if "one_run_fdp_accounted" in wanted:
            assert family is not None
            found["one_run_fdp_accounted"] = _family_bound(s.size, r, v, family, ds, confidence, n_tests)
            any_refuted = any_refuted or bool(found["one_run_fdp_accounted"][ds[0]].refuted)
        for b, by_d in found.items():
            for d, res in by_d.items():
                res = replace(res, k_plus=kp, k_minus=km, selection="fixed" if n_tests == 1 else "bonferroni_grid")
                if d not in out[b] or res.value > out[b][d].value:
                    out[b][d] = res
    if "one_run_fdp_accounted" in out:
        out["one_run_fdp_accounted"] = {d: replace(b, refuted=any_refuted) for d, b in out["one_run_fdp_accounted"].items()}
    return out


def one_run_fdp_audit_best(
    scores: ArrayLike, included: ArrayLike, delta: float, confidence: float = 0.95,
    grid: Sequence[tuple[int, int]] | None = None, seed: int = 0,
) -> EpsilonLowerBound:
    """Best f-DP one-run bound over a grid of (k_plus, k_minus) fixed before the labels are seen,
    Bonferroni-corrected over the grid (default :func:`default_one_run_grid`)."""
    delta = _check_fdp_delta(delta)
    return one_run_bounds_best(scores, included, [delta], confidence, ("one_run_fdp",), grid, seed)["one_run_fdp"][delta]
