"""Empirical ε lower bounds: reference numbers (REFERENCES §7), exactness of the intervals, validity
of the threshold selection, one-run audits and Gaussian DP."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from privaudit.audit.bounds import EpsilonLowerBound, default_one_run_grid, epsilon_lower_bound_from_counts, epsilon_lower_bound_from_scores, epsilon_lower_bound_gdp, gdp_delta, gdp_epsilon, gdp_mu_lower_bound, one_run_audit_best, one_run_audit_from_scores, one_run_epsilon_lower_bound, one_run_p_value
from privaudit.attacks.metrics import clopper_pearson

# ------------------------------------------------------------------------------------------------
# Clopper-Pearson


@pytest.mark.parametrize("n", [1, 7, 40])
@pytest.mark.parametrize("alternative", ["two-sided", "lower", "upper"])
def test_clopper_pearson_exact_coverage(n: int, alternative: str) -> None:
    alpha = 0.1
    intervals = [clopper_pearson(k, n, alpha, alternative) for k in range(n + 1)]  # type: ignore[arg-type]
    for p in np.linspace(0.001, 0.999, 60):
        pmf = stats.binom.pmf(np.arange(n + 1), n, p)
        covered = sum(w for w, (lo, up) in zip(pmf, intervals) if lo <= p <= up)
        assert covered >= 1 - alpha - 1e-9, (p, covered)


def test_clopper_pearson_closed_forms() -> None:
    n, a = 500, 0.01
    assert clopper_pearson(n, n, a) == pytest.approx(((a / 2) ** (1 / n), 1.0), rel=1e-12)
    assert clopper_pearson(0, n, a) == pytest.approx((0.0, 1 - (a / 2) ** (1 / n)), rel=1e-12)
    assert clopper_pearson(n, n, a, "lower") == pytest.approx((a ** (1 / n), 1.0), rel=1e-12)
    assert clopper_pearson(0, n, a, "upper") == pytest.approx((0.0, 1 - a ** (1 / n)), rel=1e-12)
    lo, up = clopper_pearson(30, 100, 0.05)
    assert 0.21 < lo < 0.30 < up < 0.40


@pytest.mark.parametrize(
    ("args", "field"),
    [((5, 4, 0.05), "k"), ((-1, 4, 0.05), "k"), ((0, 0, 0.05), "n"), ((1, 4, 1.5), "alpha"), ((1.5, 4, 0.1), "k")],
)
def test_clopper_pearson_bad_input(args: tuple, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        clopper_pearson(*args)
    with pytest.raises(ValueError, match="^alternative:"):
        clopper_pearson(1, 4, 0.05, "both")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Counts


def test_jagielski_2020_reference_value() -> None:
    res = epsilon_lower_bound_from_counts(500, 0, 0, 500, delta=0.0, confidence=0.99)
    assert isinstance(res, EpsilonLowerBound)
    assert round(res.value, 2) == 4.54
    assert (res.method, res.confidence, res.n_tests, res.selection) == ("clopper_pearson", 0.99, 1, "fixed")
    # It is the two-sided CP interval at 99% (one-sided bounds at alpha/2 each) ...
    lo, _ = clopper_pearson(500, 500, 0.01)
    _, up = clopper_pearson(0, 500, 0.01)
    assert res.value == pytest.approx(math.log(lo / up), rel=1e-12)
    # ... not one-sided bounds at alpha each, which would claim 4.68.
    lo1, _ = clopper_pearson(500, 500, 0.01, "lower")
    _, up1 = clopper_pearson(0, 500, 0.01, "upper")
    assert round(math.log(lo1 / up1), 2) == 4.68


def test_ceiling_without_errors() -> None:
    # REFERENCES §7: with n trials per world and no errors, eps_lower ~ ln(n / ln(1/alpha')) with
    # alpha' = alpha/2 the per-bound level.
    n, conf = 100_000, 0.95
    res = epsilon_lower_bound_from_counts(n, 0, 0, n, delta=0.0, confidence=conf)
    assert res.value == pytest.approx(math.log(n / math.log(2 / (1 - conf))), abs=2e-3)


def test_no_signal_gives_zero() -> None:
    res = epsilon_lower_bound_from_counts(50, 50, 50, 50, delta=1e-5)
    assert res.value == 0.0 and not res.significant and res.direction is None


def test_swapped_direction_and_symmetry() -> None:
    # TPR = 1 but FPR = 1/2: the TNR/FNR inequality is the informative one.
    res = epsilon_lower_bound_from_counts(500, 0, 250, 250, delta=0.0, confidence=0.95)
    tnr_lo, _ = clopper_pearson(250, 500, 0.05)
    _, fnr_up = clopper_pearson(0, 500, 0.05)
    assert res.direction == "tnr_fnr"
    assert res.value == pytest.approx(math.log(tnr_lo / fnr_up), rel=1e-9)
    swapped = epsilon_lower_bound_from_counts(250, 250, 0, 500, delta=0.0, confidence=0.95)
    assert swapped.value == pytest.approx(res.value, rel=1e-12) and swapped.direction == "tpr_fpr"


def test_delta_lowers_the_bound() -> None:
    vals = [epsilon_lower_bound_from_counts(90, 10, 5, 95, delta=d).value for d in (0.0, 1e-3, 0.1, 0.95)]
    assert vals[0] > vals[1] > vals[2] > 0.0
    assert vals[3] == 0.0


def test_bound_is_valid_for_randomised_response() -> None:
    # An exactly eps-DP mechanism (randomised response): the bound may exceed eps in at most
    # ~(1 - confidence) of audits.
    eps, n, trials = 1.0, 200, 300
    rng = np.random.default_rng(0)
    p_in = math.exp(eps) / (1 + math.exp(eps))
    tp = rng.binomial(n, p_in, trials)
    fp = rng.binomial(n, 1 - p_in, trials)
    values = [epsilon_lower_bound_from_counts(int(a), n - int(a), int(b), n - int(b), 0.0).value for a, b in zip(tp, fp)]
    assert np.mean(np.array(values) > eps) <= 0.05
    assert np.median(values) > 0.3  # and the audit does detect most of it


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tp": -1}, "tp"),
        ({"tp": 0, "fn": 0}, "tp"),
        ({"fp": 0, "tn": 0}, "fp"),
        ({"delta": 1.0}, "delta"),
        ({"delta": -0.1}, "delta"),
        ({"confidence": 1.0}, "confidence"),
        ({"tn": 2.5}, "tn"),
    ],
)
def test_counts_bad_input(kwargs: dict, field: str) -> None:
    args = {"tp": 5, "fn": 5, "fp": 5, "tn": 5, "delta": 0.0} | kwargs
    with pytest.raises(ValueError, match=f"^{field}:"):
        epsilon_lower_bound_from_counts(**args)


# ------------------------------------------------------------------------------------------------
# Scores


def _separated(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(shift, 1.0, n), rng.normal(0.0, 1.0, n)


def test_scores_held_out_split_certifies_on_the_other_part() -> None:
    mem, non = _separated(1000, 4.0, 1)
    res = epsilon_lower_bound_from_scores(mem, non, delta=1e-5, threshold_fraction=0.3, seed=3)
    assert res.selection == "held_out_split" and res.n_tests == 1 and res.threshold is not None
    assert res.tp + res.fn == 700 and res.fp + res.tn == 700  # only the certification part counts
    # The counts are those of the reported threshold on *some* 700+700 subset; recomputing on all
    # data at that threshold gives at least as many of each.
    assert res.tp <= int((mem >= res.threshold).sum()) and res.fp <= int((non >= res.threshold).sum())
    assert res.value > 2.0
    again = epsilon_lower_bound_from_scores(mem, non, delta=1e-5, threshold_fraction=0.3, seed=3)
    assert again == res
    other = epsilon_lower_bound_from_scores(mem, non, delta=1e-5, threshold_fraction=0.3, seed=4)
    assert other.threshold != res.threshold or other.tp != res.tp


def _naive_in_sample(mem: np.ndarray, non: np.ndarray, confidence: float) -> float:
    """The flawed practice: pick the threshold on the data that certifies it (every threshold)."""
    from privaudit.audit.bounds import _counts_at, _eps_from_counts

    tp, fn, fp, tn = _counts_at(mem, non, np.unique(np.concatenate([mem, non])))
    eps, *_ = _eps_from_counts(tp, fn, fp, tn, 0.0, 1.0 - confidence)
    return float(eps.max())


def test_threshold_selection_stays_valid_under_the_null() -> None:
    # No separation at all (eps = 0): a valid procedure reports eps > 0 in at most 1 - confidence
    # of audits. A low confidence makes the failure rate measurable with few repetitions.
    reps, n, conf = 100, 300, 0.8
    split = grid = naive = 0
    for i in range(reps):
        mem, non = _separated(n, 0.0, 100 + i)
        split += epsilon_lower_bound_from_scores(mem, non, 0.0, conf, seed=i).value > 0
        grid += epsilon_lower_bound_from_scores(mem, non, 0.0, conf, selection="bonferroni_grid",
                                                thresholds=np.linspace(-2, 2, 9)).value > 0
        naive += _naive_in_sample(mem, non, conf) > 0
    assert split / reps <= 0.2 and grid / reps <= 0.2
    assert naive / reps > 0.25  # the in-sample choice is inflated: why the split exists


def test_bonferroni_grid_records_the_correction() -> None:
    mem, non = _separated(2000, 3.0, 5)
    res = epsilon_lower_bound_from_scores(mem, non, 1e-5, selection="bonferroni_grid", n_thresholds=20)
    assert res.selection == "bonferroni_grid" and res.n_tests == 20 and res.note is not None
    assert res.value > 2.0
    # One fixed threshold = the plain counts bound, no correction.
    fixed = epsilon_lower_bound_from_scores(mem, non, 1e-5, selection="bonferroni_grid", thresholds=[res.threshold])
    assert fixed.selection == "fixed" and fixed.n_tests == 1
    direct = epsilon_lower_bound_from_counts(fixed.tp, fixed.fn, fixed.fp, fixed.tn, 1e-5)
    assert fixed.value == pytest.approx(direct.value, rel=1e-12)
    assert fixed.value >= res.value  # the corrected bound is smaller at the same threshold


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"member_scores": []}, "member_scores"),
        ({"nonmember_scores": [0.1, float("nan")]}, "nonmember_scores"),
        ({"threshold_fraction": 1.0}, "threshold_fraction"),
        ({"member_scores": [1.0]}, "threshold_fraction"),
        ({"selection": "in_sample"}, "selection"),
        ({"selection": "bonferroni_grid", "thresholds": [float("inf")]}, "thresholds"),
    ],
)
def test_scores_bad_input(kwargs: dict, field: str) -> None:
    args = {"member_scores": [1.0, 2.0, 3.0], "nonmember_scores": [0.0, 0.5, 1.0], "delta": 0.0} | kwargs
    with pytest.raises(ValueError, match=f"^{field}:"):
        epsilon_lower_bound_from_scores(**args)


# ------------------------------------------------------------------------------------------------
# One-run audit (Steinke, Nasr, Jagielski 2023)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "expected"),
    [
        (1000, 100, 100, 0.0, 3.493),
        (1000, 1000, 1000, 0.0, 5.809),
        (1000, 200, 190, 1e-5, 2.394),
        (1000, 1000, 900, 1e-5, 2.021),
    ],
)
def test_one_run_reference_table(m: int, r: int, v: int, delta: float, expected: float) -> None:
    res = one_run_epsilon_lower_bound(m, r, v, delta, confidence=0.95)
    assert round(res.value, 3) == expected
    assert (res.method, res.m, res.r, res.v, res.confidence) == ("one_run", m, r, v, 0.95)
    # The value is the largest eps with p <= 0.05.
    assert one_run_p_value(m, r, v, res.value, delta) <= 0.05 < one_run_p_value(m, r, v, res.value + 1e-6, delta)


def test_one_run_p_value_closed_form_and_monotone() -> None:
    eps = 1.3
    q = math.exp(eps) / (1 + math.exp(eps))
    assert one_run_p_value(500, 40, 40, eps, 0.0) == pytest.approx(q**40, rel=1e-10)
    ps = [one_run_p_value(1000, 300, 250, e, 1e-6) for e in np.linspace(0, 4, 30)]
    assert all(b >= a for a, b in zip(ps, ps[1:]))
    assert one_run_p_value(1000, 300, 250, 1.0, 1e-6) > one_run_p_value(1000, 300, 250, 1.0, 0.0)


def test_one_run_nothing_significant() -> None:
    assert one_run_epsilon_lower_bound(1000, 0, 0, 0.0).value == 0.0
    assert one_run_epsilon_lower_bound(1000, 100, 50, 0.0).value == 0.0
    with pytest.raises(ValueError, match="^v:"):
        one_run_epsilon_lower_bound(1000, 10, 11, 0.0)
    with pytest.raises(ValueError, match="^r:"):
        one_run_epsilon_lower_bound(10, 11, 5, 0.0)


def test_one_run_from_scores_reproduces_the_table() -> None:
    m = 1000
    included = np.zeros(m, dtype=bool)
    included[np.random.default_rng(0).permutation(m)[:500]] = True
    scores = included + np.random.default_rng(1).normal(0, 0.01, m)  # a perfect attack
    res = one_run_audit_from_scores(scores, included, k_plus=100, k_minus=0, delta=0.0)
    assert (res.r, res.v, res.k_plus, res.k_minus) == (100, 100, 100, 0)
    assert round(res.value, 3) == 3.493
    res = one_run_audit_from_scores(scores, included, k_plus=500, k_minus=500, delta=0.0)
    assert (res.r, res.v) == (1000, 1000) and round(res.value, 3) == 5.809
    # Guessing "out" on the lowest scores counts too.
    res = one_run_audit_from_scores(scores, included, k_plus=0, k_minus=100, delta=0.0)
    assert (res.r, res.v) == (100, 100)


def test_one_run_ties_are_not_broken_by_index() -> None:
    # Constant scores carry no information even if the caller listed members first.
    included = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    res = one_run_audit_from_scores(np.zeros(1000), included, 100, 100, 0.0)
    assert res.value == 0.0 and 60 < res.v < 140


def test_default_grid_reaches_small_absolute_guess_counts_for_large_m() -> None:
    """Fractions of m alone miss the few hundred confident guesses where the f-DP bound peaks for large
    m: the grid adds r = 16, 32, … below 0.5% of m (and is unchanged for m ≤ 3,200)."""
    small = default_one_run_grid(2000)
    assert len(small) == 16 and min(kp + km for kp, km in small) == 10
    big = default_one_run_grid(100_000)
    rs = sorted({kp + km for kp, km in big})
    assert rs[:6] == [16, 32, 64, 128, 256, 500] and rs[-1] == 100_000
    assert (128, 0) in big and (64, 64) in big and len(big) == len(set(big)) == 2 * len(rs)
    # on scores where only a few hundred canaries carry signal, the new points find it
    rng = np.random.default_rng(4)
    m = 100_000
    inc = rng.random(m) < 0.5
    scores = rng.normal(size=m)
    strong = np.flatnonzero(inc)[:150]
    scores[strong] += 8.0  # 150 members far above everyone: guessing the top 128 is (almost) always right
    from privaudit.audit.bounds import one_run_fdp_audit_best

    fine = one_run_fdp_audit_best(scores, inc, 1e-5, grid=big)  # (Steinke's bound is 0 here: m·δ = 1)
    coarse = one_run_fdp_audit_best(scores, inc, 1e-5, grid=[p for p in big if sum(p) >= 500])
    assert fine.k_plus + fine.k_minus < 500 and fine.value > coarse.value + 0.5


def test_one_run_best_is_bonferroni_corrected() -> None:
    rng = np.random.default_rng(2)
    m = 2000
    included = rng.random(m) < 0.5
    scores = 1.5 * included + rng.normal(0, 1, m)
    grid = default_one_run_grid(m)
    assert grid == default_one_run_grid(m) and len(set(grid)) == len(grid)
    best = one_run_audit_best(scores, included, 1e-5)
    assert best.selection == "bonferroni_grid" and best.n_tests == len(grid)
    assert best.value > 0.5
    # Uncorrected, the same guesses give a larger number: the correction is applied.
    single = one_run_audit_from_scores(scores, included, best.k_plus, best.k_minus, 1e-5)
    assert single.value > best.value and single.v == best.v
    # Under the null the corrected search stays silent.
    null = [one_run_audit_best(rng.normal(size=m), rng.random(m) < 0.5, 1e-5, seed=i).value for i in range(10)]
    assert max(null) == 0.0


def test_one_run_bad_input() -> None:
    with pytest.raises(ValueError, match="^included:"):
        one_run_audit_from_scores(np.zeros(10), np.zeros(9, bool), 1, 1, 0.0)
    with pytest.raises(ValueError, match="^k_plus:"):
        one_run_audit_from_scores(np.zeros(10), np.zeros(10, bool), 8, 8, 0.0)
    with pytest.raises(ValueError, match="^scores:"):
        one_run_audit_from_scores([np.nan, 1.0], [True, False], 1, 0, 0.0)
    with pytest.raises(ValueError, match="^grid:"):
        one_run_audit_best(np.zeros(10), np.zeros(10, bool), 0.0, grid=[])


# ------------------------------------------------------------------------------------------------
# Gaussian DP


def test_gdp_conversion_matches_the_gaussian_mechanism() -> None:
    # mu-GDP = Gaussian mechanism with noise multiplier 1/mu; dp_accounting's PLD gives 4.37718
    # for sigma = 1, delta = 1e-5.
    assert gdp_epsilon(1.0, 1e-5) == pytest.approx(4.377178, abs=1e-5)
    for mu in (0.3, 1.0, 3.0):
        e = gdp_epsilon(mu, 1e-4)
        assert gdp_delta(mu, e) == pytest.approx(1e-4, rel=1e-6)
    assert gdp_epsilon(0.0, 1e-5) == 0.0


def test_gdp_mu_lower_bound_against_analytic_truth() -> None:
    rng = np.random.default_rng(0)
    mu, n = 1.0, 20_000
    mem, non = rng.normal(mu, 1, n), rng.normal(0, 1, n)
    t = 0.5  # a fixed threshold
    tp, fp = int((mem >= t).sum()), int((non >= t).sum())
    lo = gdp_mu_lower_bound(tp, n - tp, fp, n - fp)
    assert 0.9 < lo <= mu
    res = epsilon_lower_bound_gdp(tp, n - tp, fp, n - fp, delta=1e-5)
    assert res.method == "gdp" and res.mu == lo
    assert 0.0 < res.value <= gdp_epsilon(mu, 1e-5)
    with pytest.raises(ValueError, match="^delta:"):
        epsilon_lower_bound_gdp(tp, n - tp, fp, n - fp, delta=0.0)


def test_to_json_drops_unused_fields() -> None:
    js = one_run_epsilon_lower_bound(1000, 100, 100, 0.0).to_json()
    assert js["method"] == "one_run" and js["m"] == 1000 and "tp" not in js


# ------------------------------------------------------------------------------------------------
# f-DP one-run bound (Mahloujifar, Melis, Chaudhuri 2024)

from privaudit.audit.bounds import (  # noqa: E402
    GAUSSIAN_TRADEOFF,
    one_run_bounds_best,
    one_run_fdp_audit_best,
    one_run_fdp_audit_from_scores,
    one_run_fdp_epsilon_lower_bound,
    one_run_fdp_mu_lower_bound,
    one_run_fdp_rejects,
)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "expected"),
    [  # jax_privacy 2.0 auditing._epsilon_one_run_fdp(0, m, r, v, 0.05, delta), run on the same inputs
        (1000, 1000, 900, 1e-5, 3.7793),  # REFERENCES §10: about 3.8 (Steinke 2.021)
        (1000, 100, 100, 1e-5, 5.5490),
        (1000, 200, 190, 1e-5, 3.9161),
        (1000, 1000, 1000, 1e-5, 12.3346),
        (1000, 500, 400, 1e-5, 2.0768),
        (32, 32, 30, 1e-5, 3.6415),
        (1000, 50, 45, 1e-6, 2.1852),
        (10000, 1000, 900, 1e-5, 2.8026),
    ],
)
def test_fdp_matches_the_reference_implementation(m: int, r: int, v: int, delta: float, expected: float) -> None:
    res = one_run_fdp_epsilon_lower_bound(m, r, v, delta, confidence=0.95)
    assert res.value == pytest.approx(expected, abs=2e-4)
    assert (res.method, res.assumption, res.m, res.r, res.v) == ("one_run_fdp", GAUSSIAN_TRADEOFF, m, r, v)
    assert res.value == pytest.approx(gdp_epsilon(res.mu, delta), abs=1e-9)
    # mu_lower is the largest rejected mu: rejected just below, not just above.
    assert one_run_fdp_rejects(m, r, v, res.mu - 1e-6) and not one_run_fdp_rejects(m, r, v, res.mu + 1e-5)
    assert res.value > one_run_epsilon_lower_bound(m, r, v, delta).value


def test_fdp_at_mu_zero_is_an_exact_level_test() -> None:
    # mu = 0: every guess is a fair coin, v ~ Binomial(r, 1/2) exactly. The rejection region's
    # probability must not exceed the significance level (and the test is not empty).
    for m, r in ((200, 200), (200, 60), (1000, 100)):
        rej = np.array([one_run_fdp_rejects(m, r, v, 0.0, confidence=0.9) for v in range(r + 1)])
        assert rej.any() and not rej[: r // 2].any()
        assert (rej[:-1] <= rej[1:]).all()  # monotone in v
        assert stats.binom.pmf(np.arange(r + 1), r, 0.5)[rej].sum() <= 0.1


def _gaussian_trials(mu: float, m: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    inc = rng.random((n, m)) < 0.5  # fair coins
    return rng.normal(size=(n, m)) + mu * inc, inc  # member ~ N(mu, 1), non-member ~ N(0, 1)


def test_fdp_coverage_on_the_gaussian_mechanism() -> None:
    """Scores from the Gaussian mechanism with known mu (300 independent audits, fixed guesses: the
    50 highest "in", the 50 lowest "out"): the bound stays below the truth in at least the
    confidence fraction of trials, at the usual confidence and at loose ones where the test is close
    to its limit (so an anti-conservative bound would fail here)."""
    mu, delta, m, k, n = 1.5, 1e-5, 500, 50, 300
    true_eps = gdp_epsilon(mu, delta)
    scores, inc = _gaussian_trials(mu, m, n, seed=11)
    order, rows = np.argsort(-scores, axis=1), np.arange(n)[:, None]
    v = inc[rows, order[:, :k]].sum(1) + (~inc[rows, order[:, -k:]]).sum(1)
    for conf in (0.95, 0.5, 0.2):
        by_v = {int(x): one_run_fdp_mu_lower_bound(m, 2 * k, int(x), conf) for x in np.unique(v)}
        eps_by_v = {x: gdp_epsilon(u, delta) if u > 0 else 0.0 for x, u in by_v.items()}
        mus = np.array([by_v[int(x)] for x in v])
        eps = np.array([eps_by_v[int(x)] for x in v])
        assert (mus <= mu).mean() >= conf, conf
        assert (eps <= true_eps).mean() >= conf, conf
        assert (mus > 0).mean() > 0.95  # the audit does see the leak
    assert np.median(mus) > 0.8 * mu  # at 20% confidence the bound sits close to the truth


def test_fdp_approaches_the_truth_as_canaries_grow() -> None:
    mu, delta = 1.0, 1e-5
    true_eps = gdp_epsilon(mu, delta)
    means = []
    for m in (100, 1000, 10000):
        scores, inc = _gaussian_trials(mu, m, 2, seed=m)
        vals = [one_run_fdp_audit_best(scores[i], inc[i], delta, seed=i).value for i in range(2)]
        assert max(vals) < true_eps
        means.append(float(np.mean(vals)))
    assert means[0] < means[1] < means[2]
    assert means[2] > 0.45 * true_eps


def test_fdp_strictly_above_steinke_on_the_same_guesses() -> None:
    scores, inc = _gaussian_trials(2.0, 1000, 1, seed=5)
    fdp = one_run_fdp_audit_from_scores(scores[0], inc[0], 100, 100, 1e-5)
    steinke = one_run_audit_from_scores(scores[0], inc[0], 100, 100, 1e-5)
    assert (fdp.r, fdp.v) == (steinke.r, steinke.v)
    assert steinke.value > 0.5 and fdp.value > 1.3 * steinke.value
    assert fdp.value < gdp_epsilon(2.0, 1e-5)


def test_one_run_bounds_best_corrects_over_every_bound_and_delta() -> None:
    scores, inc = _gaussian_trials(1.5, 2000, 1, seed=3)
    s, i = scores[0], inc[0]
    grid = default_one_run_grid(2000)
    both = one_run_bounds_best(s, i, [1e-5, 1e-6], 0.95, seed=0)
    g = len(grid)
    assert both["one_run"][1e-5].n_tests == both["one_run_fdp"][1e-6].n_tests == g * (2 + 1)
    # The fdp mu is one test for every delta; the joint correction makes each bound smaller than alone.
    assert both["one_run_fdp"][1e-5].mu == both["one_run_fdp"][1e-6].mu
    alone = one_run_fdp_audit_best(s, i, 1e-5, seed=0)
    assert alone.n_tests == g and 0 < both["one_run_fdp"][1e-5].value < alone.value
    assert both["one_run"][1e-5].value < one_run_audit_best(s, i, 1e-5, seed=0).value
    # Under the null nothing is certified.
    rng = np.random.default_rng(0)
    for k in range(5):
        null = one_run_bounds_best(rng.normal(size=1000), rng.random(1000) < 0.5, [1e-5], seed=k)
        assert null["one_run"][1e-5].value == 0.0 and null["one_run_fdp"][1e-5].value == 0.0


def test_fdp_bad_input() -> None:
    with pytest.raises(ValueError, match="^delta:"):
        one_run_fdp_epsilon_lower_bound(100, 10, 10, 0.0)
    with pytest.raises(ValueError, match="^v:"):
        one_run_fdp_epsilon_lower_bound(100, 10, 11, 1e-5)
    with pytest.raises(ValueError, match="^mu:"):
        one_run_fdp_rejects(100, 10, 10, -1.0)
    with pytest.raises(ValueError, match="^bounds:"):
        one_run_bounds_best(np.zeros(10), np.zeros(10, bool), [1e-5], bounds=("lira",))
    with pytest.raises(ValueError, match="^deltas:"):
        one_run_bounds_best(np.zeros(10), np.zeros(10, bool), [0.0])
