"""Membership-inference metrics: ROC, AUC, TPR at fixed FPR, with bootstrap confidence intervals.

Convention everywhere in :mod:`privaudit.attacks`: a *score* is a real number per example and a
**higher score means "more likely a member"**. ``scores_in`` / ``member_scores`` are the scores of
examples that were in the training set, ``scores_out`` / ``nonmember_scores`` of those that were not.

``tpr_at_fpr(.., fpr=x)`` is the largest TPR reachable by a threshold whose empirical FPR is ``<= x``
(no interpolation, as in Carlini et al. 2022). With ``n`` non-members an FPR below ``1/n`` can only
be 0, so TPR at 0.1% FPR needs well over 1000 non-members to mean much: ``membership_metrics``
reports ``min_resolvable_fpr`` so readers can tell.

Bootstrap intervals resample members and non-members separately (stratified percentile bootstrap).
They describe the sampling variability of the metric, not a privacy guarantee; the formal
statements live in :mod:`privaudit.audit.bounds`.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from sklearn.metrics import roc_curve as _sk_roc_curve

__all__ = [
    "as_score_array",
    "roc_curve",
    "auc",
    "tpr_at_fpr",
    "membership_metrics",
]


def as_score_array(x: ArrayLike, name: str, *, ndim: int = 1, allow_empty: bool = False) -> NDArray[np.float64]:
    """``x`` as a float64 array of ``ndim`` dimensions with only finite values.

    Raises ``ValueError`` whose message starts with ``name`` on a wrong shape, an empty array, NaN or
    infinity, or anything that is not numeric.
    """
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: must be numeric ({exc})") from None
    if arr.ndim != ndim:
        raise ValueError(f"{name}: must be a {ndim}-D array, got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name}: must not be empty")
    if np.isnan(arr).any():
        raise ValueError(f"{name}: contains NaN at index {int(np.flatnonzero(np.isnan(arr.ravel()))[0])}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains infinite values")
    return arr


def _labels_scores(scores_in: NDArray[np.float64], scores_out: NDArray[np.float64]) -> tuple[NDArray[Any], NDArray[np.float64]]:
    y = np.concatenate([np.ones(scores_in.size, dtype=np.int8), np.zeros(scores_out.size, dtype=np.int8)])
    return y, np.concatenate([scores_in, scores_out])


def _roc(scores_in: NDArray[np.float64], scores_out: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    y, s = _labels_scores(scores_in, scores_out)
    fpr, tpr, thr = _sk_roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def roc_curve(scores_in: ArrayLike, scores_out: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """ROC of the rule "member if score >= threshold": ``(fpr, tpr, thresholds)``, FPR increasing,
    starting at (0, 0) (threshold ``+inf``) and ending at (1, 1)."""
    a = as_score_array(scores_in, "scores_in")
    b = as_score_array(scores_out, "scores_out")
    return _roc(a, b)


def _auc_from_roc(fpr: NDArray[np.float64], tpr: NDArray[np.float64]) -> float:
    # Trapezoid over the full ROC = Mann-Whitney U / (n_in * n_out), ties counted one half.
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _tpr_at(fpr: NDArray[np.float64], tpr: NDArray[np.float64], target: float) -> float:
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max())


def _check_fpr(fpr: float) -> float:
    if not (isinstance(fpr, (int, float)) and 0.0 <= float(fpr) <= 1.0):
        raise ValueError(f"fpr: must be a number in [0, 1], got {fpr!r}")
    return float(fpr)


def auc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """Area under the ROC curve = P[score_in > score_out] + ½ P[tie]. 0.5 = no separation."""
    fpr, tpr, _ = roc_curve(scores_in, scores_out)
    return _auc_from_roc(fpr, tpr)


def tpr_at_fpr(scores_in: ArrayLike, scores_out: ArrayLike, fpr: float) -> float:
    """Largest TPR of a threshold whose empirical FPR is at most ``fpr`` (no interpolation)."""
    target = _check_fpr(fpr)
    f, t, _ = roc_curve(scores_in, scores_out)
    return _tpr_at(f, t, target)


def _downsampled_roc(fpr: NDArray[np.float64], tpr: NDArray[np.float64], n_out: int, n_points: int) -> tuple[list[float], list[float]]:
    """ROC at a fixed FPR grid (log-spaced from 1/n_out, plus linear), for log- and linear-axis plots."""
    half = max(n_points // 2, 2)
    lo = 1.0 / max(n_out, 1)
    grid = np.unique(np.concatenate([[0.0], np.logspace(np.log10(lo), 0.0, half), np.linspace(0.0, 1.0, half)]))
    # For each grid point the best TPR with FPR <= point: fpr is sorted, so use searchsorted.
    idx = np.searchsorted(fpr, grid + 1e-12, side="right") - 1
    cummax = np.maximum.accumulate(tpr)
    return [float(x) for x in grid], [float(cummax[i]) for i in idx]


def membership_metrics(
    member_scores: ArrayLike,
    nonmember_scores: ArrayLike,
    n_bootstrap: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    n_roc_points: int = 200,
) -> dict[str, Any]:
    """AUC, TPR at 0.1% and 1% FPR, each with a stratified percentile-bootstrap interval at
    ``confidence``, and a downsampled ROC for plotting.

    Returns a JSON-ready dict with keys ``auc``, ``auc_ci``, ``tpr_at_0.1%_fpr``,
    ``tpr_at_0.1%_fpr_ci``, ``tpr_at_1%_fpr``, ``tpr_at_1%_fpr_ci`` (CIs as ``[low, high]``),
    ``roc`` (``{"fpr": [...], "tpr": [...]}``), ``n_members``, ``n_nonmembers``,
    ``min_resolvable_fpr`` (= 1/n_nonmembers), ``n_bootstrap``, ``confidence``.
    """
    a = as_score_array(member_scores, "member_scores")
    b = as_score_array(nonmember_scores, "nonmember_scores")
    if not (isinstance(n_bootstrap, int) and n_bootstrap >= 0):
        raise ValueError(f"n_bootstrap: must be an integer >= 0, got {n_bootstrap!r}")
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")
    if not (isinstance(n_roc_points, int) and n_roc_points >= 4):
        raise ValueError(f"n_roc_points: must be an integer >= 4, got {n_roc_points!r}")

    targets = {"tpr_at_0.1%_fpr": 0.001, "tpr_at_1%_fpr": 0.01}

    def stats(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
        f, t, _ = _roc(x, y)
        return np.array([_auc_from_roc(f, t)] + [_tpr_at(f, t, v) for v in targets.values()])

    fpr, tpr, _ = _roc(a, b)
    point = np.array([_auc_from_roc(fpr, tpr)] + [_tpr_at(fpr, tpr, v) for v in targets.values()])

    out: dict[str, Any] = {}
    names = ["auc", *targets]
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        boot = np.empty((n_bootstrap, len(names)))
        for i in range(n_bootstrap):
            boot[i] = stats(a[rng.integers(0, a.size, a.size)], b[rng.integers(0, b.size, b.size)])
        q = (1.0 - confidence) / 2.0
        lows, highs = np.quantile(boot, q, axis=0), np.quantile(boot, 1.0 - q, axis=0)
    else:
        lows = highs = np.full(len(names), np.nan)
    for j, name in enumerate(names):
        out[name] = float(point[j])
        out[f"{name}_ci"] = None if n_bootstrap == 0 else [float(lows[j]), float(highs[j])]
    roc_f, roc_t = _downsampled_roc(fpr, tpr, b.size, n_roc_points)
    out["roc"] = {"fpr": roc_f, "tpr": roc_t}
    out["n_members"] = int(a.size)
    out["n_nonmembers"] = int(b.size)
    out["min_resolvable_fpr"] = 1.0 / b.size
    out["n_bootstrap"] = n_bootstrap
    out["confidence"] = float(confidence)
    return out


def accuracy_against_baseline(correct: int, n: int, baseline: float, confidence: float) -> dict[str, Any]:
    """Accuracy of ``correct`` right guesses out of ``n`` against a baseline rate (e.g. the majority
    class's share): the rate, its Clopper-Pearson interval at ``confidence``, the advantage, the
    one-sided binomial p-value of beating the baseline, and ``beats_baseline`` (the interval's lower
    end is above the baseline)."""
    from scipy import stats


    lo, hi = clopper_pearson(correct, n, alpha=1 - confidence)
    p_value = float(stats.binom.sf(correct - 1, n, baseline)) if 0 < baseline < 1 else (
        0.0 if correct > baseline * n else 1.0)
    return {
        "accuracy": correct / n,
        "accuracy_ci": [float(lo), float(hi)],
        "confidence": confidence,
        "majority_baseline": baseline,
        "advantage": correct / n - baseline,
        "p_value": p_value,
        "beats_baseline": bool(lo > baseline),
    }


Alternative = Literal["two-sided", "lower", "upper"]

def _check_count(x: Any, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or int(x) < 0:
        raise ValueError(f"{name}: must be a non-negative integer, got {x!r}")
    return int(x)

def clopper_pearson(k: int, n: int, alpha: float = 0.05, alternative: Alternative = "two-sided") -> tuple[float, float]:
    """Exact (Clopper–Pearson) confidence interval for a binomial proportion, ``k`` successes of ``n``.

    ``alternative``:
      * ``"two-sided"``: ``(lower, upper)`` with α/2 in each tail (coverage ≥ 1 − α);
      * ``"lower"``: one-sided ``(lower, 1)`` with α in the lower tail (P[p < lower] ≤ α);
      * ``"upper"``: one-sided ``(0, upper)`` with α in the upper tail.
    """
    k = _check_count(k, "k")
    n = _check_count(n, "n")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if k > n:
        raise ValueError(f"k: must be <= n ({n}), got {k}")
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha: must be in (0, 1), got {alpha!r}")
    if alternative not in ("two-sided", "lower", "upper"):
        raise ValueError(f"alternative: must be 'two-sided', 'lower' or 'upper', got {alternative!r}")
    tail = alpha / 2.0 if alternative == "two-sided" else float(alpha)
    lower = 0.0 if k == 0 else float(stats.beta.ppf(tail, k, n - k + 1))
    upper = 1.0 if k == n else float(stats.beta.isf(tail, k + 1, n - k))
    if alternative == "lower":
        upper = 1.0
    elif alternative == "upper":
        lower = 0.0
    return lower, upper
