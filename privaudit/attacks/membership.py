"""Membership-inference attacks on per-example quantities (never on models).

The auditor computes per-example losses, confidences or probabilities from the target and reference
models and passes arrays here. Every attack returns one score per target example, **higher = more
likely a member**; feed the scores to :mod:`privaudit.attacks.metrics` and
:mod:`privaudit.audit.bounds`.

Shapes: ``n`` target examples, ``k`` reference models; reference arrays are ``(k, n)`` (row = model).

* Loss attack (Yeom et al. 2018): score = −loss.
* LiRA (Carlini et al. 2022): per example, Gaussians fitted to the logit-scaled confidence
  φ = log p_y − log(1 − p_y) under reference models trained with (IN) and without (OUT) the example.
  Online: score = log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²). Offline (OUT only): one-sided
  test, score = −log P[Z ≥ φ], Z ~ N(μ_out, σ_out²). With few reference models a global variance
  (pooled over examples) is more reliable, as the paper recommends.
* RMIA (Zarifzadeh, Liu, Shokri 2024): LR(x, z) = [P(x|θ)/P(x)] / [P(z|θ)/P(z)]; score(x) = fraction
  of population points z with LR(x, z) > γ (strict, as the authors' code). P(·) as the authors'
  reference implementation (privacytrustlab/ml_privacy_meter, ``run_rmia``) estimates it: from the
  reference models that did NOT train on the point (OUT), with the offline correction
  P ≈ ½((1 + a)·P_OUT + (1 − a)), for x and z alike — also when IN models exist.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from privaudit.attacks.metrics import as_score_array

__all__ = [
    "loss_attack_scores",
    "logit_scaled_confidence",
    "logit_scaled_confidence_from_logits",
    "logit_scaled_confidence_from_loss",
    "reference_split_masks",
    "split_reference_confidences",
    "lira_scores",
    "rmia_scores",
]

_TINY = 1e-300


def loss_attack_scores(target_losses: ArrayLike) -> NDArray[np.float64]:
    """Loss attack: score = −loss (per-example loss in nats; lower loss = more likely a member)."""
    return -as_score_array(target_losses, "target_losses")


def logit_scaled_confidence(probs_true_class: ArrayLike) -> NDArray[np.float64]:
    """φ = log p − log(1 − p) of the probability of the true class (any shape; p clipped into the
    open interval so φ stays finite, |φ| ≲ 37)."""
    p = np.asarray(probs_true_class, dtype=np.float64)
    if p.size == 0:
        raise ValueError("probs_true_class: must not be empty")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("probs_true_class: must be probabilities in [0, 1] (no NaN)")
    p = np.clip(p, 1e-16, np.nextafter(1.0, 0.0))
    return np.log(p) - np.log1p(-p)


def logit_scaled_confidence_from_logits(logits: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """φ = z_y − logsumexp_{y'≠y} z_{y'} from logits ``(..., C)`` and integer labels ``(...)``: the
    numerically stable form LiRA uses (equal to log p_y − log Σ_{y'≠y} p_{y'})."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim < 1 or z.shape[-1] < 2:
        raise ValueError(f"logits: need a last axis of >= 2 classes, got shape {z.shape}")
    if y.shape != z.shape[:-1]:
        raise ValueError(f"labels: must have shape {z.shape[:-1]}, got {y.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits: contains NaN or infinite values")
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any() or (y >= z.shape[-1]).any():
        raise ValueError(f"labels: must be integers in [0, {z.shape[-1]})")
    zy = np.take_along_axis(z, y[..., None], axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, y[..., None], -np.inf, axis=-1)
    m = others.max(axis=-1)
    lse = m + np.log(np.exp(others - m[..., None]).sum(axis=-1))
    return zy - lse


def logit_scaled_confidence_from_loss(losses: ArrayLike) -> NDArray[np.float64]:
    """φ from a cross-entropy loss ℓ = −log p_y (nats): φ = −ℓ − log(1 − e^{−ℓ}).

    For language models pass a per-sequence loss (e.g. mean token NLL): p = e^{−ℓ} is then a
    geometric-mean token probability and φ a monotone transform of the loss; LiRA's Gaussian fits
    are what matter.
    """
    loss = np.asarray(losses, dtype=np.float64)
    if loss.size == 0:
        raise ValueError("losses: must not be empty")
    if np.isnan(loss).any() or (loss < 0).any():
        raise ValueError("losses: must be non-negative numbers (no NaN)")
    loss = np.clip(loss, 1e-16, 745.0)
    return -loss - np.log(-np.expm1(-loss))


