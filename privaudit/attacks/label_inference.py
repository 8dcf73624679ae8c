"""Label inference from prediction differences (PAE MobiLLM's δ, or any per-class residual a server sees).

For a one-hot target, δ = onehot(y) − softmax(z) has exactly one positive entry, at the true class
(1 − p_y > 0 while −p_j ≤ 0 for j ≠ y), so ``argmax δ`` returns the label with certainty. When δ is
perturbed with i.i.d. Gaussian noise, argmax δ is still the maximum-likelihood guess (the true entry
has the largest mean); its accuracy falls toward the majority baseline as the noise grows.

Metric: accuracy on the victims against the *majority baseline* (always guessing the most frequent
victim label — what an attacker without δ gets at best knowing the label distribution), with a
Clopper–Pearson interval and a one-sided binomial p-value of "accuracy > baseline".
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from privaudit.attacks.metrics import accuracy_against_baseline

__all__ = ["infer_labels", "label_inference_attack"]


def _as_matrix(deltas: torch.Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    a = deltas.detach().float().cpu().numpy() if isinstance(deltas, torch.Tensor) else np.asarray(deltas, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] < 2:
        raise ValueError(f"deltas: must be (n, K) with n >= 1 and K >= 2 classes, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("deltas: contains NaN or infinite values")
    return a


def infer_labels(deltas: torch.Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """The guessed label of each row: argmax of δ (ties: the smallest index)."""
    return np.argmax(_as_matrix(deltas), axis=1)


def label_inference_attack(deltas: torch.Tensor | np.ndarray | Sequence[Sequence[float]], labels: Sequence[int],
                           *, confidence: float = 0.95) -> dict[str, Any]:
    """Guess each victim's label from its δ and score the guesses.

    Returns ``{"name": "label_inference", "kind": "attribute", "metrics": {...}}`` with ``accuracy``,
    ``accuracy_ci``, ``majority_baseline``, ``chance`` (1/K), ``advantage``, ``p_value``,
    ``beats_baseline`` (the interval's lower end is above the baseline), ``n_test``, ``n_classes``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")
    d = _as_matrix(deltas)
    y = np.asarray(labels)
    if y.shape != (d.shape[0],):
        raise ValueError(f"labels: {y.size} values for {d.shape[0]} rows of deltas")
    if y.size and (y.min() < 0 or y.max() >= d.shape[1]):
        raise ValueError(f"labels: must be in [0, {d.shape[1] - 1}]")
    pred = np.argmax(d, axis=1)
    n = int(y.size)
    correct = int(np.sum(pred == y))
    counts = np.bincount(y, minlength=d.shape[1])
    baseline = float(counts.max() / n)
    return {
        "name": "label_inference",
        "kind": "attribute",
        "metrics": {
            **accuracy_against_baseline(correct, n, baseline, confidence),
            "chance": 1.0 / d.shape[1],
            "n_test": n,
            "n_classes": int(d.shape[1]),
        },
    }
