"""Membership attacks on synthetic per-example quantities with a known ground truth.

Synthetic world: example i has a difficulty d_i (spread 3) and a model trained on it raises its
logit-scaled confidence by 1 (noise 0.5). A global loss threshold mostly sees difficulty; attacks
that calibrate per example with reference models (LiRA, RMIA) see the membership shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from scipy.special import expit, softmax

from privaudit.attacks.membership import (
    logit_scaled_confidence,
    logit_scaled_confidence_from_logits,
    logit_scaled_confidence_from_loss,
    lira_scores,
    loss_attack_scores,
    reference_split_masks,
    rmia_scores,
    split_reference_confidences,
)
from privaudit.attacks.metrics import auc, membership_metrics, tpr_at_fpr

SPREAD, SHIFT, NOISE = 3.0, 1.0, 0.5


@dataclass
class World:
    member: np.ndarray
    target_phi: np.ndarray
    ref_phi: np.ndarray  # (k, n)
    ref_mask: np.ndarray  # (k, n)
    pop_target_phi: np.ndarray
    pop_ref_phi: np.ndarray  # (k, n_z)


def make_world(n: int = 1500, k: int = 16, n_z: int = 1500, shift: float = SHIFT, seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    d, dz = rng.normal(0, SPREAD, n), rng.normal(0, SPREAD, n_z)
    member = rng.random(n) < 0.5
    mask = reference_split_masks(n, k, seed=seed + 1)

    def phi(base: np.ndarray, inside: np.ndarray) -> np.ndarray:
        return base + shift * inside + rng.normal(0, NOISE, inside.shape)

    return World(
        member=member,
        target_phi=phi(d, member),
        ref_phi=phi(d, mask),
        ref_mask=mask,
        pop_target_phi=phi(dz, np.zeros(n_z, bool)),
        pop_ref_phi=phi(dz, np.zeros((k, n_z), bool)),
    )


def _auc(scores: np.ndarray, member: np.ndarray) -> float:
    return auc(scores[member], scores[~member])


def _null_coverage(scores_and_members: Callable[[int], tuple[np.ndarray, np.ndarray]], reps: int = 10) -> float:
    """Fraction of independent no-signal replicates whose 95% bootstrap AUC interval contains 0.5
    (a single replicate misses 5% of the time by design)."""
    hits = 0
    for seed in range(reps):
        s, member = scores_and_members(1000 + seed)
        lo, hi = membership_metrics(s[member], s[~member], n_bootstrap=100, seed=seed)["auc_ci"]
        hits += lo <= 0.5 <= hi
    return hits / reps


def _loss(phi: np.ndarray) -> np.ndarray:
    """Cross-entropy loss of the true class whose logit-scaled confidence is phi."""
    return -np.log(expit(phi))


# ------------------------------------------------------------------------------------------------


def test_loss_attack_separation_and_null() -> None:
    rng = np.random.default_rng(0)
    member = rng.random(2000) < 0.5
    losses = rng.exponential(1.0, 2000) * np.where(member, 0.5, 1.0)  # members have lower loss
    s = loss_attack_scores(losses)
    m = membership_metrics(s[member], s[~member], n_bootstrap=100)
    assert m["auc"] > 0.6 and m["auc_ci"][0] > 0.55

    def null_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        return loss_attack_scores(r.exponential(1.0, 1000)), r.random(1000) < 0.5

    assert _null_coverage(null_scores) >= 0.8
    with pytest.raises(ValueError, match="^target_losses:"):
        loss_attack_scores([0.1, np.nan])


def test_logit_scaled_confidence_forms_agree() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (50, 7))
    labels = rng.integers(0, 7, 50)
    p_true = softmax(logits, axis=1)[np.arange(50), labels]
    from_p = logit_scaled_confidence(p_true)
    assert np.allclose(logit_scaled_confidence_from_logits(logits, labels), from_p, atol=1e-9)
    assert np.allclose(logit_scaled_confidence_from_loss(-np.log(p_true)), from_p, atol=1e-8)
    assert logit_scaled_confidence([0.5])[0] == 0.0
    assert np.isfinite(logit_scaled_confidence([0.0, 1.0])).all()
    assert np.isfinite(logit_scaled_confidence_from_loss([0.0, 1e4])).all()
    # Stable where probabilities underflow: logits far apart.
    assert logit_scaled_confidence_from_logits(np.array([[1000.0, 0.0]]), np.array([0]))[0] == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="^probs_true_class:"):
        logit_scaled_confidence([1.2])
    with pytest.raises(ValueError, match="^labels:"):
        logit_scaled_confidence_from_logits(logits, labels + 7)
    with pytest.raises(ValueError, match="^losses:"):
        logit_scaled_confidence_from_loss([-1.0])


def test_reference_split_masks() -> None:
    mask = reference_split_masks(1000, 8, seed=3)
    assert mask.shape == (8, 1000) and mask.dtype == bool
    assert (mask.sum(axis=0) == 4).all()  # every example IN for exactly half the models
    assert 0.45 < mask.mean(axis=1).min() and mask.mean(axis=1).max() < 0.55  # each model sees ~half
    assert (mask == reference_split_masks(1000, 8, seed=3)).all()
    assert (mask != reference_split_masks(1000, 8, seed=4)).any()
    with pytest.raises(ValueError, match="^n_models:"):
        reference_split_masks(10, 1)
    with pytest.raises(ValueError, match="^n_examples:"):
        reference_split_masks(0, 4)


def test_lira_online_beats_loss_attack_when_difficulty_varies() -> None:
    w = make_world()
    loss_scores = loss_attack_scores(_loss(w.target_phi))
    ref_in, ref_out = split_reference_confidences(w.ref_phi, w.ref_mask)
    online = lira_scores(w.target_phi, ref_in, ref_out, online=True)
    offline = lira_scores(w.target_phi, None, ref_out, online=False)
    a_loss, a_on, a_off = (_auc(s, w.member) for s in (loss_scores, online, offline))
    assert a_loss < 0.65  # difficulty dominates the raw loss
    assert a_on > a_loss + 0.2 and a_off > a_loss + 0.2
    assert a_on > 0.85
    t_loss = tpr_at_fpr(loss_scores[w.member], loss_scores[~w.member], 0.01)
    t_on = tpr_at_fpr(online[w.member], online[~w.member], 0.01)
    assert t_on > t_loss + 0.1
    # Per-example variances (16 models, 8 per side) still work, and beat the loss attack.
    per_example = lira_scores(w.target_phi, ref_in, ref_out, global_variance=False)
    assert _auc(per_example, w.member) > a_loss + 0.2


def test_lira_null_world() -> None:
    def null_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
        w = make_world(n=600, k=8, n_z=10, shift=0.0, seed=seed)
        ref_in, ref_out = split_reference_confidences(w.ref_phi, w.ref_mask)
        return lira_scores(w.target_phi, ref_in, ref_out), w.member

    assert _null_coverage(null_scores) >= 0.8


def test_lira_with_one_reference_model_per_side() -> None:
    w = make_world(k=2, seed=6)
    ref_in, ref_out = split_reference_confidences(w.ref_phi, w.ref_mask)
    s = lira_scores(w.target_phi, ref_in, ref_out)  # global variance chosen automatically
    assert _auc(s, w.member) > 0.75
    with pytest.raises(ValueError, match="^global_variance:"):
        lira_scores(w.target_phi, ref_in, ref_out, global_variance=False)


def test_lira_bad_input() -> None:
    w = make_world(n=50, k=4, n_z=10)
    ref_in, ref_out = split_reference_confidences(w.ref_phi, w.ref_mask)
    with pytest.raises(ValueError, match="^ref_in_conf:"):
        lira_scores(w.target_phi, None, ref_out, online=True)
    bad = ref_out.copy()
    bad[:, 3] = np.nan
    with pytest.raises(ValueError, match="^ref_out_conf:"):
        lira_scores(w.target_phi, ref_in, bad)
    with pytest.raises(ValueError, match="^ref_out_conf:"):
        lira_scores(w.target_phi, ref_in, ref_out[:, :10])
    with pytest.raises(ValueError, match="^in_mask:"):
        split_reference_confidences(w.ref_phi, w.ref_mask[:, :10])


# ------------------------------------------------------------------------------------------------
# RMIA


def test_rmia_hand_example() -> None:
    # ratio_x = P(x|theta) / P(x). As the reference implementation (ml_privacy_meter run_rmia): P(x)
    # from x's OUT reference models with the offline correction ((1 + a) mean_OUT + 1 - a) / 2, for x
    # and z alike, even when IN models exist; LR(x, z) > gamma strictly.
    tx = np.array([0.8, 0.2])
    rx = np.array([[0.6, 0.3], [0.2, 0.1]])
    mask = np.array([[True, False], [False, True]])
    tz = np.array([0.5, 0.5, 0.9])
    rz = np.array([[0.5, 0.4, 0.9], [0.5, 0.6, 0.9]])
    a = 0.33
    pz = 0.5 * ((1 + a) * rz.mean(axis=0) + (1 - a))
    rzr = tz / pz
    px = 0.5 * ((1 + a) * np.array([0.2, 0.3]) + (1 - a))  # x0: OUT of model 1, x1: OUT of model 0
    expected = [((tx[i] / px[i]) / rzr > 1.0).mean() for i in range(2)]
    assert np.allclose(rmia_scores(tx, rx, tz, rz, ref_in_mask=mask), expected)
    # The paper's online estimate, on request: P(x) = (mean_IN + mean_OUT) / 2.
    px_bal = np.array([(0.6 + 0.2) / 2, (0.1 + 0.3) / 2])
    expected_bal = [((tx[i] / px_bal[i]) / rzr > 1.0).mean() for i in range(2)]
    assert np.allclose(rmia_scores(tx, rx, tz, rz, ref_in_mask=mask, balanced_px=True), expected_bal)
    # No IN models at all: the same offline formula over all reference models.
    px_off = 0.5 * ((1 + a) * rx.mean(axis=0) + (1 - a))
    expected_off = [((tx[i] / px_off[i]) / rzr > 2.0).mean() for i in range(2)]
    assert np.allclose(rmia_scores(tx, rx, tz, rz, gamma=2.0), expected_off)
    # Strict: a point z with exactly the same likelihood ratio as x does not count.
    assert rmia_scores(np.array([0.5]), np.array([[0.5]]), np.array([0.5, 0.5]), np.array([[0.5, 0.5]]))[0] == 0.0
    # An x every reference model trained on gets its IN mean as P(x).
    s = rmia_scores(np.array([0.9]), np.array([[0.6], [0.4]]), tz, rz, ref_in_mask=np.array([[True], [True]]))
    assert s[0] == pytest.approx(((0.9 / 0.5) / rzr > 1.0).mean())


def test_rmia_with_few_reference_models() -> None:
    w = make_world(k=2, seed=7)
    loss_auc = _auc(loss_attack_scores(_loss(w.target_phi)), w.member)
    p = expit
    # Offline: reference models that never saw the targets (OUT everywhere).
    out_only = w.ref_phi - SHIFT * w.ref_mask
    for k in (1, 2):
        s = rmia_scores(p(w.target_phi), p(out_only[:k]), p(w.pop_target_phi), p(w.pop_ref_phi[:k]))
        assert 0.0 <= s.min() and s.max() <= 1.0
        assert _auc(s, w.member) > loss_auc + 0.05
    # Two reference models (one IN, one OUT per example). As the reference implementation: P(x) from
    # the one OUT model (offline correction) — beats the loss attack; the paper's balanced online
    # estimate uses the IN model too and does better still.
    s_ref = rmia_scores(p(w.target_phi), p(w.ref_phi), p(w.pop_target_phi), p(w.pop_ref_phi), ref_in_mask=w.ref_mask)
    assert _auc(s_ref, w.member) > loss_auc + 0.05
    s_on = rmia_scores(p(w.target_phi), p(w.ref_phi), p(w.pop_target_phi), p(w.pop_ref_phi), ref_in_mask=w.ref_mask,
                       balanced_px=True)
    assert _auc(s_on, w.member) > max(0.75, loss_auc + 0.15)
    # gamma: a stricter pairwise test can only lower the score.
    s_strict = rmia_scores(p(w.target_phi), p(w.ref_phi), p(w.pop_target_phi), p(w.pop_ref_phi),
                           ref_in_mask=w.ref_mask, gamma=2.0, balanced_px=True)
    assert (s_strict <= s_on).all() and (s_strict < s_on).any()


def test_rmia_null_world() -> None:
    def null_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
        w = make_world(n=600, k=2, n_z=600, shift=0.0, seed=seed)
        p = expit
        s = rmia_scores(p(w.target_phi), p(w.ref_phi), p(w.pop_target_phi), p(w.pop_ref_phi), ref_in_mask=w.ref_mask)
        return s, w.member

    assert _null_coverage(null_scores) >= 0.8


def test_rmia_bad_input() -> None:
    tx, rx, tz, rz = np.full(4, 0.5), np.full((2, 4), 0.5), np.full(3, 0.5), np.full((2, 3), 0.5)
    with pytest.raises(ValueError, match="^target_probs_x:"):
        rmia_scores(tx * 3, rx, tz, rz)
    with pytest.raises(ValueError, match="^ref_probs_z:"):
        rmia_scores(tx, rx, tz, rz[:1])
    with pytest.raises(ValueError, match="^ref_probs_x:"):
        rmia_scores(tx, rx[:, :3], tz, rz)
    with pytest.raises(ValueError, match="^ref_in_mask:"):
        rmia_scores(tx, rx, tz, rz, ref_in_mask=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="^gamma:"):
        rmia_scores(tx, rx, tz, rz, gamma=0.0)
    with pytest.raises(ValueError, match="^offline_a:"):
        rmia_scores(tx, rx, tz, rz, offline_a=1.5)