def reference_split_masks(n_examples: int, n_models: int, seed: int = 0) -> NDArray[np.bool_]:
    """``(n_models, n_examples)`` boolean mask: entry [j, i] is True when example i is in the
    training set of reference model j. Each example is IN for exactly ⌊n_models/2⌋ models chosen at
    random (as in Carlini et al.'s code), so every example has IN and OUT models when n_models ≥ 2."""
    if isinstance(n_examples, bool) or not isinstance(n_examples, (int, np.integer)) or n_examples < 1:
        raise ValueError(f"n_examples: must be an integer >= 1, got {n_examples!r}")
    if isinstance(n_models, bool) or not isinstance(n_models, (int, np.integer)) or n_models < 2:
        raise ValueError(f"n_models: must be an integer >= 2, got {n_models!r}")
    rng = np.random.default_rng(seed)
    order = rng.random((n_models, n_examples)).argsort(axis=0).argsort(axis=0)  # random rank per column
    return order < n_models // 2


def split_reference_confidences(ref_conf: ArrayLike, in_mask: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Split a ``(k, n)`` matrix of reference confidences into (IN, OUT) matrices with NaN where a
    model does not belong to that side, ready for :func:`lira_scores`."""
    c = as_score_array(ref_conf, "ref_conf", ndim=2)
    mask = _bool_mask(in_mask, c.shape, "in_mask")
    return np.where(mask, c, np.nan), np.where(mask, np.nan, c)


def _bool_mask(mask: ArrayLike, shape: tuple[int, ...], name: str) -> NDArray[np.bool_]:
    m = np.asarray(mask)
    if m.shape != shape:
        raise ValueError(f"{name}: must have shape {shape}, got {m.shape}")
    if m.dtype != np.bool_:
        if not np.isin(m, (0, 1)).all():
            raise ValueError(f"{name}: must be boolean")
        m = m.astype(bool)
    return m


def _ref_matrix(x: ArrayLike, n: int, name: str) -> NDArray[np.float64]:
    """A (k, n) reference matrix in which NaN marks "this model is not on this side"."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != n:
        raise ValueError(f"{name}: must have shape (n_reference_models, {n}), got {np.asarray(x).shape}")
    if np.isinf(arr).any():
        raise ValueError(f"{name}: contains infinite values")
    counts = (~np.isnan(arr)).sum(axis=0)
    if (counts == 0).any():
        raise ValueError(f"{name}: example {int(np.flatnonzero(counts == 0)[0])} has no reference model "
                         f"(every column needs at least one non-NaN value)")
    return arr


def _fit(arr: NDArray[np.float64], global_variance: bool) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-example mean and std of a NaN-masked (k, n) matrix; the std is per example or pooled."""
    cnt = (~np.isnan(arr)).sum(axis=0)
    mu = np.nanmean(arr, axis=0)
    resid2 = np.where(np.isnan(arr), 0.0, (arr - mu) ** 2).sum(axis=0)
    if global_variance:
        dof = int(np.maximum(cnt - 1, 0).sum())
        if dof > 0:
            sd = math.sqrt(resid2.sum() / dof)  # pooled within-example variance
        else:  # one model per example: fall back to the spread over everything (Carlini et al.)
            sd = float(np.nanstd(arr))
        std = np.full(arr.shape[1], sd)
    else:
        if (cnt < 2).any():
            raise ValueError("global_variance: per-example variances need >= 2 reference models per example "
                             "and side; use global_variance=True")
        std = np.sqrt(resid2 / (cnt - 1))
    return mu, np.maximum(std, 1e-8)


def lira_scores(
    target_conf: ArrayLike,
    ref_in_conf: ArrayLike | None,
    ref_out_conf: ArrayLike,
    online: bool = True,
    global_variance: bool | None = None,
) -> NDArray[np.float64]:
    """LiRA scores from logit-scaled confidences (see :func:`logit_scaled_confidence`).

    ``target_conf``: ``(n,)`` φ of each example under the target model. ``ref_in_conf`` /
    ``ref_out_conf``: ``(k, n)`` φ under reference models trained with / without the example, NaN
    where a model is not on that side (:func:`split_reference_confidences` builds them).
    ``online=False`` (or ``ref_in_conf=None``) uses OUT models only. ``global_variance``: pool the
    variance over all examples (per side); default: pooled when the median number of reference
    models per example and side is below 32 (the paper's advice for few models).
    """
    t = as_score_array(target_conf, "target_conf")
    n = t.size
    out = _ref_matrix(ref_out_conf, n, "ref_out_conf")
    use_in = online and ref_in_conf is not None
    if online and ref_in_conf is None:
        raise ValueError("ref_in_conf: required for online LiRA (or pass online=False)")
    inn = _ref_matrix(ref_in_conf, n, "ref_in_conf") if use_in else None
    sides = [out] + ([inn] if inn is not None else [])
    if global_variance is None:
        global_variance = min(float(np.median((~np.isnan(s)).sum(axis=0))) for s in sides) < 32
    mu_out, sd_out = _fit(out, global_variance)
    if inn is None:
        return -stats.norm.logsf(t, loc=mu_out, scale=sd_out)
    mu_in, sd_in = _fit(inn, global_variance)
    return stats.norm.logpdf(t, mu_in, sd_in) - stats.norm.logpdf(t, mu_out, sd_out)


def _prob_vector(x: ArrayLike, name: str) -> NDArray[np.float64]:
    p = as_score_array(x, name)
    if (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name}: must be probabilities in [0, 1]")
    return p


def _prob_matrix(x: ArrayLike, n: int, name: str) -> NDArray[np.float64]:
    p = np.asarray(x, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    p = as_score_array(p, name, ndim=2)
    if p.shape[1] != n:
        raise ValueError(f"{name}: must have shape (n_reference_models, {n}), got {p.shape}")
    if (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name}: must be probabilities in [0, 1]")
    return p


def rmia_scores(
    target_probs_x: ArrayLike,
    ref_probs_x: ArrayLike,
    target_probs_z: ArrayLike,
    ref_probs_z: ArrayLike,
    ref_in_mask: ArrayLike | None = None,
    gamma: float = 1.0,
    offline_a: float = 0.33,
    balanced_px: bool = False,
) -> NDArray[np.float64]:
    """RMIA scores in [0, 1]: the fraction of population points z with LR(x, z) > ``gamma`` (strict).

    ``target_probs_x`` ``(n,)`` / ``ref_probs_x`` ``(k, n)``: P(x|θ) — the probability the target /
    each reference model gives the true label of x (for LMs, e.g. exp(−mean token NLL)).
    ``target_probs_z`` ``(n_z,)`` / ``ref_probs_z`` ``(k, n_z)``: the same for population points z,
    which no model trained on. ``ref_in_mask`` ``(k, n)``: True where reference model j trained on
    x_i (``None``: no reference model trained on any x).

    P(x) and P(z) as the reference implementation computes them: the mean over the point's OUT
    reference models with the offline correction P = ½((1 + a)·P_OUT + (1 − a)), ``a = offline_a``
    (z is OUT everywhere). An x that every reference model trained on (no OUT model; the reference
    code would average zeros there) gets the IN mean, an over-estimate of P(x) that can only lower
    its score. ``balanced_px=True`` instead uses the paper's online estimate P(x) = ½(mean_IN +
    mean_OUT) where x has both (the offline formula or the IN mean otherwise); z keeps the offline
    correction.
    """
    tx = _prob_vector(target_probs_x, "target_probs_x")
    tz = _prob_vector(target_probs_z, "target_probs_z")
    rx = _prob_matrix(ref_probs_x, tx.size, "ref_probs_x")
    rz = _prob_matrix(ref_probs_z, tz.size, "ref_probs_z")
    if rx.shape[0] != rz.shape[0]:
        raise ValueError(f"ref_probs_z: must come from the same {rx.shape[0]} reference models as ref_probs_x, "
                         f"got {rz.shape[0]}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma: must be a positive number, got {gamma!r}")
    if not (isinstance(offline_a, (int, float)) and 0.0 <= offline_a <= 1.0):
        raise ValueError(f"offline_a: must be in [0, 1], got {offline_a!r}")
    a = float(offline_a)

    def offline(p_out: NDArray[np.float64]) -> NDArray[np.float64]:
        return 0.5 * ((1.0 + a) * p_out + (1.0 - a))

    if ref_in_mask is None:
        px = offline(rx.mean(axis=0))
    else:
        mask = _bool_mask(ref_in_mask, rx.shape, "ref_in_mask")
        n_in, n_out = mask.sum(axis=0), (~mask).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_in = np.where(mask, rx, 0.0).sum(axis=0) / n_in
            mean_out = np.where(mask, 0.0, rx).sum(axis=0) / n_out
        px_out = np.where(n_out > 0, offline(np.nan_to_num(mean_out)), np.nan_to_num(mean_in))
        px = (np.where((n_in > 0) & (n_out > 0), 0.5 * (mean_in + mean_out), px_out) if balanced_px
              else px_out)
    pz = offline(rz.mean(axis=0))
    ratio_x = np.maximum(tx, _TINY) / np.maximum(px, _TINY)
    ratio_z = np.sort(np.maximum(tz, _TINY) / np.maximum(pz, _TINY))
    # LR(x, z) = ratio_x / ratio_z > gamma  <=>  ratio_z < ratio_x / gamma
    counts = np.searchsorted(ratio_z, ratio_x / gamma, side="left")
    return counts / ratio_z.size
